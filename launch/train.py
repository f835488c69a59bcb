"""Train: `python launch/train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...] [--verbose]`.

Runs the config's pipeline stages in order (each resumable from its own checkpoints in DIR/<stage>/), then
evaluates the configured methods and writes DIR/summary.json. Unknown keys, missing paths and incompatible
settings stop the run before any work, with the key named; a resumed run refuses settings that contradict what
DIR was trained with. SIGTERM/SIGINT save a checkpoint and exit; running the command again resumes.
Library logging goes to DIR/logs/train.log (`--verbose`: also to the console).
Multi-host (`--config.distributed.initialize=True`, one process per host, same DIR on a shared filesystem):
see README.md, "Multi-host"; process i > 0 logs to DIR/logs/train.i.log.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (the data pipeline only, no model math) prints an INFO line about its oneDNN kernels on CPUs that
# have them, before any logging is set up: success must leave stderr clean.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import time  # noqa: E402

import jax  # noqa: E402
from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tagi_jax import cli  # noqa: E402
from tagi_jax.run import defaults as run_defaults  # noqa: E402
from tagi_jax.run import pipeline  # noqa: E402
from tagi_jax.trainer.distributed import describe_processes, initialize_distributed  # noqa: E402


def define_flags(argv) -> flags.FlagValues:
    """A fresh flag set for each call of `main`; config_flags reads the `--config.*` overrides from `argv`."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True, flag_values=fv,
                                    sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, summary).", flag_values=fv)
    return fv


def work(args: flags.FlagValues) -> None:
    """What the command does once its flags are parsed."""
    if not args.config or not args.workdir:
        raise cli.UsageError(f"--{'config' if not args.config else 'workdir'} is required")
    workdir, config = args.workdir, args.config
    # First of all: jax.distributed must start before anything asks jax about its devices (the log file's
    # name below already does).
    initialize_distributed(config)
    run_defaults.validate(config)  # a bad config is one error line before anything is written (logs/ included)
    cli.setup_logging(os.path.join(workdir, "logs"), "train", args.verbose)
    logging.info("%s", describe_processes())
    # Persistent XLA cache: a re-run (or the next stage with an identical step) skips compilation.
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("TAGI_JAX_CACHE", os.path.expanduser("~/.cache/tagi_jax/xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    start = time.time()
    result = pipeline.run(config, workdir)
    minutes = (time.time() - start) / 60
    if jax.process_index() == 0:  # one copy of the closing line, the pictures and the table
        print(f"\ndone in {minutes:.1f} min; summary: {os.path.join(workdir, 'summary.json')}")
        # Imported only now: matplotlib is needed once the run has finished, not before its first step.
        from tagi_jax.eval import plots, report

        plots.write_run_figures(workdir, result["summary"])
        report.write_category_table(workdir, result["summary"], config.data.benchmark, from_predictions=True)


def main(argv) -> int:
    """The command; returns its exit status."""
    return cli.command(argv, define_flags, work, __doc__)


if __name__ == "__main__":
    cli.exit_process(main(sys.argv))
