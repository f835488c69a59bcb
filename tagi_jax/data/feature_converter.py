"""Task features -> model features for TAGI (one generated adapter per example, so no packing).

Every task yields tokenised `inputs`, `hyper_inputs`, `full_inputs`, `targets` (EOS appended) and the string
`task_name`. `TagiFeatureConverter` truncates each text feature to its length from `task_feature_lengths`
(keeping EOS as the last token, and *counting* every truncation), pads with 0, shifts the targets right for
the decoder (start id 0), and maps `task_name` to an int32 `task_id` through the `task_names` it was given
(-1 for unknown names). On request it passes `<name>_pretokenized`, `task_name` and `references` through for
evaluation.

Why a custom converter: SeqIO's EncDecFeatureConverter only knows `inputs`/`targets`, packs by default (which
would mix examples that need different adapters) and, when used through `seqio.get_dataset`, trims features
silently (dropping EOS). Use `get_model_dataset` here: it keeps `task_name` through mixtures and leaves
truncation to the converter, which counts it.
"""
from __future__ import annotations

import threading
from typing import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
from absl import logging

from tagi_jax import features as F

_Spec = seqio.FeatureConverter.FeatureSpec

# Token features of the model and the task feature (length key) each one is built from.
_TOKEN_SOURCES = {
    F.ENCODER_INPUT_TOKENS: F.INPUTS,
    F.HYPER_ENCODER_INPUT_TOKENS: F.HYPER_INPUTS,
    F.FULL_ENCODER_INPUT_TOKENS: F.FULL_INPUTS,
}
PRETOKENIZED_SUFFIX = "_pretokenized"


