"""SeqIO registration of P3: one task per (dataset, template) for T0's held-out evaluation (`register_p3_eval`)
and for training datasets (`register_p3_train`, with T0's examples-proportional mixing rates).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from collections import Counter
from typing import Callable, Iterable, Mapping, Sequence

import seqio
import tensorflow as tf

from tasks import common
from tasks.p3.datasets import (
    MTEST11,
    P3_EVAL_DATASETS,
    P3_EVAL_MIXTURE,
    P3_TRAIN_MIXTURE,
    jsonl_split_size,
    read_jsonl_split,
    read_tfds_split,
    read_train_jsonl,
    read_train_tfds,
    tfds_split_size,
)
from tasks.p3.render import IDX, render_example, string_fields, to_dataset
from tasks.p3.templates import Template, load_templates

EVAL_SPLITS = ("validation", "test")


def task_clean(text: str) -> str:
    """promptsource's task-name cleaning: anything but word characters, digits, '.' and '_' -> '_'."""
    return re.sub(r"[^\w\d\._]+", "_", text)


def _template_task_names(prefix: str, templates: Sequence[Template]) -> list[str]:
    names = [f"{prefix}_{task_clean(t.name)}" for t in templates]
    counts = Counter(names)
    return [f"{n}_{t.id[:8]}" if counts[n] > 1 else n for n, t in zip(names, templates)]


def _examples_fn(
    read: Callable[[str], Iterable[dict]],
    template: Template,
    instance_fields: Sequence[str] | None,
    task_name: str,
    eval_splits: Sequence[str],
    max_examples: int | None,
) -> Callable[[str], Iterable[dict]]:
    """split -> generator of rendered examples (instance_fields None: every string field of the example)."""

    def examples(split: str) -> Iterable[dict]:
        with_choices = split in eval_splits
        count = 0
        for i, ex in enumerate(read(split)):
            if max_examples is not None and count >= max_examples:
                return
            fields = instance_fields if instance_fields is not None else string_fields(ex)
            rendered = render_example(template, ex, fields, task_name, with_choices,
                                      where=f"{task_name} [{split}] example {i}: ")
            if rendered is None:
                continue
            rendered[IDX] = i
            count += 1
            yield rendered

    return examples


def _register(task_name, examples_fn, splits, vocabulary, eval_splits) -> None:
    def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
        del shuffle_files, seed
        return to_dataset(functools.partial(examples_fn, split), with_choices=split in eval_splits)

    source = seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=tuple(splits))
    common.register_task(task_name, source, vocabulary)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


