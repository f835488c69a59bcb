"""Hypernetwork pretraining task: a | b | c cuts are deterministic per document, seeded, and lossless."""
import importlib
import json
import random
import socket

import pytest
import seqio

from tagi_jax import features as F
from tagi_jax.vocab import get_vocabulary
from tasks import common, pretrain

VOCAB = get_vocabulary("byte")


def _doc(rng: random.Random, n_words: int) -> str:
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 7))) for _ in range(n_words)]
    seps = [rng.choice([" ", "  ", "\n", "\t", " \n\n "]) for _ in range(n_words - 1)]
    return "".join(w + s for w, s in zip(words, seps + [""]))


def test_cut_reconstructs_the_document_modulo_whitespace():
    rng = random.Random(0)
    for _ in range(50):
        doc = _doc(rng, rng.randint(16, 120))
        a, b, c = pretrain.cut_document(doc, seed=3)
        assert a and b and c
        assert f"{a} {b} {c}".split() == doc.split()
        # each part is a verbatim slice of the document (inner whitespace kept), cut between words
        for part in (a, b, c):
            assert part in doc and part == part.strip()


def test_cut_is_deterministic_per_document_and_seed():
    rng = random.Random(1)
    docs = [_doc(rng, 80) for _ in range(20)]
    first = [pretrain.cut_document(d, seed=0) for d in docs]
    # same seed, any order: the same cuts
    assert [pretrain.cut_document(d, seed=0) for d in reversed(docs)] == first[::-1]
    # another seed cuts (some) documents differently
    other = [pretrain.cut_document(d, seed=1) for d in docs]
    assert sum(x != y for x, y in zip(first, other)) >= 10


def test_fractions_and_limits():
    doc = " ".join(f"w{i}" for i in range(100))
    config = pretrain.CutConfig(min_words=10, a_fraction=(0.3, 0.4), b_fraction=(0.1, 0.2))
    for seed in range(30):
        a, b, c = pretrain.cut_document(doc, seed, config)
        assert 30 <= len(a.split()) <= 40 and 10 <= len(b.split()) <= 20
        assert len(c.split()) == 100 - len(a.split()) - len(b.split())
    assert pretrain.cut_document(" ".join(["x"] * 9), 0, config) is None       # too short
    assert pretrain.cut_document(" ".join(["x"] * 10), 0, config) is not None
    capped = pretrain.CutConfig(min_words=10, max_words=20)
    a, b, c = pretrain.cut_document(doc, 0, capped)
    assert f"{a} {b} {c}".split() == doc.split()[:20]


