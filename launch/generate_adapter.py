"""Generate a task adapter from an instruction and write it as a PEFT LoRA directory.

    python launch/generate_adapter.py --workdir=DIR --instruction "Sort the numbers." \
        [--examples examples.jsonl] [--method=tagi] --out OUT

`--examples` is a JSONL file of positive examples ({"input": ..., "output": ...} per line), formatted into the
instruction exactly as in training (Tk-Instruct "Definition: ... Positive Example 1 - ..."). OUT receives
`adapter_config.json` + `adapter_model.safetensors`, loadable with `PeftModel.from_pretrained` on the Hugging
Face T5 the backbone came from (`--base_model`, default the config's model.checkpoint). A model trained with
instruction fusion cannot be represented by a PEFT adapter: this stops with an explanation unless
`--allow_fusion_loss` is given.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from tagi_jax.api import TAGIPredictor  # noqa: E402
from tagi_jax.config import parse_flags_or_exit  # noqa: E402
from tagi_jax.export import FusionNotExportable, check_fusion  # noqa: E402
from tagi_jax.jsonl import iter_jsonl  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A pipeline work directory (launch/train.py --workdir).")
_METHOD = flags.DEFINE_enum("method", "tagi", ["tagi", "hint"], "Which trained hypernetwork generates the adapter.")
_INSTRUCTION = flags.DEFINE_string("instruction", None, "The task definition.")
_EXAMPLES = flags.DEFINE_string("examples", None, "JSONL file of positive examples {\"input\", \"output\"}.")
_RAW = flags.DEFINE_bool("raw", False, "Use --instruction verbatim (no Tk-Instruct formatting).")
_OUT = flags.DEFINE_string("out", None, "Output directory (PEFT adapter).")
_BASE = flags.DEFINE_string("base_model", None, "base_model_name_or_path for adapter_config.json.")
_ALLOW_FUSION_LOSS = flags.DEFINE_bool(
    "allow_fusion_loss", False, "Export the LoRA part of a fusion model's adapter anyway (it will not reproduce "
    "the model's predictions on its own).")
flags.mark_flags_as_required(["workdir", "instruction", "out"])


def read_examples(path: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--examples: file not found: {path}")
    out = []
    for where, ex in iter_jsonl(path):
        if not isinstance(ex, dict) or "input" not in ex or "output" not in ex:
            raise ValueError(f"{where}: expected an object with 'input' and 'output'")
        out.append(ex)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # checkpoint-library chatter off unless asked for (-v 0)
    try:
        examples = read_examples(_EXAMPLES.value) if _EXAMPLES.value else None
        predictor = TAGIPredictor.load(_WORKDIR.value, _METHOD.value)
        if predictor.uses_fusion and not _ALLOW_FUSION_LOSS.value:
            check_fusion(True, False, predictor.fusion)  # stop before generating anything
        adapter = predictor.generate_adapter(_INSTRUCTION.value, examples, raw=_RAW.value)
        out = predictor.save_adapter(_OUT.value, adapter, allow_fusion_loss=_ALLOW_FUSION_LOSS.value,
                                     base_model_name_or_path=_BASE.value)
    except (FusionNotExportable, ValueError, KeyError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote PEFT adapter to {out}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags_or_exit)
