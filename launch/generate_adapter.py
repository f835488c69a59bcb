"""Generate a task adapter from an instruction and write it as a PEFT LoRA directory.

    python launch/generate_adapter.py --workdir=DIR --instruction "Sort the numbers." \
        [--examples examples.jsonl] [--method=tagi] --out OUT

`--examples` is a JSONL file of positive examples ({"input": ..., "output": ...} per line), formatted into the
instruction exactly as in training (Tk-Instruct "Definition: ... Positive Example 1 - ..."). OUT receives
`adapter_config.json` + `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained` on the Hugging
Face T5 the backbone came from (`--base_model`, default the config's model.checkpoint) when training left that
backbone as imported; otherwise OUT/backbone receives the trained backbone as a Hugging Face T5 directory, and
it is the base model (`--base_model` is then refused). A model trained with
instruction fusion cannot be represented by a PEFT adapter: this stops with an explanation unless
`--allow_fusion_loss` is given. OUT must not exist yet (or be empty) unless `--overwrite`.
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no oneDNN INFO line on stderr (see launch/train.py)

from absl import flags  # noqa: E402

from tagi_jax import cli  # noqa: E402
from tagi_jax.api import TAGIPredictor  # noqa: E402
from tagi_jax.export import BACKBONE_DIR, check_fusion  # noqa: E402
from tagi_jax.jsonl import iter_jsonl  # noqa: E402


def define_flags(argv) -> flags.FlagValues:
    """A fresh flag set for each call of `main`."""
    fv = flags.FlagValues()
    string, boolean = (functools.partial(f, flag_values=fv) for f in (flags.DEFINE_string, flags.DEFINE_bool))
    string("workdir", None, "A pipeline work directory (launch/train.py --workdir).")
    flags.DEFINE_enum("method", "tagi", ["tagi", "hint"], "Which trained hypernetwork generates the adapter.",
                      flag_values=fv)
    string("instruction", None, "The task definition.")
    string("examples", None, "JSONL file of positive examples {\"input\", \"output\"}.")
    boolean("raw", False, "Use --instruction verbatim (no Tk-Instruct formatting).")
    string("out", None, "Output directory (PEFT adapter).")
    boolean("overwrite", False, "Write into --out even if it already holds files.")
    string("base_model", None, "base_model_name_or_path for adapter_config.json (only for an untrained backbone).")
    boolean("allow_fusion_loss", False, "Export the LoRA part of a fusion model's adapter anyway (it will not "
            "reproduce the model's predictions on its own).")
    return fv


def read_examples(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--examples: file not found: {path}")
    out = []
    for where, ex in iter_jsonl(path):
        if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
            raise ValueError(f"{where}: expected an object with 'input' and 'output'")
        out.append(ex)
    if not out:
        raise ValueError(f"--examples: {path} holds no examples")
    return out


def _check_out(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"--out: {path} is a file, not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise FileExistsError(f"--out: {path} already holds files; pass --overwrite or choose another directory")


def work(args: flags.FlagValues) -> None:
    """What the command does once its flags are parsed."""
    for name in ("workdir", "instruction", "out"):
        if args[name].value is None:
            raise cli.UsageError(f"--{name} is required")
    cli.setup_logging(None, "generate_adapter", args.verbose)
    _check_out(args.out, args.overwrite)
    examples = read_examples(args.examples) if args.examples else None
    predictor = TAGIPredictor.load(args.workdir, args.method)
    if predictor.uses_fusion and not args.allow_fusion_loss:
        check_fusion(True, False, predictor.fusion)  # stop before generating anything
    adapter = predictor.generate_adapter(args.instruction, examples, raw=args.raw)
    out = predictor.save_adapter(args.out, adapter, allow_fusion_loss=args.allow_fusion_loss,
                                 base_model_name_or_path=args.base_model)
    print(f"wrote PEFT adapter to {out}")
    if os.path.isdir(os.path.join(out, BACKBONE_DIR)):
        print(f"  with the student's trained backbone in {os.path.join(out, BACKBONE_DIR)} (its base model): the "
              "adapter reproduces the student on that backbone, not on the imported checkpoint")


def main(argv) -> int:
    """The command; returns its exit status."""
    return cli.command(argv, define_flags, work, __doc__)


if __name__ == "__main__":
    cli.exit_process(main(sys.argv))
