"""Train: `python launch/train.py --config=configs/<name>.py --workdir=DIR [--config.key=value ...]`.

Runs the config's pipeline stages in order (each resumable from its own checkpoints in DIR/<stage>/), then
evaluates the configured methods and writes DIR/summary.json. Unknown keys, missing paths and incompatible
settings stop the run before any work, with the key named.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import time  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tagi_jax.config import ConfigError, parse_flags_or_exit  # noqa: E402
from tagi_jax.run import pipeline  # noqa: E402
from tagi_jax.trainer.trainer import initialize_distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (checkpoints, logs, summary).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Persistent XLA cache: a re-run (or the next stage with an identical step) skips compilation.
    jax.config.update("jax_compilation_cache_dir",
                      os.environ.get("TAGI_JAX_CACHE", os.path.expanduser("~/.cache/tagi_jax/xla")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    config = _CONFIG.value
    initialize_distributed(config)
    start = time.time()
    try:
        result = pipeline.run(config, _WORKDIR.value)
    except ConfigError as e:
        sys.exit(f"error: {e}")
    minutes = (time.time() - start) / 60
    print(f"\ndone in {minutes:.1f} min; summary: {os.path.join(_WORKDIR.value, 'summary.json')}")
    return result


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
