"""The feature contract across every registry: identical output features and, converted, identical model features.

Each registry (SNI, synthetic, P3 evaluation, pretraining) is registered with small settings while the network
is refused; every task and mixture it adds (recorded from SeqIO's registries, whatever names it chose) is then
checked. A registry whose module is not there yet is skipped with the reason.
"""
import importlib
import socket

import numpy as np
import pytest
import seqio
import tensorflow as tf

from tagi_jax.data import feature_converter as fc
from tagi_jax import features as F
from tagi_jax.vocab import get_vocabulary

BYTE = get_vocabulary("byte")
LENGTHS = {"inputs": 64, "hyper_inputs": 128, "full_inputs": 192, "targets": 16}


def _sni(mod, shared, tmp):
    return mod.register_sni(str(shared / "sni_sample"), BYTE, prefix="contract_sni")


def _synthetic(mod, shared, tmp):
    return mod.register_synthetic(BYTE, num_train_tasks=6, num_unseen_tasks=3, train_instances_per_task=3,
                                  eval_instances_per_task=3, prefix="contract_syn")


def _p3(mod, shared, tmp):
    return mod.register_p3_eval(str(shared / "promptsource_templates"), str(shared / "p3_eval"), BYTE,
                                datasets=["cb"], mixture_name="contract_p3")


def _pretrain(mod, shared, tmp):
    docs = tmp / "pretrain_docs"
    docs.mkdir()
    words = " ".join(f"word{i}" for i in range(40))
    (docs / "a.txt").write_text(f"{words}\n\nsecond {words}\n")
    return mod.register_pretrain(str(docs), BYTE)


REGISTRIES = {
    "sni": ("tasks.sni", "register_sni", _sni),
    "synthetic": ("tasks.synthetic.register", "register_synthetic", _synthetic),
    "p3": ("tasks.p3.register", "register_p3_eval", _p3),
    "pretrain": ("tasks.pretrain", "register_pretrain", _pretrain),
}


def _refuse_network(*args, **kwargs):
    raise AssertionError("a registry touched the network at import or registration time")


@pytest.fixture(scope="module")
def registered(shared_data, tmp_path_factory):
    """{registry: (task names, mixture names)} for every registry module present; network refused."""
    mp = pytest.MonkeyPatch()
    added = {"task": [], "mixture": []}
    for registry, kind in ((seqio.TaskRegistry, "task"), (seqio.MixtureRegistry, "mixture")):
        original = registry.add.__func__

        def recording(cls, name, *args, _original=original, _kind=kind, **kwargs):
            added[_kind].append(name)
            return _original(cls, name, *args, **kwargs)

        mp.setattr(registry, "add", classmethod(recording))
    mp.setattr(socket.socket, "connect", _refuse_network)
    mp.setattr(socket, "create_connection", _refuse_network)
    out = {}
    try:
        for key, (module, function, register) in REGISTRIES.items():
            try:
                mod = importlib.import_module(module)
            except ModuleNotFoundError:
                out[key] = f"{module} not found"
                continue
            if not hasattr(mod, function):
                out[key] = f"{module}.{function} not found"
                continue
            added["task"].clear()
            added["mixture"].clear()
            register(mod, shared_data, tmp_path_factory.mktemp(key))
            out[key] = (list(dict.fromkeys(added["task"])), list(dict.fromkeys(added["mixture"])))
    finally:
        mp.undo()
    return out


def _providers(registered, key):
    entry = registered[key]
    if isinstance(entry, str):
        pytest.skip(entry)
    tasks, mixtures = entry
    assert tasks, f"{key}: registered no task"
    return tasks, mixtures


def _signature(provider):
    """Comparable description of a provider's output features."""
    out = {}
    for name, feat in provider.output_features.items():
        vocab = feat.vocabulary
        out[name] = (type(vocab).__name__, vocab.vocab_size, vocab.eos_id, vocab.pad_id, feat.add_eos,
                     feat.dtype, feat.rank)
    return out


