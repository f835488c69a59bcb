"""Hypernetwork pretraining task (stage 1): plain text cut into a | b | c, registered as one SeqIO task.

The hypernetwork reads a, the adapted model reads b and predicts c; documents come from TFDS or local files.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import os
import random
import re
from typing import Iterable, Sequence

import numpy as np
import seqio
import tensorflow as tf

from tagi_jax import features as F
from tagi_jax.jsonl import iter_jsonl
from tasks import common

TASK_NAME = "pretrain"
DEFAULT_TFDS_VERSIONS = {"c4/en": "3.1.0"}  # 'tfds:c4/en' means TFDS's current c4/en; pin others explicitly
EVAL_SPLITS = ("validation", "test")
_WORD = re.compile(r"\S+")
_BLANK_LINES = re.compile(r"\n\s*\n")


# Each document is cut at two random word boundaries: the hypernetwork reads a (`hyper_inputs`), the adapted
# model reads b (`inputs`) and predicts c (`targets`); `full_inputs` = a + " " + b (what an instruction-
# concatenation model would read), `task_name` = "pretrain". The cut points come from an RNG seeded with
# (seed, text), so a document is cut the same way whatever its position, shard or epoch, and a different seed
# cuts differently. Text inside each part keeps its original whitespace; joining the parts with single spaces
# gives back the text up to whitespace at the two cuts and its ends.
#
# With sequence lengths (training), as HINT does, a document's token stream is first split into consecutive
# windows that fit the lengths, and each window is cut: every part fits its feature, so no part is truncated
# and c always continues b (cutting a whole long document by word fractions and truncating each part would
# leave a gap between b's kept start and c). A long C4 document gives several examples.


@dataclasses.dataclass(frozen=True)
class CutConfig:
    """Where documents are cut. Fractions are of the document's words, drawn uniformly from (low, high)."""

    min_words: int = 16                            # shorter documents are skipped
    max_words: int | None = None                   # keep only a document's first max_words words (None: all)
    a_fraction: tuple[float, float] = (0.2, 0.5)  # share of words in a (hyper_inputs)
    b_fraction: tuple[float, float] = (0.2, 0.4)  # share of words in b (inputs); c gets the rest (>= 1 word)

    def validate(self) -> None:
        if self.min_words < 3:
            raise ValueError(f"pretrain min_words must be >= 3 (a, b and c need a word each), got {self.min_words}")
        if self.max_words is not None and self.max_words < self.min_words:
            raise ValueError(f"pretrain max_words ({self.max_words}) must be >= min_words ({self.min_words})")
        for key in ("a_fraction", "b_fraction"):
            low, high = getattr(self, key)
            if not 0.0 < low <= high < 1.0:
                raise ValueError(f"pretrain {key} must satisfy 0 < low <= high < 1, got {(low, high)}")
        if self.a_fraction[1] + self.b_fraction[1] >= 1.0:
            raise ValueError(f"pretrain a_fraction[1] + b_fraction[1] must be < 1 to leave words for c, got "
                             f"{self.a_fraction[1]} + {self.b_fraction[1]}")


