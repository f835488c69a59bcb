"""TagiFeatureConverter: shapes, shifting, loss weights, truncation (kept EOS, counted), task ids, batching."""
import numpy as np
import pytest
import seqio

from tagi_jax.data import feature_converter as fc
from tagi_jax import features as F
from tagi_jax.vocab import get_vocabulary
from tasks.common import function_source, register_task

BYTE = get_vocabulary("byte")
EOS = 1
LENGTHS = {"inputs": 12, "hyper_inputs": 16, "full_inputs": 24, "targets": 6}


def _example(i, task, n_in, n_target):
    inputs = "abcdefghijklmnopqrstuvwxyz"[:n_in]
    return {
        F.INPUTS: inputs,
        F.HYPER_INPUTS: f"rule {task}",
        F.FULL_INPUTS: f"rule {task} {inputs}",
        F.TARGETS: "xyz0123456789"[:n_target],
        F.TASK_NAME: task,
        F.REFERENCES: ["xyz0123456789"[:n_target], f"alt{i}"],
    }


# inputs lengths (chars; +1 EOS token): 5, 11 (fits exactly: 12), 12 (13 > 12), 20; targets 2, 5, 6, 9.
EXAMPLES = {
    "fc_a": [_example(0, "fc_a", 5, 2), _example(1, "fc_a", 11, 5)],
    "fc_b": [_example(2, "fc_b", 12, 6), _example(3, "fc_b", 20, 9)],
}


@pytest.fixture(scope="module")
def registered():
    for name, exs in EXAMPLES.items():
        source = function_source(lambda split, _exs=exs: _exs, splits=("train", "validation"))
        register_task(name, source, BYTE)
    # Concatenation, not SeqIO's default sampling (which stops at the first exhausted task): exact counts.
    if "fc_mix" in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove("fc_mix")
    seqio.MixtureRegistry.add("fc_mix", [(n, 1.0) for n in EXAMPLES],
                              sample_fn=lambda datasets, rates, seed: datasets[0].concatenate(datasets[1]))
    return list(EXAMPLES)


def _all(ds):
    return list(ds.as_numpy_iterator())


def _convert_task(name, converter, split="train", lengths=LENGTHS):
    return _all(fc.get_model_dataset(name, lengths, converter, split=split))


def _tokens(text):
    return BYTE.encode(text) + [EOS]


def _padded(tokens, length):
    return np.array(tokens + [0] * (length - len(tokens)), np.int32)


def test_shapes_dtypes_values(registered):
    conv = fc.TagiFeatureConverter(task_names=["fc_b", "fc_a"])
    out = _convert_task("fc_a", conv)
    assert len(out) == 2
    assert set(out[0]) == set(F.MODEL_FEATURES)
    ex, raw = out[0], EXAMPLES["fc_a"][0]
    for name, key in F.MODEL_FEATURE_LENGTH_KEY.items():
        assert ex[name].shape == (LENGTHS[key],) and ex[name].dtype == np.int32, name
    assert ex[F.TASK_ID].shape == () and ex[F.TASK_ID].dtype == np.int32
    np.testing.assert_array_equal(ex[F.ENCODER_INPUT_TOKENS], _padded(_tokens(raw[F.INPUTS]), 12))
    np.testing.assert_array_equal(ex[F.HYPER_ENCODER_INPUT_TOKENS], _padded(_tokens(raw[F.HYPER_INPUTS]), 16))
    np.testing.assert_array_equal(ex[F.FULL_ENCODER_INPUT_TOKENS], _padded(_tokens(raw[F.FULL_INPUTS]), 24))
    target = _tokens(raw[F.TARGETS])                  # 2 chars + EOS
    np.testing.assert_array_equal(ex[F.DECODER_TARGET_TOKENS], _padded(target, 6))
    # The padded targets shifted right by one, start id 0 (T5X): [0, t0, t1, EOS, 0, 0].
    np.testing.assert_array_equal(ex[F.DECODER_INPUT_TOKENS], _padded([0] + target, 6))
    np.testing.assert_array_equal(ex[F.DECODER_LOSS_WEIGHTS], [1, 1, 1, 0, 0, 0])
    assert ex[F.TASK_ID] == 1  # position of "fc_a" in task_names