def register_p3_eval(
    templates_dir: str,
    data_dir: str | None,
    vocabulary,
    datasets: Sequence[str] | None = None,
    original_task_only: bool = True,
    *,
    use_tfds: bool = False,
    tfds_data_dir: str | None = None,
    mixture_name: str = P3_EVAL_MIXTURE,
) -> dict[str, list[str]]:
    """Register the T0 held-out evaluation: one task per (dataset, template), split 'validation'.

    Task names are `p3_<dataset>_<template name, task_clean'ed>` (dataset keys: MTEST11);
    mixtures `p3_<dataset>` (one dataset's templates) and `mixture_name` (everything registered).
    Data: `<data_dir>/<dataset>/validation.jsonl` (see P3_EVAL_DATASETS for the field mappings) or, with
    `use_tfds`, the TFDS builders (rte, cb, copa, wic, wsc, anli_r*, winogrande). A dataset without data is
    skipped with a warning; a missing templates directory or file is an error. Only templates with
    `metadata.original_task: true` unless `original_task_only=False` (templates without answer choices are
    then skipped: rank classification needs them). Nothing is read until a dataset is requested.
    Returns {dataset: [task names]}.
    """
    if not os.path.isdir(templates_dir):
        raise FileNotFoundError(f"promptsource templates directory not found: {templates_dir}")
    names = list(datasets) if datasets is not None else list(MTEST11)
    unknown = [n for n in names if n not in P3_EVAL_DATASETS]
    if unknown:
        raise ValueError(f"register_p3_eval: unknown dataset(s) {unknown}; known: {sorted(P3_EVAL_DATASETS)}")
    if data_dir is None and not use_tfds:
        raise ValueError("register_p3_eval: give data_dir (JSONL) or use_tfds=True")
    registered: dict[str, list[str]] = {}
    for name in names:
        spec = P3_EVAL_DATASETS[name]
        templates = [t for t in load_templates(templates_dir, spec.templates).select(original_task_only)
                     if t.answer_choices is not None]
        if use_tfds:
            if spec.tfds_name is None:
                warnings.warn(f"P3 dataset {name!r} skipped: no TFDS version with the fields its templates need "
                              f"(use JSONL)", stacklevel=2)
                continue
            read = functools.partial(read_tfds_split, spec=spec, tfds_data_dir=tfds_data_dir)
        else:
            path = os.path.join(data_dir, spec.data_subdir or spec.name, f"{spec.split}.jsonl")
            if not os.path.isfile(path):
                warnings.warn(f"P3 dataset {name!r} skipped: no data at {path}", stacklevel=2)
                continue
            read = functools.partial(read_jsonl_split, path=path, spec=spec)
        task_names = _template_task_names(f"p3_{name}", templates)
        for template, task_name in zip(templates, task_names):
            examples = _examples_fn(read, template, spec.instance_fields, task_name, EVAL_SPLITS, None)
            _register(task_name, examples, ("validation",), vocabulary, EVAL_SPLITS)
        common.register_mixture(f"p3_{name}", task_names)
        registered[name] = task_names
    if not registered:
        where = f"TFDS ({tfds_data_dir or 'default data dir'})" if use_tfds else data_dir
        raise FileNotFoundError(f"register_p3_eval: no data found in {where} for any of {names}")
    common.register_mixture(mixture_name, [t for ts in registered.values() for t in ts])
    return registered


