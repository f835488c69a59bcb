"""What every task registry shares: output features, sources from Python examples, registration.

Every registered task produces the string features of `tagi_jax.features` (inputs, hyper_inputs,
full_inputs, targets, task_name; evaluation splits also `references`). Tokenisation appends EOS; lengths
and truncation are the feature converter's business, not the task's.
"""
from __future__ import annotations

import functools
from typing import Callable, Iterable, Mapping, Sequence

import seqio
import tensorflow as tf

from tagi_jax import features as F


def output_features(vocabulary) -> dict[str, seqio.Feature]:
    """The four text features, tokenised with `vocabulary`, EOS appended."""
    return {
        name: seqio.Feature(vocabulary=vocabulary, add_eos=True, dtype=tf.int32)
        for name in F.TEXT_FEATURES
    }


def examples_to_dataset(examples: Sequence[Mapping[str, object]], with_references: bool) -> tf.data.Dataset:
    """A list of example dicts (string features, optional `references` list) -> tf.data.Dataset."""
    columns: dict[str, list] = {name: [] for name in F.STRING_FEATURES}
    refs: list[list[str]] = []
    for ex in examples:
        for name in F.STRING_FEATURES:
            columns[name].append(str(ex[name]))
        if with_references:
            r = list(ex.get(F.REFERENCES) or [ex[F.TARGETS]])
            refs.append([str(x) for x in r])
    tensors = {name: tf.constant(values, dtype=tf.string) for name, values in columns.items()}
    if with_references:
        tensors[F.REFERENCES] = tf.ragged.constant(refs, dtype=tf.string)
        ds = tf.data.Dataset.from_tensor_slices(tensors)
        return ds.map(lambda ex: {**ex, F.REFERENCES: ex[F.REFERENCES]})
    if not examples:
        return tf.data.Dataset.from_tensor_slices({n: tf.constant([], tf.string) for n in F.STRING_FEATURES})
    return tf.data.Dataset.from_tensor_slices(tensors)


def function_source(
    examples_fn: Callable[[str], Sequence[Mapping[str, object]]],
    splits: Iterable[str],
    eval_splits: Iterable[str] = ("validation", "test"),
) -> seqio.FunctionDataSource:
    """A SeqIO source over in-memory examples; `examples_fn(split)` is only called when data is read."""
    eval_splits = set(eval_splits)

    def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
        del shuffle_files, seed
        return examples_to_dataset(examples_fn(split), with_references=split in eval_splits)

    return seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=tuple(splits))


def tokenize_passages(dataset: tf.data.Dataset, output_features, features: Sequence[str] = F.TEXT_FEATURES
                      ) -> tf.data.Dataset:
    """After `tokenize` and `append_eos`: each of `features` re-tokenised passage by passage from its
    `<feature>_pretokenized` copy (split at `PASSAGE_SEPARATOR`), every passage ending with EOS, so the ids are
    EOS-terminated segments (`tagi_jax.models.fid.fid_layout`); a text without the separator is unchanged."""
    def encode_features(ex):
        out = dict(ex)
        for name in features:
            vocab = output_features[name].vocabulary
            eos = tf.constant([vocab.eos_id], tf.int32)

            def encode(text, vocab=vocab, eos=eos):
                return tf.concat([tf.cast(vocab.encode_tf(text), tf.int32), eos], 0)

            parts = tf.strings.split(ex[f"{name}_pretokenized"], F.PASSAGE_SEPARATOR)
            out[name] = tf.map_fn(encode, parts, fn_output_signature=tf.RaggedTensorSpec([None], tf.int32, 0)
                                  ).flat_values
        return out
    return dataset.map(encode_features, num_parallel_calls=tf.data.AUTOTUNE)


def register_task(
    name: str,
    source: seqio.DataSource,
    vocabulary,
    preprocessors: Sequence[Callable] = (),
    metric_fns: Sequence[Callable] = (),
    postprocess_fn: Callable | None = None,
    passages: bool = False,
) -> seqio.Task:
    """Register (or re-register) a task whose examples already hold the string features; with `passages`, texts
    may hold several passages (`tokenize_passages`)."""
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=source,
        preprocessors=list(preprocessors) + [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]
        + ([tokenize_passages] if passages else []),
        output_features=output_features(vocabulary),
        postprocess_fn=postprocess_fn,
        metric_fns=list(metric_fns),
    )


def register_mixture(name: str, task_names: Sequence[str], default_rate: float = 1.0,
                     rates: Mapping[str, float | Callable[[seqio.Task], float]] | None = None) -> seqio.Mixture:
    """Register (or re-register) a mixture of already-registered tasks (equal rates by default).

    `rates` gives some tasks their own rate: a number or a function of the task, which SeqIO calls only when
    the mixture is read (so a rate may depend on data that registration must not open).
    Sampling continues until every task is exhausted (SeqIO's default stops at the first empty task, which
    silently shortens a one-epoch pass over tasks of different sizes).
    """
    if not task_names:
        raise ValueError(f"mixture {name!r}: no tasks")
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    rates = rates or {}
    sample_fn = functools.partial(tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=False)
    return seqio.MixtureRegistry.add(name, [(t, rates.get(t, default_rate)) for t in task_names],
                                     sample_fn=sample_fn)
