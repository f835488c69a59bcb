"""What every entry point (`launch/*.py`) does around its work: flags parsed with a mistake reported as one
`error:` line, a quiet console (the libraries' INFO logging goes to a file), and exit statuses that tell
success (0), bad input (1, 2 for usage), and preemption (128 + the signal) apart."""
from __future__ import annotations

import logging as py_logging
import os
import sys
from typing import Callable, Sequence

import jax
from absl import flags
from absl import logging

from tagi_jax.config import ConfigDict, ConfigError, load_config
from tagi_jax.trainer.guards import CheckpointError, NonFiniteError, Preempted

USAGE_EXIT, ERROR_EXIT = 2, 1
# Bad input or a bad environment (a missing file, a damaged checkpoint, a diverged run): one line, no traceback.
# Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, KeyError, OSError, NonFiniteError, CheckpointError)


class UsageError(ValueError):
    """A command-line mistake (unknown flag, missing required flag, stray argument)."""


def error_line(e: BaseException) -> str:
    """`error: <the first line of the message>` (KeyError's repr quotes dropped)."""
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    text = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return text if text.startswith("error: ") else f"error: {text}"


def parse_flags(flag_values: flags.FlagValues, argv: Sequence[str], doc: str) -> list[str] | None:
    """Parse `argv` into `flag_values`; None after printing the help for -h/--help. A bad `--config.key=value`
    (unknown key, wrong type) or config file becomes a `ConfigError` naming it, any other mistake a
    `UsageError`."""
    argv = list(argv)
    if any(a in ("-h", "--help", "-help", "--helpfull") for a in argv[1:]):
        print(doc.strip() + "\n\nflags:\n" + flag_values.get_help(include_special_flags=False))
        return None
    flag_values.unparse_flags()  # a second call in one process (tests, notebooks) starts from the defaults
    sys.modules.pop("config_config", None)  # config_flags loads into this module name, keeping an old get_config
    try:
        rest = flag_values(argv)
        config = flag_values["config"].value if "config" in flag_values else None
        if config is not None and not isinstance(config, ConfigDict):
            raise TypeError("the config file did not give a ConfigDict")  # or config_flags could not read it
    except Exception as e:  # noqa: BLE001 - absl and config_flags raise many types; each becomes one line
        _raise_config_error(argv)  # the ConfigError that names the key or the file, when the config is the cause
        raise UsageError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    if len(rest) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(rest[1:])}")
    return rest


def command(argv: Sequence[str], define_flags: Callable[[Sequence[str]], flags.FlagValues],
            work: Callable[[flags.FlagValues], None], doc: str) -> int:
    """An entry point's whole run: its flags (plus `--verbose`) parsed from `argv`, `work(flag_values)`, the
    exit status (`run`)."""
    flag_values = define_flags(argv)
    flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logging (and tracebacks) on the console.",
                      flag_values=flag_values)

    def parse_and_work():
        if parse_flags(flag_values, argv, doc) is not None:
            work(flag_values)

    return run(parse_and_work, flag_values)


def _raise_config_error(argv: Sequence[str]) -> None:
    config_path, overrides = None, []
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config."):
            overrides.append(arg if "=" in arg else f"{arg}=")
    if config_path is not None:
        load_config(config_path, overrides)


def run(work: Callable[[], None], flag_values: flags.FlagValues | None = None) -> int:
    """Run `work()` and return the exit status; expected failures print one line on stderr (with a parsed
    `--verbose` in `flag_values`, the traceback too)."""
    try:
        work()
        return 0
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr, flush=True)
        return 128 + int(e.signum)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        return 128 + 2
    except (UsageError, ConfigError) as e:
        if _verbose(flag_values):
            logging.exception("details")
        print(error_line(e), file=sys.stderr, flush=True)
        return USAGE_EXIT if isinstance(e, UsageError) else ERROR_EXIT
    except EXPECTED_ERRORS as e:
        if _verbose(flag_values):
            logging.exception("details")
        print(error_line(e), file=sys.stderr, flush=True)
        return ERROR_EXIT


def _verbose(flag_values: flags.FlagValues | None) -> bool:
    return bool(flag_values is not None and flag_values.is_parsed() and "verbose" in flag_values
                and flag_values["verbose"].value)


def exit_process(status: int) -> None:
    """End the process with `status`. A failure skips interpreter shutdown (`os._exit`, after flushing): a data
    error inside a tf.data/SeqIO pipeline can leave a worker thread that blocks shutdown forever."""
    sys.stdout.flush()
    sys.stderr.flush()
    py_logging.shutdown()
    if status:
        os._exit(status)
    sys.exit(0)


class _NotOrbaxChatter(py_logging.Filter):
    """Orbax's routine warnings (read-only managers, save intervals) stay in the log file, off the console."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        return record.levelno >= py_logging.ERROR or "orbax" not in record.pathname


def setup_logging(log_dir: str | None, name: str, verbose: bool) -> str | None:
    """The console shows warnings and errors (everything with `verbose`); with `log_dir`, every INFO line of
    absl, Orbax and JAX also goes to `<log_dir>/<name>.log` (one file per process). Returns the file's path."""
    logging.use_absl_handler()
    flags.FLAGS.mark_as_parsed()  # absl's own flags (verbosity, ...) at their defaults: no "before flag parsing"
    logging.set_verbosity(logging.INFO)
    console = logging.get_absl_handler()
    console.setLevel(py_logging.DEBUG if verbose else py_logging.WARNING)
    for f in list(console.filters):
        console.removeFilter(f)
    if not verbose:
        console.addFilter(_NotOrbaxChatter())
    if not log_dir:
        return None
    os.makedirs(log_dir, exist_ok=True)
    suffix = "" if jax.process_index() == 0 else f".{jax.process_index()}"
    path = os.path.join(log_dir, f"{name}{suffix}.log")
    root = py_logging.getLogger()
    root.setLevel(py_logging.INFO)
    for h in [h for h in root.handlers if getattr(h, "_tagi_file", False)]:
        root.removeHandler(h)
        h.close()
    handler = py_logging.FileHandler(path)
    handler._tagi_file = True
    handler.setLevel(py_logging.INFO)
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(name)s %(filename)s:%(lineno)d] "
                                              "%(message)s"))
    root.addHandler(handler)
    return path
