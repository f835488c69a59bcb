"""The Python API (tagi_jax.api) and launch/generate_adapter.py on a pipeline work directory.

The work directory is what launch/train.py leaves behind, with random parameters (`make_workdir` from
tests/test_evaluation.py, whose tiny config, lengths and batch size are shared so compiled functions are too).
References: the evaluator (itself checked against TAGI's own decoding path in tests/test_evaluation.py).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tagi_jax import export
from tagi_jax.eval import generation
from tagi_jax.eval import rank_classification
from tagi_jax import features as F
from tagi_jax.api import TAGIPredictor, TaskAdapter, format_input, format_instruction
from tagi_jax.models import lora
from tagi_jax.models.t5_config import tiny_config
from test_evaluation import BATCH, LENGTHS, MAX_DECODE, make_workdir

# Tiny lengths truncate the longer instructions (P3 templates, two-example definitions): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:generate_task_adapters.*truncated:UserWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFINITION = "Sort the numbers in increasing order."
EXAMPLES = [{"input": "3 1 2", "output": "1 2 3"}, {"input": "9 4", "output": "4 9"}]
INPUTS = ["5 4 9", "2 8 1", "7 0", "6 6 1", "3"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    make_workdir(path, "prepend", methods=("tagi", "concat", "no_instruction"))
    return path


@pytest.fixture(scope="module")
def predictor(workdir):
    return TAGIPredictor.load(workdir)


def examples_for(instruction: str, inputs, task: str = "api") -> list[dict]:
    return [{F.INPUTS: format_input(x), F.HYPER_INPUTS: instruction, F.FULL_INPUTS: instruction + format_input(x),
             F.TARGETS: "", F.REFERENCES: [""], F.TASK_NAME: task, "id": str(i), "answer_choices": ["a b", "c"],
             "label": 0} for i, x in enumerate(inputs)]


def test_formatting_is_tk_instruct():
    assert format_instruction(DEFINITION, EXAMPLES) == (
        "Definition: Sort the numbers in increasing order.\n\n"
        " Positive Example 1 -\nInput: 3 1 2.\n Output: 1 2 3.\n\n"
        " Positive Example 2 -\nInput: 9 4.\n Output: 4 9.\n\n")
    assert format_input("5 4 9") == "Now complete the following example -\nInput: 5 4 9.\nOutput: "


def test_generate_predict_score(predictor, workdir):
    adapter = predictor.generate_adapter(DEFINITION, EXAMPLES)
    assert adapter.instruction == format_instruction(DEFINITION, EXAMPLES)
    assert set(adapter.adapters) == set(lora.DEFAULT_TARGETS) and adapter.adapters["encoder_self.q"]["A"].shape == (2, 32, 4)
    assert adapter.states.shape == (LENGTHS["hyper_inputs"], 32)  # the model fuses the instruction

    preds = predictor.predict(INPUTS)  # the last generated adapter by default
    records, _ = generation.evaluate("tagi", predictor.model, predictor.params, examples_for(adapter.instruction, INPUTS),
                                     predictor.vocab, lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)
    assert preds == [r["prediction"] for r in records]

    choices = [["a b", "c"]] * len(INPUTS)
    scores = predictor.score(INPUTS, choices, adapter)
    ranked, _ = rank_classification.evaluate_rank_classification(
        "tagi", predictor.model, predictor.params, examples_for(adapter.instruction, INPUTS), predictor.vocab,
        lengths=LENGTHS, batch_size=BATCH)
    np.testing.assert_allclose(scores, [r["scores"] for r in ranked], atol=1e-5)
    summed = predictor.score(INPUTS[:1], [["a b", "c"]], adapter, length_normalize=False)[0]
    assert summed[0] < scores[0][0]  # a sum over 4 tokens (a, space, b, EOS) is below their mean

    # Generated once: asking again is answered by the cache (memory), and it was written to the work directory.
    files = os.listdir(os.path.join(workdir, "adapter_cache"))
    hits = predictor.cache.memory_hits
    again = predictor.generate_adapter(DEFINITION, EXAMPLES)
    assert predictor.cache.memory_hits == hits + 1 and os.listdir(os.path.join(workdir, "adapter_cache")) == files
    np.testing.assert_array_equal(again.adapters["decoder_cross.v"]["B"], adapter.adapters["decoder_cross.v"]["B"])


def test_save_and_load_adapter(predictor, tmp_path):
    adapter = predictor.generate_adapter(DEFINITION, EXAMPLES)
    with pytest.raises(export.FusionNotExportable, match="instruction fusion"):
        predictor.save_adapter(str(tmp_path / "refused"), adapter)
    with pytest.warns(UserWarning, match="instruction fusion"):
        path = predictor.save_adapter(str(tmp_path / "sort"), adapter, allow_fusion_loss=True)
    assert os.path.isfile(os.path.join(path, export.CONFIG_FILE))
    loaded = predictor.load_adapter(path)
    assert loaded.instruction == adapter.instruction and loaded.source == path
    assert predictor.predict(INPUTS, loaded) == predictor.predict(INPUTS, adapter)


def test_encoder_fusion_model_through_the_api(tmp_path):
    """An encoder-fusion work directory: adapters carry the encoded instruction, predictions are the
    evaluator's, export is refused the same way as for 'prepend', and a saved adapter reloads exactly."""
    workdir = str(tmp_path / "enc_run")
    make_workdir(workdir, "encoder_cross_attention", methods=("tagi",))
    predictor = TAGIPredictor.load(workdir, cache_dir="")
    assert predictor.fusion == "encoder_cross_attention" and predictor.uses_fusion
    adapter = predictor.generate_adapter(DEFINITION, EXAMPLES)
    assert adapter.states.shape == (LENGTHS["hyper_inputs"], 32)
    preds = predictor.predict(INPUTS)
    records, _ = generation.evaluate("tagi", predictor.model, predictor.params,
                                     examples_for(adapter.instruction, INPUTS), predictor.vocab, lengths=LENGTHS,
                                     batch_size=BATCH, max_decode_len=MAX_DECODE)
    assert preds == [r["prediction"] for r in records]
    with pytest.raises(export.FusionNotExportable, match="every encoder layer"):
        predictor.save_adapter(str(tmp_path / "refused"), adapter)
    with pytest.warns(UserWarning, match="instruction fusion"):
        path = predictor.save_adapter(str(tmp_path / "enc"), adapter, allow_fusion_loss=True)
    assert export.read_tagi_info(path)["fusion"] == "encoder_cross_attention"
    assert predictor.predict(INPUTS, predictor.load_adapter(path)) == preds

