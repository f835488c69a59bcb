"""Set up a run by answering questions: `python launch/init.py [--workdir=DIR --backbone=... --yes --start]`.

Detects the devices, asks for the backbone (a Hugging Face T5 directory, checked with the importer on the spot, or
'none' for the synthetic demo from scratch), the benchmark and its data (the synthetic suite, a natural-instructions
checkout, P3, or your own SNI-format task files), the setting, the methods and a work directory; tokenises a sample
of the data with the backbone's vocabulary, shows a length histogram per feature and proposes lengths covering ~95%;
proposes batch size, microbatches, mesh and remat from a memory estimate; writes DIR/config.py (an ordinary config
file) and DIR/run.sh (the exact launch/train.py command), prints both and offers to start. Every question is also
a flag (`--help` lists them); `--yes` asks nothing (flags, else the proposals), for scripts. Re-running on a DIR
that has a config.py shows it and resumes. A wrong answer is asked again; with `--yes`, it is one
`error: --flag: ...` line, exit status 2, and nothing is written. Examples:

    python launch/init.py
    python launch/init.py --yes --workdir=runs/demo --backbone=none --benchmark=synthetic --start
    python launch/init.py --yes --workdir=runs/mine --backbone=/ckpt/t5-base-lm-adapt --benchmark=tasks \\
        --tasks_dir=my_tasks/ --methods=tagi,concat
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no oneDNN INFO line on stderr (see launch/train.py)

from absl import flags  # noqa: E402

from tagi_jax import cli  # noqa: E402
from tagi_jax import init_wizard  # noqa: E402

_START: list[str] = []  # the run script to start once the command's own work has finished cleanly


def define_flags(argv) -> flags.FlagValues:
    """A fresh flag set for each call of `main`: every question of the questionnaire, plus --yes and --start."""
    del argv
    fv = flags.FlagValues()
    init_wizard.define_flags(fv)
    return fv


def work(args: flags.FlagValues) -> None:
    """What the command does once its flags are parsed."""
    cli.setup_logging(None, "init", args.verbose)
    given = {name: args[name].value for name in init_wizard.QUESTIONS}
    given.update(start=args.start, compile_check=args.compile_check)
    run_script, start = init_wizard.run(given, interactive=not args.yes)
    if start:
        _START.append(run_script)


def main(argv) -> int:
    """The command; returns its exit status."""
    return cli.command(argv, define_flags, work, __doc__)


if __name__ == "__main__":
    status = main(sys.argv)
    if status == 0 and _START:
        sys.stdout.flush()
        # The training replaces this process: its exit status, signals (preemption) and console are the run's own.
        os.execvp("bash", ["bash", _START[0]])
    cli.exit_process(status)