class TagiFeatureConverter(seqio.FeatureConverter):
    """Converts TAGI task features to the model features of `tagi_jax.features` (never packs).

    Args:
      task_names: names whose position becomes `task_id` (e.g. the teacher index); others map to -1.
      pack: must be False; every example carries its own adapter.
      keep_pretokenized: also output `<text feature>_pretokenized` strings and `task_name` (evaluation).
      keep_references: also output `references` (all reference answers; evaluation splits only).
      eos_id: the vocabulary's EOS id, kept as the last token of truncated features.
      count_truncation: count truncated examples per feature (see `truncation_counts`, `log_truncation`).
    """

    TASK_FEATURES = {name: _Spec(dtype=tf.int32) for name in F.TEXT_FEATURES}
    MODEL_FEATURES = {
        **{name: _Spec(dtype=tf.int32) for name in F.MODEL_FEATURES if name != F.TASK_ID},
        F.TASK_ID: _Spec(dtype=tf.int32, rank=0),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(
        self,
        task_names: Sequence[str] = (),
        pack: bool = False,
        keep_pretokenized: bool = False,
        keep_references: bool = False,
        eos_id: int = 1,
        count_truncation: bool = True,
        apply_length_check: bool = True,
        bos_id: int = 0,
    ):
        if pack:
            raise ValueError(
                "TagiFeatureConverter: packing is not supported (pack=True): every example gets its own "
                "generated adapter, so examples cannot share a row; use pack=False")
        super().__init__(pack=False, apply_length_check=apply_length_check, bos_id=bos_id)
        names = [str(n) for n in task_names]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"TagiFeatureConverter: task_names has duplicates: {dupes}")
        self.task_names = tuple(names)
        self.keep_pretokenized = keep_pretokenized
        self.keep_references = keep_references
        self.eos_id = int(eos_id)
        self.count_truncation = count_truncation
        # String features passed through unchanged (instance attribute: depends on the options).
        self._string_passthrough: dict[str, _Spec] = {}
        if keep_pretokenized:
            for name in F.TEXT_FEATURES:
                self._string_passthrough[name + PRETOKENIZED_SUFFIX] = _Spec(dtype=tf.string, rank=0)
            self._string_passthrough[F.TASK_NAME] = _Spec(dtype=tf.string, rank=0)
        if keep_references:
            self._string_passthrough[F.REFERENCES] = _Spec(dtype=tf.string, rank=1)
        self.MODEL_FEATURES = {**type(self).MODEL_FEATURES, **self._string_passthrough}
        self._lock = threading.Lock()
        self.reset_truncation_counts()

    # ----------------------------------------------------------------------------------------- lengths
    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]) -> dict[str, int | None]:
        """Token features get their length key's value; `task_id` and string passthroughs are None."""
        _check_task_feature_lengths(task_feature_lengths)
        lengths: dict[str, int | None] = {
            name: int(task_feature_lengths[F.MODEL_FEATURE_LENGTH_KEY[name]])
            for name in F.MODEL_FEATURES if name != F.TASK_ID
        }
        lengths[F.TASK_ID] = None
        lengths.update({name: None for name in self._string_passthrough})
        return lengths

    def _validate_dataset(self, ds, expected_features, expected_lengths, strict, error_label):
        """Features, dtypes and ranks as SeqIO checks them; lengths checked statically, without a map.

        Inputs may be longer than their lengths (truncated and counted, not rejected). Outputs have static
        shapes (`pad_to_length`), so their lengths are read from the element spec instead of being
        asserted per example (saves a traced map per conversion).
        """
        spec = ds.element_spec
        for name, want in expected_features.items():
            if name not in spec:
                raise ValueError(f"TagiFeatureConverter ({error_label}): dataset is missing feature {name!r}; "
                                 f"has {sorted(spec)}")
            got = spec[name]
            if got.dtype != want.dtype:
                raise ValueError(f"TagiFeatureConverter ({error_label}): feature {name!r} has dtype "
                                 f"{got.dtype.name}, expected {want.dtype.name}")
            if got.shape.rank != want.rank:
                raise ValueError(f"TagiFeatureConverter ({error_label}): feature {name!r} has rank "
                                 f"{got.shape.rank}, expected {want.rank}")
            if (error_label != "input_validation" and self._apply_length_check and want.rank == 1
                    and expected_lengths.get(name) is not None
                    and got.shape.as_list() != [expected_lengths[name]]):
                raise ValueError(f"TagiFeatureConverter ({error_label}): feature {name!r} has shape "
                                 f"{got.shape}, expected [{expected_lengths[name]}]")
        return ds

    # ------------------------------------------------------------------------------------- conversion
    def _convert_features(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        spec = ds.element_spec
        if F.TASK_NAME not in spec:
            raise ValueError(
                "TagiFeatureConverter: the dataset has no 'task_name' feature (mixtures drop it unless "
                "passthrough_features includes it; use tagi_jax.data.feature_converter.get_model_dataset)")
        missing = [n for n in self._string_passthrough if n not in spec]
        if missing:
            hint = (" (only evaluation splits carry references)" if F.REFERENCES in missing else "")
            raise ValueError(f"TagiFeatureConverter: requested passthrough features missing from the "
                             f"dataset: {missing}{hint}")
        lengths = {name: int(task_feature_lengths[name]) for name in F.TEXT_FEATURES}
        table = _task_id_table(self.task_names)
        eos_id = self.eos_id
        record = self._record_truncation

        @tf.autograph.experimental.do_not_convert
        def convert(ex):
            padded, flags = {}, []
            for name in F.TEXT_FEATURES:
                tokens, truncated = truncate_keep_eos(ex[name], lengths[name], eos_id)
                padded[name] = pad_to_length(tokens, lengths[name])
                flags.append(truncated)
            if table is None:
                task_id = tf.constant(-1, tf.int32)
            else:
                task_id = tf.cast(table.lookup(ex[F.TASK_NAME]), tf.int32)
            if self.count_truncation:
                done = tf.numpy_function(record, [tf.stack(flags)], tf.int32, stateful=True)
                with tf.control_dependencies([done]):
                    task_id = tf.identity(task_id)
            targets = padded[F.TARGETS]
            out = {name: padded[source] for name, source in _TOKEN_SOURCES.items()}
            out[F.DECODER_TARGET_TOKENS] = targets
            out[F.DECODER_INPUT_TOKENS] = seqio.utils.make_autoregressive_inputs(targets, bos_id=self.bos_id)
            out[F.DECODER_LOSS_WEIGHTS] = seqio.non_padding_position(targets)
            out[F.TASK_ID] = task_id
            out.update({name: ex[name] for name in self._string_passthrough})
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    # ------------------------------------------------------------------------------------- truncation
    def reset_truncation_counts(self) -> None:
        with self._lock:
            self._counts = {name: {"examples": 0, "truncated": 0} for name in F.TEXT_FEATURES}

    @property
    def truncation_counts(self) -> dict[str, dict[str, int]]:
        """{feature: {"examples": seen, "truncated": cut}} over every example converted so far."""
        with self._lock:
            return {k: dict(v) for k, v in self._counts.items()}

    def log_truncation(self) -> dict[str, dict[str, int]]:
        """Logs (absl) and returns the truncation counts; a warning when anything was truncated."""
        counts = self.truncation_counts
        summary = ", ".join(f"{k} {v['truncated']}/{v['examples']}" for k, v in counts.items())
        if any(v["truncated"] for v in counts.values()):
            logging.warning("TagiFeatureConverter: truncated examples per feature: %s", summary)
        else:
            logging.info("TagiFeatureConverter: no truncation (%s)", summary)
        return counts

    def _record_truncation(self, flags: np.ndarray) -> np.int32:
        news = []
        with self._lock:
            for name, flag in zip(F.TEXT_FEATURES, flags):
                c = self._counts[name]
                c["examples"] += 1
                if flag:
                    c["truncated"] += 1
                    k = c["truncated"]
                    if k & (k - 1) == 0:  # report at 1, 2, 4, 8, ... truncations: visible, not spammy
                        news.append(f"{name} {k}/{c['examples']}")
        if news:
            logging.warning("TagiFeatureConverter: truncated so far (truncated/seen): %s", ", ".join(news))
        return np.int32(0)


def _check_task_feature_lengths(task_feature_lengths: Mapping[str, int]) -> None:
    for name in F.TEXT_FEATURES:
        if name not in task_feature_lengths:
            raise ValueError(f"task_feature_lengths: missing key {name!r} (need {list(F.TEXT_FEATURES)})")
        value = task_feature_lengths[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 2:
            raise ValueError(f"task_feature_lengths[{name!r}] must be an int >= 2 (room for a token and "
                             f"EOS), got {value!r}")


def _task_id_table(task_names: Sequence[str]):
    if not task_names:
        return None
    init = tf.lookup.KeyValueTensorInitializer(
        keys=tf.constant(list(task_names), tf.string),
        values=tf.range(len(task_names), dtype=tf.int64))
    return tf.lookup.StaticHashTable(init, default_value=-1)


def truncate_keep_eos(tokens: tf.Tensor, length: int, eos_id: int) -> tuple[tf.Tensor, tf.Tensor]:
    """Cut `tokens` to `length` with EOS last; also flags a full-length feature whose EOS was already cut."""
    n = tf.shape(tokens)[0]
    lost_eos = tf.logical_and(tf.equal(n, length), tf.reduce_all(tf.not_equal(tokens[-1:], eos_id)))
    truncated = tf.logical_or(n > length, lost_eos)
    eos = tf.constant([eos_id], tokens.dtype)
    cut = tf.cond(truncated, lambda: tf.concat([tokens[: length - 1], eos], 0), lambda: tokens)
    return cut, truncated


def pad_to_length(tokens: tf.Tensor, length: int) -> tf.Tensor:
    padded = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]])
    return tf.ensure_shape(padded, [length])