def test_baselines_through_the_api(workdir):
    concat = TAGIPredictor.load(workdir, "concat")
    task = concat.generate_adapter(DEFINITION, EXAMPLES)
    assert task.adapters is None and task.instruction == format_instruction(DEFINITION, EXAMPLES)
    records, _ = generation.evaluate("concat", concat.model, concat.params, examples_for(task.instruction, INPUTS),
                                     concat.vocab, lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)
    assert concat.predict(INPUTS) == [r["prediction"] for r in records]
    plain = TAGIPredictor.load(workdir, "no_instruction")
    assert len(plain.predict(INPUTS)) == len(INPUTS)  # no instruction needed


def test_bad_input_gives_clear_errors(predictor, workdir, tmp_path):
    with pytest.raises(ValueError, match="unknown method 'tagii'"):
        TAGIPredictor.load(workdir, "tagii")
    with pytest.raises(FileNotFoundError, match="work directory not found"):
        TAGIPredictor.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="method 'hint' has no checkpoint"):
        TAGIPredictor.load(workdir, "hint")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        TAGIPredictor.load(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="instruction is empty"):
        predictor.generate_adapter("   ")
    with pytest.raises(ValueError, match=r"examples\[0\]: expected a dict with 'input' and 'output'"):
        predictor.generate_adapter(DEFINITION, [{"question": "x"}])
    fresh = TAGIPredictor(predictor.config, predictor.model, predictor.params, "tagi", predictor.vocab, LENGTHS,
                          batch_size=BATCH, max_decode_len=MAX_DECODE)
    with pytest.raises(ValueError, match="no adapter; call generate_adapter"):
        fresh.predict(INPUTS)
    with pytest.raises(TypeError, match="a single string"):
        predictor.predict("5 4 9", predictor.generate_adapter(DEFINITION))

    # Adapters of the wrong rank / shape / targets.
    t5 = predictor.model.config.t5
    rng = np.random.RandomState(0)

    def np_adapters(config, rank, targets=lora.DEFAULT_TARGETS):
        out = {}
        for target in targets:
            layers, d_in, d_out = lora.adapter_dims(config, target)
            out[target] = {"A": rng.standard_normal((layers, d_in, rank)).astype(np.float32),
                           "B": rng.standard_normal((layers, rank, d_out)).astype(np.float32), "scale": 2.0}
        return out

    wrong_rank = export.export_peft_adapter(np_adapters(t5, 2), str(tmp_path / "r2"), t5)
    with pytest.raises(export.AdapterFormatError, match="rank r=2 but the model expects rank 4"):
        predictor.load_adapter(wrong_rank)
    other = tiny_config(d_model=48)
    wrong_shape = export.export_peft_adapter(np_adapters(other, 4), str(tmp_path / "d48"), other)
    with pytest.raises(export.AdapterFormatError, match=r"has shape \(4, 48\), expected \[r=4, d_in=32\]"):
        predictor.load_adapter(wrong_shape)
    wrong_targets = export.export_peft_adapter(np_adapters(t5, 4, ("encoder_self.q",)), str(tmp_path / "q"), t5)
    with pytest.raises(export.AdapterFormatError, match="differ from the model's adapter_targets"):
        predictor.load_adapter(wrong_targets)
    no_states = export.export_peft_adapter(np_adapters(t5, 4), str(tmp_path / "nostates"), t5)
    with pytest.raises(ValueError, match="has no encoded instruction"):
        predictor.load_adapter(no_states)
    good = predictor.generate_adapter(DEFINITION)
    bad = TaskAdapter(good.instruction, {**good.adapters, "encoder_self.q": np_adapters(t5, 3, ("encoder_self.q",))["encoder_self.q"]},
                      good.states, good.mask)
    with pytest.raises(ValueError, match=r"adapter\['encoder_self.q'\] has A \(2, 32, 3\).*\(rank 4\)"):
        predictor.predict(INPUTS, bad)
    with pytest.raises(ValueError, match="2 inputs but 1 choice lists"):
        predictor.score(INPUTS[:2], [["a"]], good)


def test_generate_adapter_command_writes_a_peft_directory(workdir, tmp_path):
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    out = tmp_path / "cli_adapter"
    cmd = [sys.executable, os.path.join(REPO, "launch", "generate_adapter.py"), f"--workdir={workdir}",
           "--instruction", DEFINITION, f"--examples={examples}", f"--out={out}"]
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert refused.returncode != 0 and "instruction fusion" in refused.stderr and "--allow_fusion_loss" in refused.stderr
    done = subprocess.run(cmd + ["--allow_fusion_loss"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    info = export.read_tagi_info(str(out))
    assert info["instruction"] == format_instruction(DEFINITION, EXAMPLES) and info["instruction_fusion"] is True
    config = tiny_config()
    adapters = export.load_peft_adapter(str(out), config, rank=4, targets=lora.DEFAULT_TARGETS)
    assert adapters["decoder_self.v"]["A"].shape == (2, 32, 4)