def _rng(text: str, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8")).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def cut_document(text: str, seed: int = 0, config: CutConfig = CutConfig()) -> tuple[str, str, str] | None:
    """Cut `text` into (a, b, c) on whitespace boundaries; None when it has fewer than `min_words` words.

    Deterministic in (seed, text). Each part has at least one word.
    """
    words = [m.span() for m in _WORD.finditer(text)]
    if config.max_words is not None:
        words = words[: config.max_words]
    n = len(words)
    if n < config.min_words:
        return None
    rng = _rng(text, seed)
    i = min(max(1, round(rng.uniform(*config.a_fraction) * n)), n - 2)       # a = words[:i]
    j = min(max(i + 1, i + round(rng.uniform(*config.b_fraction) * n)), n - 1)  # b = words[i:j], c = words[j:]

    def part(lo: int, hi: int) -> str:
        return text[words[lo][0]: words[hi - 1][1]]

    return part(0, i), part(i, j), part(j, n)


@dataclasses.dataclass(frozen=True)
class TokenBudget:
    """The most tokens each part may have (its feature's length less the EOS); a + b must also fit full."""

    hyper_inputs: int
    inputs: int
    targets: int
    full_inputs: int

    @classmethod
    def from_lengths(cls, lengths) -> "TokenBudget | None":
        names = (F.HYPER_INPUTS, F.INPUTS, F.TARGETS, F.FULL_INPUTS)
        if not lengths or any(lengths.get(n) is None for n in names):
            return None
        return cls(*(int(lengths[n]) - 1 for n in names))

    @property
    def window(self) -> int:
        return min(self.hyper_inputs + self.inputs, self.full_inputs - 1) + self.targets


def _fit_back(counts: Sequence[int], end: int, start: int, budget: int) -> int:
    """The earliest word index k >= start such that words[k:end] hold at most `budget` tokens (one word at
    least, even if it alone is longer: it is then truncated, the only truncation left)."""
    k, total = end, 0
    while k > start and (total + counts[k - 1] <= budget or k == end):
        total += counts[k - 1]
        k -= 1
    return k


def _fit_forward(counts: Sequence[int], start: int, stop: int, budget: int) -> int:
    """The largest end <= stop such that words[start:end] hold at most `budget` tokens (one word at least)."""
    k, total = start, 0
    while k < stop and (total + counts[k] <= budget or k == start):
        total += counts[k]
        k += 1
    return k


def cut_windows(text: str, token_counts: Sequence[int], budget: TokenBudget, seed: int = 0,
                config: CutConfig = CutConfig()) -> list[tuple[str, str, str]]:
    """(a, b, c) for each window of `text` that fits `budget`; `token_counts[k]` is word k's token count.

    Windows are consecutive runs of words of at most `budget.window` tokens; each is cut by `cut_document`'s
    word fractions, then the parts are fitted from the end: c keeps its first words that fit, b the last words
    before c that fit, a the last words before b that fit (so a, b, c stay contiguous). A window with fewer than
    `min_words` words (a document's short tail) gives nothing.
    """
    spans = [m.span() for m in _WORD.finditer(text)]
    if config.max_words is not None:
        spans = spans[: config.max_words]
    if len(token_counts) < len(spans):
        raise ValueError(f"cut_windows: {len(token_counts)} token counts for {len(spans)} words")
    out, start = [], 0
    while len(spans) - start >= config.min_words:
        stop = _fit_forward(token_counts, start, len(spans), budget.window)
        if stop - start < config.min_words:
            start = stop
            continue
        window = text[spans[start][0]: spans[stop - 1][1]]
        n, rng = stop - start, _rng(window, seed)
        i = start + min(max(1, round(rng.uniform(*config.a_fraction) * n)), n - 2)
        j = min(max(i + 1, i + round(rng.uniform(*config.b_fraction) * (stop - start))), stop - 1)
        end = _fit_forward(token_counts, j, stop, budget.targets)
        i = max(i, _fit_back(token_counts, j, i, budget.inputs))
        b_tokens = sum(token_counts[i:j])
        # full_inputs = a + " " + b: one token kept for the join (a byte vocabulary's space)
        a_start = _fit_back(token_counts, i, start,
                            min(budget.hyper_inputs, max(budget.full_inputs - 1 - b_tokens, 1)))
        part = lambda lo, hi: text[spans[lo][0]: spans[hi - 1][1]]  # noqa: E731
        out.append((part(a_start, i), part(i, j), part(j, end)))
        start = end
    return out


def example_from_document(text: str, seed: int = 0, config: CutConfig = CutConfig()) -> dict[str, str] | None:
    """The feature-contract example for one document (None when it is too short)."""
    cut = cut_document(text, seed, config)
    if cut is None:
        return None
    a, b, c = cut
    return {F.HYPER_INPUTS: a, F.INPUTS: b, F.FULL_INPUTS: f"{a} {b}", F.TARGETS: c, F.TASK_NAME: TASK_NAME}


# ---------------------------------------------------------------------------------------------------------------
# Sources: documents as a tf.data.Dataset of {"text": string}
# ---------------------------------------------------------------------------------------------------------------
# Nothing is opened or downloaded until the dataset is requested.
#   "tfds:<name>"  a TFDS text dataset with a `text` feature, e.g. "tfds:c4/en:3.0.1" (real runs; a bare
#                  "tfds:c4/en" means c4/en:3.1.0, other names need their version, as seqio requires);
#   a directory    local files: `*.jsonl` (one document per line, field `text_field`) and `*.txt` (documents
#                  separated by blank lines), read in sorted order; split `s` reads `<dir>/<s>/` when that
#                  folder exists, otherwise the files directly in `<dir>` make up the "train" split.


def _split_files(directory: str, split: str) -> list[str]:
    folder = os.path.join(directory, split)
    if not os.path.isdir(folder):
        if split != "train":
            raise ValueError(f"pretrain source {directory}: no {split!r} folder ({folder})")
        folder = directory
    return sorted(p for ext in ("*.jsonl", "*.txt") for p in glob.glob(os.path.join(folder, ext)))


def iter_documents(files: Sequence[str], text_field: str = "text") -> Iterable[str]:
    """Documents of local files: JSONL lines (field `text_field`) or blank-line-separated .txt paragraphs."""
    for path in files:
        if path.endswith(".jsonl"):
            for where, record in iter_jsonl(path):
                if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                    raise ValueError(f"{where}: missing string field {text_field!r}")
                yield record[text_field]
        else:
            with open(path, encoding="utf-8") as f:
                for doc in _BLANK_LINES.split(f.read()):
                    if doc.strip():
                        yield doc.strip()


_EVAL_MARKER = "_pretrain_eval_split"


def _mark_eval(dataset: tf.data.Dataset, split: str) -> tf.data.Dataset:
    """Tag evaluation splits (seqio preprocessors are not told the split) so references get added."""
    if split not in EVAL_SPLITS:
        return dataset
    return dataset.map(lambda ex: {**ex, _EVAL_MARKER: tf.constant(True)})


def _directory_source(directory: str, splits: Sequence[str], text_field: str) -> seqio.DataSource:
    def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
        del shuffle_files, seed
        files = _split_files(directory, split)
        if not files:
            raise FileNotFoundError(f"pretrain source {directory}: no .txt/.jsonl files for split {split!r}")
        dataset = tf.data.Dataset.from_generator(
            lambda: ({text_field: doc} for doc in iter_documents(files, text_field)),
            output_signature={text_field: tf.TensorSpec((), tf.string)},
        )
        return _mark_eval(dataset, split)

    return seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=tuple(splits))