def test_truncation_keeps_eos_and_is_counted(registered, monkeypatch):
    warnings = []
    monkeypatch.setattr(fc.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    conv = fc.TagiFeatureConverter()
    out = _convert_task("fc_a", conv) + _convert_task("fc_b", conv)
    for ex, raw in zip(out, EXAMPLES["fc_a"] + EXAMPLES["fc_b"]):
        full = _tokens(raw[F.INPUTS])
        enc = list(ex[F.ENCODER_INPUT_TOKENS])
        if len(full) <= 12:
            assert enc == full + [0] * (12 - len(full))
        else:
            assert enc == full[:11] + [EOS]
        tgt = _tokens(raw[F.TARGETS])
        expect = tgt if len(tgt) <= 6 else tgt[:5] + [EOS]
        assert list(ex[F.DECODER_TARGET_TOKENS]) == expect + [0] * (6 - len(expect))
        assert list(ex[F.DECODER_LOSS_WEIGHTS]) == [1] * len(expect) + [0] * (6 - len(expect))
    counts = conv.truncation_counts
    # inputs 13 and 21 tokens > 12; targets 7 and 10 tokens > 6; full_inputs "rule fc_b " + 20 = 31 > 24.
    assert counts == {
        "inputs": {"examples": 4, "truncated": 2},
        "hyper_inputs": {"examples": 4, "truncated": 0},
        "full_inputs": {"examples": 4, "truncated": 1},
        "targets": {"examples": 4, "truncated": 2},
    }
    assert any("inputs 1/" in w for w in warnings), warnings  # reported as it happens
    warnings.clear()
    assert conv.log_truncation() == counts
    assert any("inputs 2/4" in w and "targets 2/4" in w for w in warnings), warnings
    conv.reset_truncation_counts()
    assert conv.truncation_counts["inputs"] == {"examples": 0, "truncated": 0}


def test_truncation_report_agrees_with_converter(registered):
    conv = fc.TagiFeatureConverter()
    _convert_task("fc_mix", conv)
    ds = seqio.get_mixture_or_task("fc_mix").get_dataset(None, split="train", shuffle=False, num_epochs=1)
    report = fc.truncation_report(ds, LENGTHS)
    assert {k: {"examples": v["examples"], "truncated": v["truncated"]} for k, v in report.items()} == (
        conv.truncation_counts)
    assert report["inputs"]["longest"] == 21 and report["inputs"]["limit"] == 12


def test_features_already_trimmed_by_seqio_get_eos_back_and_are_counted(registered):
    # seqio.get_dataset trims after EOS was appended, so the EOS is lost: the converter notices and repairs.
    conv = fc.TagiFeatureConverter()
    ds = seqio.get_dataset("fc_b", LENGTHS, conv, dataset_split="train", shuffle=False)
    out = _all(ds)
    for ex, raw in zip(out, EXAMPLES["fc_b"]):
        assert list(ex[F.ENCODER_INPUT_TOKENS]) == _tokens(raw[F.INPUTS])[:11] + [EOS]
    assert conv.truncation_counts["inputs"] == {"examples": 2, "truncated": 2}


def test_packing_refused():
    with pytest.raises(ValueError, match="packing is not supported.*own generated adapter"):
        fc.TagiFeatureConverter(pack=True)


def test_task_id_lookup_through_mixture(registered):
    conv = fc.TagiFeatureConverter(task_names=["other", "fc_b"])
    out = _convert_task("fc_mix", conv)
    assert len(out) == 4
    ids = sorted(int(ex[F.TASK_ID]) for ex in out)
    assert ids == [-1, -1, 1, 1]  # fc_a is unknown
    out = _convert_task("fc_mix", fc.TagiFeatureConverter())
    assert all(int(ex[F.TASK_ID]) == -1 for ex in out)
    with pytest.raises(ValueError, match="duplicates"):
        fc.TagiFeatureConverter(task_names=["a", "a"])


def test_passthrough_for_evaluation(registered):
    conv = fc.TagiFeatureConverter(task_names=["fc_a"], keep_pretokenized=True, keep_references=True)
    out = _convert_task("fc_mix", conv, split="validation")
    assert len(out) == 4
    for ex in out:
        task = ex[F.TASK_NAME].decode()
        raw = next(r for r in EXAMPLES[task] if r[F.INPUTS] == ex["inputs_pretokenized"].decode())
        for name in F.TEXT_FEATURES:
            assert ex[name + "_pretokenized"].decode() == raw[name]
        assert [r.decode() for r in ex[F.REFERENCES]] == raw[F.REFERENCES]
    with pytest.raises(ValueError, match="references.*only evaluation splits"):
        _convert_task("fc_a", conv, split="train")


def test_missing_task_name_is_a_clear_error(registered):
    ds = seqio.get_mixture_or_task("fc_mix").get_dataset(LENGTHS, split="train", shuffle=False, num_epochs=1)
    with pytest.raises(ValueError, match="no 'task_name'.*get_model_dataset"):
        fc.TagiFeatureConverter()(ds, LENGTHS)


@pytest.mark.parametrize("lengths, match", [
    ({"inputs": 8, "hyper_inputs": 8, "full_inputs": 8}, "targets"),
    ({**LENGTHS, "targets": 1}, r"task_feature_lengths\['targets'\] must be an int >= 2"),
    ({**LENGTHS, "inputs": "8"}, r"task_feature_lengths\['inputs'\]"),
])
def test_bad_lengths(registered, lengths, match):
    with pytest.raises(ValueError, match=match):
        fc.get_model_dataset("fc_a", lengths, fc.TagiFeatureConverter())


def test_numpy_batches_deterministic_resumable(registered):
    def batches(**kw):
        conv = fc.TagiFeatureConverter(task_names=list(EXAMPLES), keep_pretokenized=True)
        ds = fc.get_model_dataset("fc_mix", LENGTHS, conv, split="train", num_epochs=3)
        return list(fc.to_numpy_batches(ds, **kw))

    full = batches(batch_size=5)
    assert len(full) == 2  # 12 examples, drop_remainder
    shapes = fc.model_feature_shapes(LENGTHS, 5)
    for b in full:
        for name, (shape, dtype) in shapes.items():
            assert b[name].shape == shape and b[name].dtype == dtype
        assert isinstance(b[F.TASK_NAME], list) and isinstance(b[F.TASK_NAME][0], str)
    again = batches(batch_size=5)
    for a, b in zip(full, again):
        for name in shapes:
            np.testing.assert_array_equal(a[name], b[name])
    resumed = batches(batch_size=5, start_batch=1)
    assert len(resumed) == 1
    for name in shapes:
        np.testing.assert_array_equal(resumed[0][name], full[1][name])
    assert [len(b[F.TASK_ID]) for b in batches(batch_size=5, drop_remainder=False)] == [5, 5, 2]
    with pytest.raises(ValueError, match="batch_size"):
        next(fc.to_numpy_batches(None, 0))


def test_references_batch_as_lists(registered):
    conv = fc.TagiFeatureConverter(keep_references=True)
    ds = fc.get_model_dataset("fc_a", LENGTHS, conv, split="validation")
    (batch,) = list(fc.to_numpy_batches(ds, 2))
    assert batch[F.REFERENCES] == [ex[F.REFERENCES] for ex in EXAMPLES["fc_a"]]
