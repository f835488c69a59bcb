"""What each stage and evaluator reads from registered SeqIO tasks: shuffled training batches of model features,
and the string features of evaluation examples (one reader for every benchmark and protocol)."""
from __future__ import annotations

import contextlib
import re
from typing import Iterator, Mapping, Sequence

import numpy as np
import seqio
import tensorflow as tf
from ml_collections import config_dict

from tagi_jax import features as F
from tagi_jax.data.feature_converter import TagiFeatureConverter, get_model_dataset, to_numpy_batches
from tasks.common import tokenize_passages

CATEGORY = "category"  # the evaluation example field holding its task's category
_TOKENIZE_ONLY = (seqio.preprocessors.tokenize, seqio.preprocessors.append_eos, tokenize_passages)


def task_lengths(data_cfg: config_dict.ConfigDict) -> dict[str, int]:
    """Token lengths of the instruction benchmark's text features (`data.lengths`)."""
    return {name: int(data_cfg.lengths[name]) for name in F.TEXT_FEATURES}


def pretrain_lengths(data_cfg: config_dict.ConfigDict) -> dict[str, int]:
    """Token lengths of the pretraining task's text features (`data.pretrain.lengths`)."""
    return {name: int(data_cfg.pretrain.lengths[name]) for name in F.TEXT_FEATURES}


class DataError(ValueError):
    """A data file failed while tf.data was reading it (the message is the original error's, file and line)."""


# The last "SomeError: message" line of a tf.data error: the Python exception raised inside a generator.
_INNER_ERROR = re.compile(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (.+?)\s*$", re.M)


@contextlib.contextmanager
def data_errors():
    """Inside, a tf.data error that wraps an exception raised while reading data (a malformed JSON line, a bad
    task file) becomes a `DataError` with that exception's one-line message instead of TensorFlow's trace."""
    try:
        yield
    except tf.errors.OpError as e:
        found = _INNER_ERROR.findall(e.message or "")
        if not found:
            raise
        raise DataError(found[-1][1]) from None


def train_batches(
    mixture: str,
    lengths: Mapping[str, int],
    batch_size: int,
    task_names: Sequence[str],
    seed: int,
    start_step: int,
    host_slice: slice | None = None,
) -> Iterator[dict]:
    """Endless shuffled batches of model features for training, starting at batch `start_step`.

    The order is a function of the seed only, so a resumed run sees exactly the batches an uninterrupted
    run would. `task_id` is a task's position in `task_names` (-1 for others).
    """
    converter = TagiFeatureConverter(task_names=list(task_names), count_truncation=True)
    ds = get_model_dataset(mixture, lengths, converter, split="train", shuffle=True, seed=seed, num_epochs=None)
    with data_errors():
        for batch in to_numpy_batches(ds, batch_size, drop_remainder=True, start_batch=start_step):
            out = {k: v for k, v in batch.items() if k in F.MODEL_FEATURES}
            if host_slice is not None:
                out = {k: v[host_slice] for k, v in out.items()}
            yield out


def _py(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()] if value.ndim else _py(value.item())
    if isinstance(value, (list, tuple)):
        return [_py(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _tasks(names: str | Sequence[str]) -> list[seqio.Task]:
    out = []
    for name in [names] if isinstance(names, str) else names:
        try:
            provider = seqio.get_mixture_or_task(name)
        except ValueError:
            raise ValueError(f"unknown task or mixture {name!r}: not registered") from None
        out += provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    return sorted({t.name: t for t in out}.values(), key=lambda t: t.name)


def eval_examples(tasks: str | Sequence[str], split: str | None = None, max_per_task: int | None = None,
                  categories: Mapping[str, str] | None = None) -> list[dict]:
    """The string features (+ references, answer choices, label) of the evaluation split of registered tasks
    (a task or mixture name, or a list of names), tasks in name order, `id` = `<task>-<i>`, `category` from
    `categories`. `split` None picks "test" if the task has it, else "validation".

    Tasks that only tokenize are read from their source (no tokenizer graph: ~0.1 s a task, a minute for the
    demo's 450 tasks); others through their preprocessors, keeping the `_pretokenized` strings.
    """
    out = []
    for task in _tasks(tasks):
        task_split = split or ("test" if "test" in task.splits else "validation")
        if task_split not in task.splits:
            raise ValueError(f"task {task.name!r} has no split {task_split!r} (has {list(task.splits)})")
        if all(p in _TOKENIZE_ONLY for p in task.preprocessors):
            ds, suffix = task.source.get_dataset(split=task_split, shuffle=False), ""
        else:
            ds = task.get_dataset(sequence_length=None, split=task_split, shuffle=False, trim_output_features=False)
            suffix = "_pretokenized"
        if max_per_task is not None:
            ds = ds.take(max_per_task)
        with data_errors():
            rows = list(ds.as_numpy_iterator())
        for i, ex in enumerate(rows):
            row = {k[: -len(suffix)] if suffix and k.endswith(suffix) else k: _py(v) for k, v in ex.items()
                   if not suffix or k.endswith(suffix) or k not in F.TEXT_FEATURES}
            row["id"] = f"{row.get(F.TASK_NAME, task.name)}-{i}"
            if categories is not None and row.get(F.TASK_NAME) in categories:
                row[CATEGORY] = categories[row[F.TASK_NAME]]
            out.append(row)
    return out
