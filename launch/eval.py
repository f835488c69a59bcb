"""Evaluate a trained model: `python launch/eval.py --workdir=DIR [--method=tagi] [--benchmark=synthetic|sni|p3]`.

Any method of a pipeline work directory (tagi, hint, concat, no_instruction) on the synthetic suite (unseen and
seen tasks), Super-NaturalInstructions (the split's test tasks; greedy decoding up to 128 tokens, ROUGE-L and
exact match) or the P3/T0 held-out sets (rank classification, accuracy per template, MTest11 and HyperT5
averages). Adapters are generated once per task and cached in DIR/adapter_cache (keyed by instruction and
checkpoint), so a second run reuses them. Writes DIR/eval/<method>_<benchmark>_<split>_predictions.jsonl and
DIR/eval/<method>_<benchmark>_metrics.json, and prints a table with timing.

Data and eval settings come from DIR/config.json, or from `--config=configs/<name>.py` (with
`--config.key=value` overrides) when given; the model always comes from the work directory. Examples:

    python launch/eval.py --workdir=runs/demo --method=concat
    python launch/eval.py --workdir=runs/sni_xl --benchmark=p3 --p3_templates_dir=... --p3_data_dir=...
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tagi_jax.config import ConfigError, parse_flags_or_exit  # noqa: E402
from tagi_jax.eval.runner import run_evaluation  # noqa: E402
from tagi_jax.run.stages import check_method  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Optional configs/*.py file for the data/eval settings (default: WORKDIR/config.json).")
_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline work directory (launch/train.py --workdir).")
_METHOD = flags.DEFINE_string("method", "tagi", "tagi, hint, concat, no_instruction, or a comma-separated list.")
_BENCHMARK = flags.DEFINE_string("benchmark", None, "synthetic, sni or p3 (default: the config's data.benchmark).")
_TASKS = flags.DEFINE_list("tasks", None, "Only these task names (default: every task of the benchmark).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples_per_task", None, "Default: config eval.max_examples_per_task.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Default: config eval.batch_size.")
_BEAM_SIZE = flags.DEFINE_integer("beam_size", None, "1 = greedy (the SNI protocol). Default: config eval.beam_size.")
_MAX_DECODE_LEN = flags.DEFINE_integer("max_decode_len", None, "Default: config eval.max_decode_len.")
_CACHE = flags.DEFINE_bool("adapter_cache", True, "Reuse/keep generated adapters in WORKDIR/adapter_cache.")
_SNI_DIR = flags.DEFINE_string("sni_dir", None, "natural-instructions directory (default: config data.sni.dir).")
_P3_TEMPLATES = flags.DEFINE_string("p3_templates_dir", None,
                                    "promptsource templates directory (default: config data.p3.templates_dir).")
_P3_DATA = flags.DEFINE_string("p3_data_dir", None, "P3 held-out validation JSONL directory "
                               "(<dataset>/validation.jsonl; default: config data.p3.eval_data_dir).")
_P3_DATASETS = flags.DEFINE_list("p3_datasets", None,
                                 "Only these P3 datasets (default: config data.p3.eval_datasets, those found).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # checkpoint-library chatter off unless asked for (-v 0)
    methods = [m.strip() for m in _METHOD.value.split(",") if m.strip()]
    try:
        for method in methods:
            check_method(method)
        for method in methods:
            run_evaluation(
                _WORKDIR.value, method, _BENCHMARK.value, config=_CONFIG.value, tasks=_TASKS.value,
                max_examples_per_task=_MAX_EXAMPLES.value, batch_size=_BATCH_SIZE.value,
                beam_size=_BEAM_SIZE.value, max_decode_len=_MAX_DECODE_LEN.value, use_cache=_CACHE.value,
                sni_dir=_SNI_DIR.value, p3_templates_dir=_P3_TEMPLATES.value, p3_data_dir=_P3_DATA.value,
                p3_datasets=_P3_DATASETS.value)
    except (ConfigError, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
