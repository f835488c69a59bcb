"""`tagi.instruction_source = "instance"` (IAG): one adapter per example, generated from the example's own text
inside the compiled evaluation step. References: the hypernetwork run on each instruction alone, and the
per-task evaluator (a table row per distinct instruction, generated outside the step), which must decode and
score the same; nothing is cached. Uses tests/test_evaluation.py's tiny model, lengths and batch size."""
import dataclasses
import os

import numpy as np
import pytest

from tagi_jax import features as F
from tagi_jax.eval import adapters as adapters_lib
from tagi_jax.eval import decode as decode_lib
from tagi_jax.eval import generation, rank_classification
from tagi_jax.models import tagi
from test_evaluation import BATCH, LENGTHS, MAX_DECODE, random_tagi

QUESTIONS = [("who wrote hamlet", "shakespeare"), ("capital of france", "paris"), ("largest planet", "jupiter"),
             ("who painted the mona lisa", "leonardo"), ("boiling point of water", "100 c"), ("author of emma", "austen")]


def qa_examples() -> list[dict]:
    """Closed-book QA as the QA tasks render it: the hypernetwork reads the question itself."""
    return [{F.INPUTS: f"question: {q}", F.HYPER_INPUTS: q, F.FULL_INPUTS: f"question: {q}", F.TARGETS: a,
             F.REFERENCES: [a], F.TASK_NAME: "qa_toy", "id": f"q{i}", "answer_choices": [a, "no idea"],
             "label": 0} for i, (q, a) in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def models():
    model, params = random_tagi("prepend", seed=3)
    instance = tagi.TAGI(dataclasses.replace(model.config, instruction_source="instance"))
    return model, instance, params


def test_bad_instruction_source_is_refused():
    model, _ = random_tagi("prepend", seed=3)
    with pytest.raises(ValueError, match="tagi.instruction_source: 'question' is not one of"):
        dataclasses.replace(model.config, instruction_source="question")


def test_in_step_adapters_are_per_example_and_equal_one_at_a_time(models):
    model, instance, params = models
    from tagi_jax.vocab import get_vocabulary

    vocab = get_vocabulary("byte")
    texts = [q for q, _ in QUESTIONS[:3]]
    source = adapters_lib.instance_adapters(instance, params, texts, vocab, LENGTHS["hyper_inputs"])
    tree = source.device_tree()
    rows = np.array([2, 0, 1, 0], np.int32)  # any rows, in any order, repeated
    got, states, mask = decode_lib._gather(tree, rows, instance)
    for i, row in enumerate(rows):
        tokens, _ = decode_lib.tokenize(vocab, [texts[row]], LENGTHS["hyper_inputs"])
        ref, ref_states, ref_mask = tagi.generate_adapters(model, params, tokens)
        for target in ref:
            np.testing.assert_allclose(np.asarray(got[target]["A"][i]), np.asarray(ref[target]["A"][0]), atol=1e-5)
            np.testing.assert_allclose(np.asarray(got[target]["B"][i]), np.asarray(ref[target]["B"][0]), atol=1e-5)
        np.testing.assert_allclose(np.asarray(states[i]), np.asarray(ref_states[0]), atol=1e-5)
        np.testing.assert_array_equal(np.asarray(mask[i]), np.asarray(ref_mask[0]))
    b = np.asarray(got["encoder_self.v"]["B"])
    assert np.abs(b[0] - b[1]).max() > 1e-3  # different questions, different adapters


def test_instance_evaluation_decodes_and_scores_as_the_per_task_table(models, tmp_path):
    model, instance, params = models
    from tagi_jax.vocab import get_vocabulary

    vocab = get_vocabulary("byte")
    examples = qa_examples()
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH)
    cache_dir = str(tmp_path / "cache")
    ref_records, ref = generation.evaluate("tagi", model, params, examples, vocab, max_decode_len=MAX_DECODE,
                                           **kwargs)
    records, got = generation.evaluate("tagi", instance, params, examples, vocab, max_decode_len=MAX_DECODE,
                                       cache=adapters_lib.AdapterCache(cache_dir), **kwargs)
    assert ref["adapters_generated"] == len(examples)  # every question is its own instruction
    assert [r["prediction"] for r in records] == [r["prediction"] for r in ref_records]
    assert len({r["prediction"] for r in records}) > 1  # the adapters change the predictions
    assert got["adapters_generated"] == len(examples) and got["generator_calls"] == 0
    assert not os.path.exists(cache_dir) or not os.listdir(cache_dir)  # nothing cached per example

    _, ref_rank = rank_classification.evaluate_rank_classification("tagi", model, params, examples, vocab, **kwargs)
    _, rank = rank_classification.evaluate_rank_classification("tagi", instance, params, examples, vocab, **kwargs)
    assert rank["accuracy"] == ref_rank["accuracy"]