class _TfdsTextSource(seqio.TfdsDataSource):
    """seqio's lazy TFDS source (file-level sharding kept), with evaluation splits tagged."""

    def get_dataset(self, split: str = "train", *args, **kwargs) -> tf.data.Dataset:
        return _mark_eval(super().get_dataset(split, *args, **kwargs), split)


def _tfds_source(name: str, splits: Sequence[str], tfds_data_dir: str | None) -> seqio.DataSource:
    # Nothing is opened here: seqio's LazyTfdsLoader touches TFDS only when a split is read.
    return _TfdsTextSource(tfds_name=name, tfds_data_dir=tfds_data_dir, splits=tuple(splits))


def make_source(source: str, splits: Sequence[str] = ("train",), text_field: str = "text",
                tfds_data_dir: str | None = None) -> seqio.DataSource:
    """'tfds:<name>' -> a lazy TFDS source; an existing directory -> its .txt/.jsonl files."""
    if source.startswith("tfds:"):
        name = source[len("tfds:"):]
        if not name:
            raise ValueError("pretrain source 'tfds:' needs a dataset name, e.g. 'tfds:c4/en'")
        if ":" not in name:  # seqio needs a version
            if name not in DEFAULT_TFDS_VERSIONS:
                raise ValueError(f"pretrain source {source!r}: give the TFDS version, e.g. 'tfds:{name}:1.0.0'")
            name = f"{name}:{DEFAULT_TFDS_VERSIONS[name]}"
        return _tfds_source(name, splits, tfds_data_dir)
    if os.path.isdir(source):
        return _directory_source(source, splits, text_field)
    raise FileNotFoundError(f"pretrain source {source!r} is not a directory; use 'tfds:<name>' (e.g. 'tfds:c4/en') "
                            f"for a TFDS dataset")