REFERENCE_SIGNATURE = {
    name: ("ByteVocabulary", BYTE.vocab_size, 1, 0, True, tf.int32, 1) for name in F.TEXT_FEATURES
}


def _split_of(provider):
    if isinstance(provider, seqio.Mixture):
        common = set.intersection(*(set(t.splits) for t in provider.tasks))
        assert common, f"mixture {provider.name}: its tasks share no split"
        return sorted(common)[0]
    return provider.splits[0]


def _check_raw_spec(name, split, spec):
    for feat in F.TEXT_FEATURES:
        assert spec[feat].dtype == tf.int32 and spec[feat].shape.rank == 1, (name, feat)
        assert spec[feat + "_pretokenized"] == tf.TensorSpec((), tf.string), (name, feat)
    assert spec[F.TASK_NAME] == tf.TensorSpec((), tf.string), name
    if F.REFERENCES in spec:
        assert spec[F.REFERENCES].dtype == tf.string and spec[F.REFERENCES].shape.rank == 1, name


EXPECTED_MODEL_SPEC = {
    **{name: tf.TensorSpec((LENGTHS[key],), tf.int32) for name, key in F.MODEL_FEATURE_LENGTH_KEY.items()},
    F.TASK_ID: tf.TensorSpec((), tf.int32),
}


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_output_features_identical(registered, key):
    tasks, mixtures = _providers(registered, key)
    for name in tasks + mixtures:
        provider = seqio.get_mixture_or_task(name)
        assert _signature(provider) == REFERENCE_SIGNATURE, name


@pytest.mark.parametrize("key", sorted(REGISTRIES))
def test_model_features_identical_after_conversion(registered, key):
    tasks, mixtures = _providers(registered, key)
    # Every provider's specs are checked (tracing only); examples are read from a few of each registry
    # (first and last task, every mixture) to keep the test fast.
    read = {tasks[0], tasks[-1], *mixtures}
    for name in tasks + mixtures:
        provider = seqio.get_mixture_or_task(name)
        split = _split_of(provider)
        conv = fc.TagiFeatureConverter(task_names=tasks)
        if isinstance(provider, seqio.Task):
            raw = provider.get_dataset(LENGTHS, split=split, shuffle=False, num_epochs=1,
                                       trim_output_features=False)
            _check_raw_spec(name, split, raw.element_spec)
            ds = conv(raw, LENGTHS)
        else:
            ds = fc.get_model_dataset(provider, LENGTHS, conv, split=split)
        assert ds.element_spec == EXPECTED_MODEL_SPEC, name
        if name not in read:
            continue
        ex = next(ds.as_numpy_iterator(), None)
        assert ex is not None, f"{name}: split {split!r} is empty"
        assert np.any(ex[F.DECODER_LOSS_WEIGHTS]) and ex[F.ENCODER_INPUT_TOKENS][0] != 0, name
        if isinstance(provider, seqio.Task):
            # task_name names the example's task: the registered name, or for the synthetic suite's union of
            # its seen tasks (one SeqIO task for training) the member task the instance belongs to.
            own = next(raw.as_numpy_iterator())[F.TASK_NAME].decode()
            assert own == name or (name.endswith("_seen_tasks") and own in tasks), (name, own)
            assert ex[F.TASK_ID] == tasks.index(own), name
            if F.REFERENCES in raw.element_spec:  # the evaluation passthrough works too
                conv = fc.TagiFeatureConverter(keep_pretokenized=True, keep_references=True)
                ev = next(conv(raw, LENGTHS).as_numpy_iterator())
                assert len(ev[F.REFERENCES]) >= 1 and ev[F.TASK_NAME].decode() == name


def test_all_registries_agree(registered):
    present = [k for k, v in registered.items() if not isinstance(v, str)]
    assert "sni" in present
    signatures = {k: _signature(seqio.get_mixture_or_task(registered[k][0][0])) for k in present}
    assert all(sig == signatures["sni"] for sig in signatures.values()), signatures
