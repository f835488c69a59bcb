"""Evaluate a trained model: `python launch/eval.py --workdir=DIR [--method=tagi] [--benchmark=synthetic|sni|p3|qa|synthetic_qa]`.

Any method of a pipeline work directory (tagi, hint, concat, no_instruction) on the synthetic suite (unseen and
seen tasks), Super-NaturalInstructions (the split's test tasks; greedy decoding up to 128 tokens, ROUGE-L and
exact match) or the P3/T0 held-out sets (rank classification, accuracy per template, MTest11 and HyperT5
averages). Adapters are generated once per task and cached in DIR/adapter_cache (keyed by instruction and
checkpoint), so a second run reuses them. Writes DIR/eval/<method>_<benchmark>_<split>_predictions.jsonl and
DIR/eval/<method>_<benchmark>_metrics.json, and prints a table with timing; then the per-category table
(DIR/eval/per_category.json and .md, printed), summary.png (summary_<benchmark>.png for a benchmark the run was
not trained on) and curves.png in the work directory.

Data and eval settings come from DIR/config.json, or from `--config=configs/<name>.py` (with
`--config.key=value` overrides) when given; the model always comes from the work directory. Library logging
goes to DIR/logs/eval.log (`--verbose`: also to the console). Examples:

    python launch/eval.py --workdir=runs/demo --method=concat
    python launch/eval.py --workdir=runs/sni_xl --benchmark=p3 --p3_templates_dir=... --p3_data_dir=...
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no oneDNN INFO line on stderr (see launch/train.py)

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tagi_jax import cli  # noqa: E402
from tagi_jax.eval import plots, report  # noqa: E402
from tagi_jax.eval.runner import result_name, run_evaluation  # noqa: E402
from tagi_jax.models.quantize import BACKBONE_WEIGHTS  # noqa: E402
from tagi_jax.run.stages import check_method  # noqa: E402
from tagi_jax.run.workdir import load_workdir_config  # noqa: E402


def define_flags(argv) -> flags.FlagValues:
    """A fresh flag set for each call of `main`; config_flags reads the `--config.*` overrides from `argv`."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "Optional configs/*.py file for the data/eval settings (default: WORKDIR/config.json).",
        flag_values=fv, sys_argv=list(argv))
    string, integer = (functools.partial(f, flag_values=fv) for f in (flags.DEFINE_string, flags.DEFINE_integer))
    string("workdir", None, "A pipeline work directory (launch/train.py --workdir).")
    string("method", "tagi", "tagi, hint, concat, no_instruction, or a comma-separated list.")
    string("benchmark", None, "synthetic, sni, p3, qa or synthetic_qa (default: the config's data.benchmark).")
    flags.DEFINE_list("tasks", None, "Only these task names (default: every task of the benchmark).", flag_values=fv)
    integer("max_examples_per_task", None, "Default: config eval.max_examples_per_task.", lower_bound=1)
    integer("batch_size", None, "Default: config eval.batch_size.", lower_bound=1)
    integer("beam_size", None, "1 = greedy (the SNI protocol). Default: config eval.beam_size.", lower_bound=1)
    integer("max_decode_len", None, "Default: config eval.max_decode_len.", lower_bound=1)
    flags.DEFINE_bool("adapter_cache", True, "Reuse/keep generated adapters in WORKDIR/adapter_cache.",
                      flag_values=fv)
    string("sni_dir", None, "natural-instructions directory (default: config data.sni.dir).")
    string("p3_templates_dir", None, "promptsource templates directory (default: config data.p3.templates_dir).")
    string("p3_data_dir", None, "P3 held-out validation JSONL directory (<dataset>/validation.jsonl; default: "
           "config data.p3.eval_data_dir).")
    flags.DEFINE_enum("backbone_weights", None, list(BACKBONE_WEIGHTS), "Store the backbone's matmul kernels so "
                      "after loading (int8: per-channel weight-only quantisation); results are named "
                      "<method>_<value>_... (default: as trained).", flag_values=fv)
    flags.DEFINE_list("p3_datasets", None, "Only these P3 datasets (default: config data.p3.eval_datasets, those "
                      "found).", flag_values=fv)
    return fv


def work(args: flags.FlagValues) -> None:
    """What the command does once its flags are parsed."""
    if not args.workdir:
        raise cli.UsageError("--workdir is required")
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    if not methods:
        raise cli.UsageError("--method names no method")
    for method in methods:
        check_method(method)
    if not os.path.isdir(args.workdir):
        raise FileNotFoundError(f"{args.workdir}: work directory not found")
    trained = os.path.isfile(os.path.join(args.workdir, "config.json"))
    cli.setup_logging(os.path.join(args.workdir, "logs") if trained else None, "eval", args.verbose)
    results = {}
    for method in methods:
        results[result_name(method, args.backbone_weights)] = run_evaluation(
            args.workdir, method, args.benchmark, config=args.config, tasks=args.tasks,
            max_examples_per_task=args.max_examples_per_task, batch_size=args.batch_size,
            beam_size=args.beam_size, max_decode_len=args.max_decode_len, use_cache=args.adapter_cache,
            sni_dir=args.sni_dir, p3_templates_dir=args.p3_templates_dir, p3_data_dir=args.p3_data_dir,
            p3_datasets=args.p3_datasets, backbone_weights=args.backbone_weights)
    if jax.process_index() == 0:  # one copy of the table and the pictures
        trained_benchmark = load_workdir_config(args.workdir).data.benchmark
        benchmark = args.benchmark or (args.config or load_workdir_config(args.workdir)).data.benchmark
        report.write_category_table(args.workdir, results, benchmark)
        plots.write_run_figures(args.workdir, plots.benchmark_summary(args.workdir, benchmark, trained_benchmark),
                                summary_name=plots.summary_png_name(benchmark, trained_benchmark))


def main(argv) -> int:
    """The command; returns its exit status."""
    return cli.command(argv, define_flags, work, __doc__)


if __name__ == "__main__":
    cli.exit_process(main(sys.argv))