# ---------------------------------------------------------------------------------------------------------------
# The preprocessor and the registration
# ---------------------------------------------------------------------------------------------------------------


def word_token_counts(text: str, vocabulary) -> list[int]:
    """Each word's token count under `vocabulary`, with the whitespace before it: SentencePiece folds that into
    the word's first piece and splits at whitespace, so a run of words costs the sum of their counts; a byte
    vocabulary pays for the whitespace too (over-counted by one separator at a part's start: on the safe side)."""
    counts, previous_end = [], 0
    for m in _WORD.finditer(text):
        counts.append(max(len(vocabulary.encode(text[previous_end:m.end()])), 1))
        previous_end = m.end()
    return counts


def cut_preprocessor(seed: int, config: CutConfig, text_field: str = "text", vocabulary=None):
    """A SeqIO preprocessor: {text_field: doc} -> the string features, one example per window that fits the
    sequence lengths (`cut_windows`, when SeqIO passes lengths and `vocabulary` is given), else one per
    document (`cut_document`); too-short documents give none. Eval splits also get `references` = [targets]."""

    def preprocess(dataset: tf.data.Dataset, sequence_length=None) -> tf.data.Dataset:
        budget = TokenBudget.from_lengths(sequence_length) if vocabulary is not None else None

        def cut(text: bytes):
            doc = text.decode("utf-8")
            if budget is None:
                one = cut_document(doc, seed, config)
                parts = [] if one is None else [one]
            else:
                parts = cut_windows(doc, word_token_counts(doc, vocabulary), budget, seed, config)
            columns = [[p[k].encode() for p in parts] for k in range(3)]
            return tuple(np.asarray(col, dtype=object).reshape(len(parts)) for col in columns)

        def to_features(ex):
            a, b, c = tf.numpy_function(cut, [ex[text_field]], [tf.string] * 3, stateful=False)
            for v in (a, b, c):
                v.set_shape([None])
            return tf.data.Dataset.from_tensor_slices({F.HYPER_INPUTS: a, F.INPUTS: b, F.TARGETS: c})

        with_references = _EVAL_MARKER in dataset.element_spec

        def finish(ex):
            out = {**ex, F.FULL_INPUTS: tf.strings.join([ex[F.HYPER_INPUTS], ex[F.INPUTS]], separator=" "),
                   F.TASK_NAME: tf.constant(TASK_NAME)}
            if with_references:
                out[F.REFERENCES] = tf.expand_dims(out[F.TARGETS], 0)
            return out

        return dataset.flat_map(to_features).map(finish, num_parallel_calls=tf.data.AUTOTUNE)

    return preprocess


def register_pretrain(
    source: str,
    vocabulary,
    name: str = TASK_NAME,
    seed: int = 0,
    *,
    splits: Sequence[str] = ("train",),
    min_words: int = 16,
    max_words: int | None = None,
    a_fraction: tuple[float, float] = (0.2, 0.5),
    b_fraction: tuple[float, float] = (0.2, 0.4),
    text_field: str = "text",
    tfds_data_dir: str | None = None,
) -> seqio.Task:
    """Register the a | b | c pretraining task `name` over `source` (see the module docstring).

    Nothing is read at registration: a TFDS source (e.g. 'tfds:c4/en') is opened when a split is requested.
    Splits in ("validation", "test") also carry `references`.
    """
    config = CutConfig(min_words=min_words, max_words=max_words, a_fraction=tuple(a_fraction),
                       b_fraction=tuple(b_fraction))
    config.validate()
    data_source = make_source(source, splits, text_field, tfds_data_dir)
    preprocessors = [cut_preprocessor(seed, config, text_field, vocabulary)]
    return common.register_task(name, data_source, vocabulary, preprocessors=preprocessors)