# ------------------------------------------------------------------------------------------ datasets
def get_model_dataset(
    mixture_or_task_name: str | seqio.Task | seqio.Mixture,
    task_feature_lengths: Mapping[str, int],
    converter: TagiFeatureConverter,
    split: str = "train",
    shuffle: bool = False,
    seed: int | None = None,
    num_epochs: int | None = 1,
    shard_info: seqio.ShardInfo | None = None,
    use_cached: bool = False,
) -> tf.data.Dataset:
    """A task's or mixture's converted dataset; keeps `task_name` (and references) through mixtures and
    leaves truncation to the converter (SeqIO's own trimming would drop EOS without telling anyone)."""
    provider = (seqio.get_mixture_or_task(mixture_or_task_name)
                if isinstance(mixture_or_task_name, str) else mixture_or_task_name)
    kwargs = dict(sequence_length=dict(task_feature_lengths), split=split, use_cached=use_cached,
                  shuffle=shuffle, seed=seed, shard_info=shard_info, num_epochs=num_epochs,
                  trim_output_features=False)
    if isinstance(provider, seqio.Mixture):
        passthrough = [F.TASK_NAME] + ([F.REFERENCES] if converter.keep_references else [])
        ds = provider.get_dataset(copy_pretokenized=converter.keep_pretokenized,
                                  passthrough_features=passthrough, **kwargs)
    else:
        ds = provider.get_dataset(**kwargs)
    return converter(ds, task_feature_lengths=task_feature_lengths)


