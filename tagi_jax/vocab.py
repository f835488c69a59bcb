"""Vocabularies: SentencePiece from a path (real T5 runs), bytes (tests), or a SentencePiece model trained on
the synthetic suite's own text (the embedded demo).

Why a trained vocabulary for the demo: at byte level every number and word is several tokens, so sequences
are ~4x longer and a small T5 trained from scratch has to learn spelling before it can learn to follow an
instruction; with word-sized pieces the same CPU time buys ~4x more examples and copying a number or word is
a single-token lookup (a T5 of two layers learns to copy distinct tokens in a few hundred steps, bytes in
thousands).
"""
from __future__ import annotations

import io
import os
from typing import Iterable

BYTE = "byte"
TRAINED = "synthetic_spm"  # trained at start on the synthetic suite, kept in the work directory
SPECIAL_IDS = dict(pad_id=0, eos_id=1, unk_id=2, bos_id=-1)  # T5's convention (seqio expects it)
# Always pieces of their own: "21." must end with the same "21" the answer copies.
PUNCTUATION = (".", ",", ":", "-", "?", "!", ";")


def trained_model_path(workdir: str) -> str:
    """Where a run keeps the vocabulary it trained (`data.vocabulary = "synthetic_spm"`)."""
    return os.path.join(workdir, "data", "vocab", "spm.model")


def train_sentencepiece(lines: Iterable[str], path: str, vocab_size: int) -> str:
    """Train a BPE SentencePiece model on `lines` and write it to `path` (atomically).

    Deterministic for the same lines (one thread, no sampling or shuffling), so every host of a multi-host
    run and a resumed run get the same model. Byte fallback keeps any character encodable. BPE rather than
    unigram: on a small corpus unigram keeps splitting frequent words ("D|ef|in|ition"), BPE merges them.
    """
    import sentencepiece as spm

    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise ValueError(f"train_sentencepiece: no text to train {path} on")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=int(vocab_size), model_type="bpe",
        character_coverage=1.0, byte_fallback=True, num_threads=1, shuffle_input_sentence=False,
        input_sentence_size=0, hard_vocab_limit=False, user_defined_symbols=list(PUNCTUATION), minloglevel=2,
        **SPECIAL_IDS)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, path)
    return path


def get_vocabulary(spec: str, workdir: str | None = None):
    """'byte' -> seqio.ByteVocabulary; 'synthetic_spm' -> the model trained in `workdir`; anything else is
    the path of a SentencePiece model."""
    import seqio

    if spec == BYTE:
        return seqio.ByteVocabulary()
    if spec == TRAINED:
        if workdir is None:
            raise ValueError("data.vocabulary='synthetic_spm' needs the run's work directory")
        spec = trained_model_path(workdir)
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data.vocabulary: the run's trained vocabulary is missing: {spec}")
    elif not os.path.isfile(spec):
        raise FileNotFoundError(f"data.vocabulary: SentencePiece model not found: {spec}")
    return seqio.SentencePieceVocabulary(spec)
