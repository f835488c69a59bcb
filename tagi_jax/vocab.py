"""Vocabularies: SentencePiece from a path (real T5 runs) or bytes (embedded default and tests)."""
from __future__ import annotations

import os


def get_vocabulary(spec: str):
    """'byte' -> seqio.ByteVocabulary; anything else is the path of a SentencePiece model."""
    import seqio

    if spec == "byte":
        return seqio.ByteVocabulary()
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"data.vocabulary: SentencePiece model not found: {spec}")
    return seqio.SentencePieceVocabulary(spec)
