"""Train: `python launch/train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...] [--verbose]`.

Runs the config's pipeline stages in order (each resumable from its own checkpoints in DIR/<stage>/), then
evaluates the configured methods and writes DIR/summary.json. Unknown keys, missing paths and incompatible
settings stop the run before any work, with the key named; a resumed run refuses settings that contradict what
DIR was trained with. SIGTERM/SIGINT save a checkpoint and exit; running the command again resumes.
Library logging goes to DIR/logs/train.log (`--verbose`: also to the console).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time  # noqa: E402

import jax  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tagi_jax import cli  # noqa: E402
from tagi_jax.run import pipeline  # noqa: E402
from tagi_jax.trainer.distributed import initialize_distributed  # noqa: E402


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
    workdir = args.workdir
    cli.setup_logging(os.path.join(workdir, "logs"), "train", args.verbose)
    # Persistent XLA cache: a re-run (or the next stage with an identical step) skips compilation.
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("TAGI_JAX_CACHE", os.path.expanduser("~/.cache/tagi_jax/xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    config = args.config
    initialize_distributed(config)
    start = time.time()
    pipeline.run(config, workdir)
    minutes = (time.time() - start) / 60
    print(f"\ndone in {minutes:.1f} min; summary: {os.path.join(workdir, 'summary.json')}")


def main(argv) -> int:
    """The command; returns its exit status."""
    return cli.command(argv, define_flags, work, __doc__)


if __name__ == "__main__":
    cli.exit_process(main(sys.argv))