def model_feature_shapes(task_feature_lengths: Mapping[str, int], batch_size: int) -> dict[str, tuple]:
    """{model feature: (shape, numpy dtype)} of one batch: for abstract initialisation and input specs."""
    _check_task_feature_lengths(task_feature_lengths)
    shapes = {name: ((batch_size, int(task_feature_lengths[key])), np.int32)
              for name, key in F.MODEL_FEATURE_LENGTH_KEY.items()}
    shapes[F.TASK_ID] = ((batch_size,), np.int32)
    return shapes


def to_numpy_batches(
    dataset: tf.data.Dataset,
    batch_size: int,
    drop_remainder: bool = True,
    start_batch: int = 0,
) -> Iterator[dict[str, object]]:
    """Batches a converted dataset deterministically into numpy dicts, starting at batch `start_batch`.

    Token features become int32 arrays [batch, len] (`task_id`: [batch]); string features lists of str;
    `references` a list of lists of str. `start_batch` resumes a run: batches before it are skipped (their
    examples are still read, so the order is that of an uninterrupted run).
    """
    if batch_size < 1:
        raise ValueError(f"to_numpy_batches: batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"to_numpy_batches: start_batch must be >= 0, got {start_batch}")
    options = tf.data.Options()
    options.deterministic = True
    ds = dataset.with_options(options)
    ds = ds.ragged_batch(batch_size, drop_remainder=drop_remainder)
    if start_batch:
        ds = ds.skip(start_batch)
    for batch in ds.prefetch(2).as_numpy_iterator():
        yield {name: _to_python(name, value) for name, value in batch.items()}


def _decode(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _to_python(name: str, value):
    if name == F.REFERENCES:
        rows = value.to_list() if hasattr(value, "to_list") else list(value)
        return [[_decode(r) for r in row] for row in rows]
    if isinstance(value, np.ndarray) and value.dtype == object:
        return [_decode(v) for v in value]
    return value


def truncation_report(
    dataset: tf.data.Dataset,
    task_feature_lengths: Mapping[str, int],
    eos_id: int = 1,
    max_examples: int | None = None,
) -> dict[str, dict[str, int]]:
    """Counts, before conversion, how many examples each length would truncate; logs the result (absl).

    `dataset` is a task/mixture dataset of token ids (not yet converted). Returns
    {feature: {"examples", "truncated", "limit", "longest"}} with the converter's rule (EOS kept).
    """
    _check_task_feature_lengths(task_feature_lengths)
    names = [n for n in F.TEXT_FEATURES if n in dataset.element_spec]
    report = {n: {"examples": 0, "truncated": 0, "limit": int(task_feature_lengths[n]), "longest": 0}
              for n in names}
    ds = dataset.map(lambda ex: {n: ex[n] for n in names})
    if max_examples is not None:
        ds = ds.take(max_examples)
    for ex in ds.as_numpy_iterator():
        for n in names:
            tokens, r = ex[n], report[n]
            r["examples"] += 1
            r["longest"] = max(r["longest"], len(tokens))
            if len(tokens) > r["limit"] or (len(tokens) == r["limit"] and tokens[-1] != eos_id):
                r["truncated"] += 1
    summary = ", ".join(f"{n} {r['truncated']}/{r['examples']} (limit {r['limit']}, longest {r['longest']})"
                        for n, r in report.items())
    if any(r["truncated"] for r in report.values()):
        logging.warning("truncation_report: examples that would be truncated: %s", summary)
    else:
        logging.info("truncation_report: nothing truncated: %s", summary)
    return report