def test_minimal_documents_keep_a_word_in_each_part():
    config = pretrain.CutConfig(min_words=3, a_fraction=(0.01, 0.02), b_fraction=(0.01, 0.02))
    for seed in range(10):
        assert pretrain.cut_document("one two three", seed, config) == ("one", "two", "three")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"min_words": 2}, "min_words must be >= 3"),
        ({"a_fraction": (0.6, 0.5)}, "a_fraction must satisfy"),
        ({"a_fraction": (0.2, 0.6), "b_fraction": (0.2, 0.4)}, "a_fraction\\[1\\] \\+ b_fraction\\[1\\]"),
        ({"min_words": 20, "max_words": 10}, "max_words"),
    ],
)
def test_bad_config_names_the_key(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pretrain.register_pretrain(str(tmp_path), VOCAB, name="pretrain_bad", **kwargs)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a directory; use 'tfds:<name>'"):
        pretrain.register_pretrain(str(tmp_path / "nope"), VOCAB, name="pretrain_bad")
    with pytest.raises(ValueError, match="give the TFDS version"):
        pretrain.register_pretrain("tfds:wikipedia/en", VOCAB, name="pretrain_bad")
    (tmp_path / "x.jsonl").write_text('{"txt": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: missing string field 'text'"):
        list(pretrain.iter_documents([str(tmp_path / "x.jsonl")]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(7)
    docs = [_doc(rng, rng.randint(20, 60)).replace("\n", " ") for _ in range(6)]
    with open(root / "a.jsonl", "w") as f:
        for d in docs[:4] + ["too short"]:
            f.write(json.dumps({"text": d}) + "\n")
    (root / "b.txt").write_text(f"{docs[4]}\n\n\ntiny\n\n{docs[5]}\n")
    (root / "validation").mkdir()
    (root / "validation" / "v.txt").write_text(docs[0])
    return root, docs


def _rows(task, split):
    return list(task.get_dataset(sequence_length=None, split=split, shuffle=False).as_numpy_iterator())


def _words(text: str) -> list[str]:
    return text.split()


def test_registered_task_cuts_each_document_into_contiguous_parts(corpus):
    """Without sequence lengths (evaluation reads), one example per document: a, b and c are consecutive runs
    of its words covering all of them, each within its share, and full_inputs is a + " " + b."""
    root, docs = corpus
    task = pretrain.register_pretrain(str(root), VOCAB, name="pretrain_test", seed=5,
                                      splits=("train", "validation"))
    assert set(task.output_features) == set(common.output_features(VOCAB))
    rows = _rows(task, "train")
    assert len(rows) == 6  # "too short" and "tiny" skipped; .jsonl then .txt, sorted by name
    for row, doc in zip(rows, docs):
        a, b, c = (row[f"{name}_pretokenized"].decode() for name in (F.HYPER_INPUTS, F.INPUTS, F.TARGETS))
        assert _words(a) + _words(b) + _words(c) == _words(doc)
        n = len(_words(doc))
        assert 0.2 * n - 1 <= len(_words(a)) <= 0.5 * n + 1 and 0.2 * n - 1 <= len(_words(b)) <= 0.4 * n + 1
        assert a in doc and b in doc and c in doc  # inner whitespace kept
        assert row[F.FULL_INPUTS + "_pretokenized"].decode() == f"{a} {b}"
        assert row[F.TASK_NAME] == b"pretrain"
        assert list(row[F.TARGETS]) == list(VOCAB.encode(c)) + [VOCAB.eos_id]
        assert F.REFERENCES not in row
    val = _rows(task, "validation")
    assert len(val) == 1 and list(val[0][F.REFERENCES]) == [val[0]["targets_pretokenized"]]
    # same document, same seed -> same cut in every split
    assert val[0]["targets_pretokenized"] == rows[0]["targets_pretokenized"]
    other = pretrain.register_pretrain(str(root), VOCAB, name="pretrain_test_seed", seed=6)
    assert [r["targets_pretokenized"] for r in _rows(other, "train")] != [r["targets_pretokenized"] for r in rows]


LENGTHS = {F.HYPER_INPUTS: 40, F.INPUTS: 24, F.TARGETS: 12, F.FULL_INPUTS: 56}


def test_long_documents_are_windowed_so_no_part_is_truncated(tmp_path):
    """With training lengths, a long document becomes consecutive windows: every part fits its feature (byte
    vocabulary: one token per byte, plus EOS), c starts at the word after b's last and b after a's, and the
    windows follow each other through the document (so c always continues b, as in HINT's pretraining)."""
    rng = random.Random(3)
    doc = " ".join("".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 7))) for _ in range(400))
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": doc}) + "\n")
    task = pretrain.register_pretrain(str(tmp_path), VOCAB, name="pretrain_windows", seed=1, min_words=4)
    rows = list(task.get_dataset(sequence_length=LENGTHS, split="train", shuffle=False).as_numpy_iterator())
    assert len(rows) >= 10  # 400 words of ~5 bytes in windows of at most 66 bytes
    words, position = _words(doc), 0
    for row in rows:
        parts = [row[f"{name}_pretokenized"].decode() for name in (F.HYPER_INPUTS, F.INPUTS, F.TARGETS)]
        for name, part in zip((F.HYPER_INPUTS, F.INPUTS, F.TARGETS), parts):
            assert part and len(part.encode()) <= LENGTHS[name] - 1, (name, part)
        assert len(row[F.FULL_INPUTS + "_pretokenized"]) <= LENGTHS[F.FULL_INPUTS] - 1
        run = _words(parts[0]) + _words(parts[1]) + _words(parts[2])
        start = words.index(run[0], position)
        assert words[start:start + len(run)] == run  # a | b | c contiguous in the document
        assert start - position <= 8  # at most a few words skipped between windows (a fitted to its length)
        position = start + len(run)
        # The tokenised features hold every token of their part: nothing was cut off by the lengths.
        assert list(row[F.TARGETS]) == list(VOCAB.encode(parts[2])) + [VOCAB.eos_id]
        assert list(row[F.INPUTS]) == list(VOCAB.encode(parts[1])) + [VOCAB.eos_id]
    assert len(words) - position < 66  # the windows reach the document's end


def test_registration_touches_neither_network_nor_tfds(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("network or TFDS access at import/registration time")

    monkeypatch.setattr(socket.socket, "connect", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)
    importlib.reload(pretrain)  # import time too
    import tensorflow_datasets as tfds

    monkeypatch.setattr(tfds, "builder", forbidden)
    monkeypatch.setattr(tfds, "load", forbidden)
    task = pretrain.register_pretrain("tfds:c4/en", VOCAB, name="pretrain_c4_lazy", splits=("train", "validation"))
    assert task.splits == ("train", "validation")
    assert "c4/en:3.1.0" in repr(seqio.get_mixture_or_task("pretrain_c4_lazy").source)