def register_p3_train(
    templates_dir: str,
    data_dir: str | None,
    dataset_names: Sequence[str],
    vocabulary,
    *,
    splits: Sequence[str] = ("train",),
    original_task_only: bool = False,
    field_maps: Mapping[str, Callable[[dict], dict]] | None = None,
    instance_fields: Mapping[str, Sequence[str]] | None = None,
    tfds_names: Mapping[str, str] | None = None,
    tfds_data_dir: str | None = None,
    max_examples_per_task: int | None = None,
    mixing_cap: int | None = None,
    mixture_name: str = P3_TRAIN_MIXTURE,
) -> dict[str, list[str]]:
    """Register P3 training tasks (e.g. T0's training datasets) from the user's data, one per template.

    Args:
      dataset_names: promptsource paths, '<dataset>[/<subset>]' (e.g. 'ag_news', 'super_glue/boolq').
      data_dir: JSONL files at `<data_dir>/<dataset>[/<subset>]/<split>.jsonl`, records with the Hugging Face
        field names (or anything `field_maps[name]` converts to them). A dataset without files is skipped with a
        warning.
      tfds_names: {dataset path: TFDS name} for datasets read from TFDS instead (lazily, at read time).
      instance_fields: {dataset path: fields} that are instance content (masked in hyper_inputs); default:
        every string / string-list field of the example (give it explicitly when a string field steers the
        template's control flow, like COPA's `question`).
      original_task_only: T0 trains on all templates (default False).
      max_examples_per_task: cap per (template, split) on the examples read (a truncation; T0 has none).
      mixing_cap: T0's examples-proportional mixing: a template is sampled in proportion to its dataset's
        training examples, a dataset with more than `mixing_cap` counting as `mixing_cap // (its number of
        templates, all of them)` per template (T0: 500k; t-zero's `mixture_cap`). Sizes are counted (JSONL
        records, TFDS split info) when the mixture is first read. None: every template at the same rate.
    Task names `p3_train_<dataset path, cleaned>_<template>`; the mixture `mixture_name` holds them all.
    Validation/test splits additionally carry references, answer choices and labels (templates with
    answer choices only). Returns {dataset path: [task names]}.
    """
    if not os.path.isdir(templates_dir):
        raise FileNotFoundError(f"promptsource templates directory not found: {templates_dir}")
    field_maps = dict(field_maps or {})
    instance_fields = dict(instance_fields or {})
    tfds_names = dict(tfds_names or {})
    for key, mapping in (("field_maps", field_maps), ("instance_fields", instance_fields),
                         ("tfds_names", tfds_names)):
        extra = sorted(set(mapping) - set(dataset_names))
        if extra:
            raise ValueError(f"register_p3_train: {key} names datasets not in dataset_names: {extra}")
    if mixing_cap is not None and mixing_cap < 1:
        raise ValueError(f"register_p3_train: mixing_cap must be >= 1 (or None), got {mixing_cap}")
    registered: dict[str, list[str]] = {}
    rates: dict[str, Callable[[seqio.Task], float]] = {}
    for name in dataset_names:
        convert = field_maps.get(name, dict)
        if name in tfds_names:
            read = functools.partial(read_train_tfds, tfds_name=tfds_names[name], data_dir=tfds_data_dir,
                                     convert=convert)
            present_splits = tuple(splits)
            count = functools.partial(tfds_split_size, tfds_names[name], tfds_data_dir)
        else:
            if data_dir is None:
                raise ValueError(f"register_p3_train: {name!r} is not in tfds_names and no data_dir was given")
            present_splits = tuple(s for s in splits if os.path.isfile(os.path.join(data_dir, name, f"{s}.jsonl")))
            if not present_splits:
                warnings.warn(f"P3 training dataset {name!r} skipped: no {'/'.join(splits)}.jsonl under "
                              f"{os.path.join(data_dir, name)}", stacklevel=2)
                continue
            read = functools.partial(read_train_jsonl, root=os.path.join(data_dir, name), convert=convert)
            count = functools.partial(jsonl_split_size, os.path.join(data_dir, name))
        fields = instance_fields.get(name)
        task_names = []
        all_templates = load_templates(templates_dir, name)
        templates = all_templates.select(original_task_only)
        eval_splits = tuple(s for s in present_splits if s in EVAL_SPLITS)
        for template, task_name in zip(templates, _template_task_names(f"p3_train_{task_clean(name)}", templates)):
            splits_here = tuple(s for s in present_splits if s not in eval_splits or template.answer_choices)
            examples = _examples_fn(read, template, fields, task_name, eval_splits, max_examples_per_task)
            _register(task_name, examples, splits_here, vocabulary, eval_splits)
            task_names.append(task_name)
        if not task_names:
            warnings.warn(f"P3 training dataset {name!r} skipped: no templates selected", stacklevel=2)
            continue
        registered[name] = task_names
        if mixing_cap is not None:
            size_split = "train" if "train" in present_splits else present_splits[0]
            rate = _T0Rate(functools.partial(count, size_split), len(all_templates.templates), mixing_cap,
                           max_examples_per_task)
            rates.update({t: rate for t in task_names})
    if not registered:
        raise FileNotFoundError(f"register_p3_train: no data found for any of {list(dataset_names)}")
    common.register_mixture(mixture_name, [t for ts in registered.values() for t in ts], rates=rates)
    return registered


@dataclasses.dataclass(frozen=True)
class _T0Rate:
    """A template's mixing rate as t-zero computes it (`mixture_cap`), from its dataset's size, counted once."""

    count: Callable[[], int]
    num_templates: int
    cap: int
    max_examples: int | None = None

    def __call__(self, task: seqio.Task | None = None) -> float:
        size = self.count()
        rate = size if size <= self.cap else self.cap // self.num_templates
        return float(rate if self.max_examples is None else min(rate, self.max_examples))
