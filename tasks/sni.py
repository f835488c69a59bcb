"""Super-NaturalInstructions (SNI v2) as SeqIO tasks: reading and validating a natural-instructions checkout,
building each task's examples in the Tk-Instruct format (tasks/formatting.py) and registering tasks and mixtures.
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import re
from typing import Callable, Mapping, Sequence

import seqio
import tensorflow as tf
from absl import logging

from tagi_jax import features as F
from tasks.common import function_source, register_task
from tasks.formatting import tk_instruct_texts

SETTINGS = ("def", "def_pos2", "def_pos2_neg2")
TRAIN, TEST = "train", "test"
_SPLIT_FILES = {TRAIN: "train_tasks.txt", TEST: "test_tasks.txt"}
_INVALID_NAME_CHARS = re.compile(r"[^\w\d\.\:_#]")


class SNIFormatError(ValueError):
    """A task file that cannot be used; the message names the file and the field."""


class _NaN:
    """What a bare NaN/Infinity in a task file parses to, so that using it is reported, not stringified."""

    def __repr__(self):
        return "NaN"


_NAN = _NaN()


# ------------------------------------------------------------------------------------------- files
def seqio_task_name(sni_task: str, prefix: str = "sni") -> str:
    """The registered SeqIO name (and `task_name` feature) of an SNI task."""
    return f"{prefix}_{_INVALID_NAME_CHARS.sub('_', sni_task)}"


def read_split(sni_dir: str, split_name: str = "default") -> dict[str, list[str]]:
    """{"train": [...], "test": [...]} task names of `splits/<split_name>/`, checked to exist."""
    if not os.path.isdir(sni_dir):
        raise FileNotFoundError(f"SNI: directory not found: {sni_dir}")
    tasks_dir = os.path.join(sni_dir, "tasks")
    if not os.path.isdir(tasks_dir):
        raise FileNotFoundError(f"SNI: no tasks/ folder in {sni_dir} (expected a natural-instructions checkout)")
    split_dir = os.path.join(sni_dir, "splits", split_name)
    out = {}
    for split, filename in _SPLIT_FILES.items():
        path = os.path.join(split_dir, filename)
        if not os.path.isfile(path):
            splits_root = os.path.join(sni_dir, "splits")
            available = sorted(os.listdir(splits_root)) if os.path.isdir(splits_root) else []
            raise FileNotFoundError(f"SNI: split file not found: {path} (split_name={split_name!r}; "
                                    f"available: {available})")
        with open(path, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
        deduped = list(dict.fromkeys(names))
        if len(deduped) != len(names):
            logging.warning("SNI: %s lists some tasks more than once; using each once", path)
        out[split] = deduped
    return out


def task_path(sni_dir: str, sni_task: str) -> str:
    return os.path.join(sni_dir, "tasks", sni_task + ".json")


def load_task_file(path: str) -> dict:
    """Parses and validates one SNI task file; raises SNIFormatError naming the file and field."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise SNIFormatError(f"{path}: cannot read: {e}") from e
    try:
        data = json.loads(text, parse_constant=lambda _: _NAN)
    except json.JSONDecodeError as e:
        raise SNIFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(data, dict):
        raise SNIFormatError(f"{path}: top level must be a JSON object, got {type(data).__name__}")
    _validate_task(data, path)
    return data


def _bad(path: str, field: str, why: str) -> SNIFormatError:
    return SNIFormatError(f"{path}: field {field!r}: {why}")


