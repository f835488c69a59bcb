"""The vocabulary trained on the synthetic suite (the demo's): pieces, determinism, errors, pipeline wiring."""
from __future__ import annotations

import pytest

from tagi_jax.run import defaults as run_defaults
from tagi_jax import features as F
from tagi_jax import vocab as V
from tasks.synthetic import operations as ops
from tasks.synthetic import suite as S


@pytest.fixture(scope="module")
def suite():
    return S.suite_for(0, 60, 12, 20, 5)


@pytest.fixture(scope="module")
def trained(suite, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("spm") / "spm.model")
    V.train_sentencepiece(S.vocabulary_text(suite, 0), path, 1024)
    return path, V.get_vocabulary(path)


def test_every_atom_is_one_piece_and_punctuation_stands_alone(trained):
    _, vocab = trained
    words = list(ops.LEXICON) + list(ops.LABEL_WORDS) + [str(n) for n in range(100)]
    assert [w for w in words if len(vocab.encode(w)) != 1] == []
    # The last item of an instance ends with "." in the input; the answer must copy the same piece.
    assert vocab.encode("7 32 21.")[:3] == vocab.encode("7 32 21")
    assert vocab.decode(vocab.encode("add the word web at the start.")) == "add the word web at the start."


def test_special_ids_follow_t5_and_unknown_text_round_trips(trained):
    _, vocab = trained
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
    assert vocab.vocab_size == 1024
    text = "Ünïcode zebra 12345 ~"  # never in the corpus: byte fallback, no <unk>
    assert vocab.decode(vocab.encode(text)) == text


def test_unseen_task_text_is_not_read(suite):
    lines = S.vocabulary_text(suite, 2)
    for task in suite.unseen_tasks:
        assert not any(task.definition in line for line in lines), task.name


def test_training_is_deterministic_and_sequences_are_short(suite, trained, tmp_path):
    path, vocab = trained
    again = V.train_sentencepiece(S.vocabulary_text(suite, 0), str(tmp_path / "again.model"), 1024)
    assert open(again, "rb").read() == open(path, "rb").read()
    longest = {k: 0 for k in F.TEXT_FEATURES}
    for task in suite.tasks:
        for inst in task.instances(ops.TEST, 3, seed=0):
            ex = S.format_example(task, inst, 0)
            for k in longest:
                longest[k] = max(longest[k], len(vocab.encode(ex[k])))
    # configs/demo.py's lengths (EOS added by the converter).
    assert longest[F.INPUTS] < 20 and longest[F.HYPER_INPUTS] < 32 and longest[F.FULL_INPUTS] < 48
    assert longest[F.TARGETS] < 12


def test_trained_vocabulary_errors_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.vocabulary"):
        V.get_vocabulary(V.TRAINED, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="data.vocabulary"):
        V.get_vocabulary(str(tmp_path / "missing.model"))
    with pytest.raises(ValueError, match="no text"):
        V.train_sentencepiece(["", "  "], str(tmp_path / "x.model"), 64)


def test_pipeline_rejects_trained_vocabulary_off_the_synthetic_suite_and_too_few_embeddings():
    from configs import demo
    from tagi_jax.config import ConfigError

    c = demo.get_config()
    c.model.vocab_size = 512
    with pytest.raises(ConfigError, match="data.synthetic.vocab_size"):
        run_defaults.validate(c)
    c = demo.get_config()
    c.data.benchmark = "sni"
    with pytest.raises(ConfigError, match="data.vocabulary"):
        run_defaults.validate(c)