def _check_text(value, path: str, field: str, allow_empty: bool = True) -> None:
    if value is _NAN or (isinstance(value, float) and math.isnan(value)):
        raise _bad(path, field, "is NaN")
    if not isinstance(value, str):
        raise _bad(path, field, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _bad(path, field, "is empty")


def _validate_task(data: dict, path: str) -> None:
    if "Definition" not in data:
        raise _bad(path, "Definition", "missing")
    definition = data["Definition"]
    if isinstance(definition, list):
        if not definition:
            raise _bad(path, "Definition", "empty list")
        _check_text(definition[0], path, "Definition[0]", allow_empty=False)
    else:
        _check_text(definition, path, "Definition", allow_empty=False)
    for key in ("Positive Examples", "Negative Examples"):
        examples = data.get(key, [])
        if not isinstance(examples, list):
            raise _bad(path, key, f"must be a list, got {type(examples).__name__}")
        for i, ex in enumerate(examples):
            if not isinstance(ex, dict):
                raise _bad(path, f"{key}[{i}]", "must be an object")
            for field in ("input", "output"):
                if field not in ex:
                    raise _bad(path, f"{key}[{i}].{field}", "missing")
                _check_text(ex[field], path, f"{key}[{i}].{field}")
            if "explanation" in ex:
                _check_text(ex["explanation"], path, f"{key}[{i}].explanation")
    if "Instances" not in data:
        raise _bad(path, "Instances", "missing")
    instances = data["Instances"]
    if not isinstance(instances, list) or not instances:
        raise _bad(path, "Instances", "must be a non-empty list")
    for i, inst in enumerate(instances):
        if not isinstance(inst, dict):
            raise _bad(path, f"Instances[{i}]", "must be an object")
        if "input" not in inst:
            raise _bad(path, f"Instances[{i}].input", "missing")
        _check_text(inst["input"], path, f"Instances[{i}].input")
        outputs = inst.get("output")
        if outputs is None:
            raise _bad(path, f"Instances[{i}].output", "missing")
        if isinstance(outputs, str):
            outputs = [outputs]
        if not isinstance(outputs, list) or not outputs:
            raise _bad(path, f"Instances[{i}].output", "empty (no reference answer)")
        for j, out in enumerate(outputs):
            _check_text(out, path, f"Instances[{i}].output[{j}]")
        if not any(o.strip() for o in outputs):
            raise _bad(path, f"Instances[{i}].output", "every reference is empty")


def _references(instance: Mapping) -> list[str]:
    outputs = instance["output"]
    return [outputs] if isinstance(outputs, str) else list(outputs)


def task_category(path: str) -> str:
    """`Categories[0]` of a task file, read from the file's head (Categories comes before Instances)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(65536)
    m = re.search(r'"Categories"\s*:\s*(\[[^\]]*\])', head)
    categories = json.loads(m.group(1)) if m else None
    if categories is None:
        with open(path, encoding="utf-8") as f:
            try:
                categories = json.load(f, parse_constant=lambda _: _NAN).get("Categories")
            except json.JSONDecodeError as e:
                raise SNIFormatError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(categories, list) or not categories or not isinstance(categories[0], str):
        raise _bad(path, "Categories", "missing or empty")
    return categories[0]


def sni_task_categories(sni_dir: str, split_name: str = "default", prefix: str = "sni") -> dict[str, str]:
    """{task_name feature (see `seqio_task_name`): category} for every task of the split's lists."""
    split = read_split(sni_dir, split_name)
    names = list(dict.fromkeys(split[TRAIN] + split[TEST]))
    return {seqio_task_name(n, prefix): task_category(task_path(sni_dir, n)) for n in names}


# ------------------------------------------------------------------------------------------ prompt
def setting_counts(setting: str, num_pos: int, num_neg: int) -> tuple[int, int]:
    """(positive, negative) example counts of a setting; `num_pos`/`num_neg` set the k of pos2/neg2."""
    if setting not in SETTINGS:
        raise ValueError(f"SNI: setting must be one of {SETTINGS}, got {setting!r}")
    if num_pos < 0 or num_neg < 0:
        raise ValueError(f"SNI: num_pos and num_neg must be >= 0, got {num_pos}, {num_neg}")
    return {"def": (0, 0), "def_pos2": (num_pos, 0), "def_pos2_neg2": (num_pos, num_neg)}[setting]


# -------------------------------------------------------------------------------------- examples
# Per example: the text features of tasks.formatting.tk_instruct_texts (hyper_inputs, inputs, full_inputs), and
#   targets       train: one reference chosen from the seed; test: the first reference
#   references    test split only: every reference
def build_examples(
    task: Mapping,
    task_name: str,
    split: str,
    num_pos: int,
    num_neg: int,
    add_explanation: bool = False,
    max_instances: int | None = None,
    seed: int = 42,
    rng_key: str = "",
    token_length: Callable[[str], int] | None = None,
    max_source_length: int | None = None,
    max_instruction_chars: int | None = None,
) -> list[dict]:
    """The example dicts of one validated task for split "train" or "test".

    test: the first `max_instances` (default 100: the official, label-balanced evaluation instances) in file
    order, `targets` the first reference, `references` all. train: like Tk-Instruct, the instances are
    shuffled and cut to `max_instances` (None: all, in file order), then one reference is chosen; both
    from `random.Random(f"{seed}:{rng_key}")`, so the same seed gives the same data on every machine.
    """
    instances = list(task["Instances"])
    if split == TEST:
        instances = instances[: 100 if max_instances is None else max_instances]
    elif split == TRAIN:
        rng = random.Random(f"{seed}:{rng_key}")
        if max_instances is not None:
            rng.shuffle(instances)
            instances = instances[:max_instances]
    else:
        raise ValueError(f"SNI: split must be 'train' or 'test', got {split!r}")
    examples = []
    for inst in instances:
        refs = _references(inst)
        texts = tk_instruct_texts(task, inst["input"], num_pos=num_pos, num_neg=num_neg,
                                  add_explanation=add_explanation, token_length=token_length,
                                  max_source_length=max_source_length,
                                  max_instruction_chars=max_instruction_chars)
        ex = {**texts, F.TASK_NAME: task_name}
        if split == TEST:
            ex[F.TARGETS] = refs[0]
            ex[F.REFERENCES] = refs
        else:
            ex[F.TARGETS] = rng.choice(refs)
        examples.append(ex)
    return examples


# ---------------------------------------------------------------------------------- registration
# `register_sni(sni_dir, vocabulary, ...)` reads a natural-instructions checkout (`tasks/<task>.json`,
# `splits/<split_name>/{train,test}_tasks.txt`) and registers one task per SNI task (`<prefix>_<task>`, with
# characters SeqIO forbids replaced by `_`) plus the mixtures `<prefix>_train` and `<prefix>_test`. Registration
# only checks that the directory, split lists and listed files exist; task files are parsed when a dataset is
# requested (except with `skip_bad_tasks=True`, which has to parse every file to know what to skip).
def _concatenate(datasets, rates, seed):
    """Every example of every task once, in task order: a complete, deterministic evaluation pass."""
    del rates, seed
    return functools.reduce(lambda a, b: a.concatenate(b), datasets)


# SeqIO's default sampling stops at the first exhausted task, which would silently cut a one-epoch pass
# short (tasks have different sizes): training keeps sampling until every task is used up, and the
# evaluation mixture is a plain concatenation.
_SAMPLE_FNS = {
    TRAIN: functools.partial(tf.data.Dataset.sample_from_datasets, stop_on_empty_dataset=False),
    TEST: _concatenate,
}


def _register_mixture(name: str, task_names: Sequence[str], sample_fn) -> seqio.Mixture:
    if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
    return seqio.MixtureRegistry.add(name, [(t, 1.0) for t in task_names], sample_fn=sample_fn)


def register_sni(
    sni_dir: str,
    vocabulary,
    setting: str = "def_pos2",
    num_pos: int = 2,
    num_neg: int = 2,
    add_explanation: bool = False,
    max_train_instances: int | None = 100,
    max_test_instances: int = 100,
    seed: int = 42,
    skip_bad_tasks: bool = False,
    max_instruction_chars: int | None = None,
    split_name: str = "default",
    max_source_length: int | None = 1024,
    prefix: str = "sni",
    metric_fns: Sequence[Callable] = (),
    postprocess_fn: Callable | None = None,
) -> list[str]:
    """Registers one SeqIO task per SNI task of the split and mixtures `<prefix>_train`, `<prefix>_test`.

    Train-list tasks get split "train", test-list tasks split "test" (with `references`). `setting` is
    one of SETTINGS; `num_pos`/`num_neg` are the k of pos2/neg2. `max_source_length` (tokens, with
    `vocabulary`, EOS counted; None: no limit) drops demonstration examples that would overflow, as
    Tk-Instruct does. `max_instruction_chars` cuts long definitions before formatting. Bad task files
    raise SNIFormatError naming file and field when their data is read, or, with `skip_bad_tasks=True`,
    are found at registration (every listed file is parsed then) and skipped with a warning.
    Returns the registered task names.
    """
    n_pos, n_neg = setting_counts(setting, num_pos, num_neg)
    if max_instruction_chars is not None and max_instruction_chars < 1:
        raise ValueError(f"SNI: max_instruction_chars must be >= 1 or None, got {max_instruction_chars}")
    split_tasks = read_split(sni_dir, split_name)

    # Which splits each listed task has (a task listed twice gets both).
    splits_of: dict[str, list[str]] = {}
    for split in (TRAIN, TEST):
        for name in split_tasks[split]:
            splits_of.setdefault(name, []).append(split)

    usable: dict[str, list[str]] = {}
    seqio_names: dict[str, str] = {}
    for name, splits in splits_of.items():
        path = task_path(sni_dir, name)
        problem = None
        if not os.path.isfile(path):
            problem = f"{path}: task file listed in splits/{split_name} not found"
        elif skip_bad_tasks:
            try:
                load_task_file(path)
            except SNIFormatError as e:
                problem = str(e)
        if problem is not None:
            if not skip_bad_tasks:
                raise FileNotFoundError(f"SNI: {problem}")
            logging.warning("SNI: skipping task %s: %s", name, problem)
            continue
        seqio_name = seqio_task_name(name, prefix)
        if seqio_name in seqio_names:
            raise ValueError(f"SNI: tasks {seqio_names[seqio_name]!r} and {name!r} both map to {seqio_name!r}")
        seqio_names[seqio_name] = name
        usable[name] = splits

    def token_length(text: str) -> int:
        return len(vocabulary.encode(text)) + 1  # + EOS, as the HF tokenizer Tk-Instruct measures with

    registered = []
    for name, splits in usable.items():
        seqio_name = seqio_task_name(name, prefix)
        path = task_path(sni_dir, name)

        def examples_fn(split, _path=path, _name=name, _seqio_name=seqio_name):
            task = load_task_file(_path)
            return build_examples(
                task, _seqio_name, split, n_pos, n_neg, add_explanation=add_explanation,
                max_instances=max_test_instances if split == TEST else max_train_instances,
                seed=seed, rng_key=_name, token_length=token_length if max_source_length else None,
                max_source_length=max_source_length, max_instruction_chars=max_instruction_chars)

        source = function_source(examples_fn, splits=splits, eval_splits=(TEST,))
        register_task(seqio_name, source, vocabulary, metric_fns=metric_fns, postprocess_fn=postprocess_fn)
        registered.append(seqio_name)

    for split in (TRAIN, TEST):
        members = [seqio_task_name(n, prefix) for n in split_tasks[split] if n in usable]
        if members:
            _register_mixture(f"{prefix}_{split}", members, _SAMPLE_FNS[split])
        else:
            logging.warning("SNI: no usable %s tasks in splits/%s; mixture %s_%s not registered",
                            split, split_name, prefix, split)
    logging.info("SNI: registered %d tasks (setting %s) from %s", len(registered), setting, sni_dir)
    return registered
