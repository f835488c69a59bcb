"""Rendering one P3 (example, template) into the feature contract (instance fields masked in the instruction),
streaming rendered examples into tf.data, and the rank-classification expansion of evaluation examples.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterable, Mapping, Sequence

import tensorflow as tf

from tagi_jax import features as F
from tasks.p3.templates import ANSWER_CHOICES, Template

LABEL, IDX = "label", "idx"

# How the feature contract (tagi_jax/features.py) is filled for P3, per (example, template):
#   full_inputs   the rendered prompt exactly as T0 sees it (the input side of the template).
#   hyper_inputs  the instruction: the same template rendered from the example with every *instance field*
#                 (the dataset's text fields: premise, hypothesis, choices, sentences...) replaced by a placeholder
#                 `{field}` (list fields element-wise: `{endings[0]}`). Control fields (labels, indices, COPA's
#                 `question`) keep their values, so conditional templates render their real branch.
#                 e.g. RTE: '{premise} Using only the above description ..., is "{hypothesis}" definitely correct?
#                 Yes or no?'. Expressions that compute on instance text (WSC's `text.split(" ")[span2_index:]`)
#                 see the placeholder, not the text.
#   inputs        the instance only: one line `field: value` for each instance field whose placeholder the
#                 instruction shows (all instance fields if it shows none), in the dataset's field order.
#   targets       the rendered target (the correct answer choice); task_name the registered task name.
# Evaluation examples (splits validation/test) also carry `references` ([targets]) and, for rank
# classification, `answer_choices` (the rendered choices, a string list), `label` (int32: the index of
# `targets` in `answer_choices`, as T0's evaluation computes it) and `idx` (int32: the example's row in the raw
# split). Examples whose rendering leaves the input or target empty are dropped, as in T0 (e.g. COPA templates
# written for one question type only). `expand_rank_classification` turns an evaluation dataset into one example
# per answer choice in the t5/seqio rank-classification layout.


def _choice_seed(template: Template, example: Mapping[str, Any]) -> int:
    blob = json.dumps(example, sort_keys=True, default=str) + template.id
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "little")


def _placeholder(field: str) -> str:
    return "{" + field + "}"


def mask_instance(example: Mapping[str, Any], instance_fields: Sequence[str]) -> dict[str, Any]:
    """The example with each instance field replaced by `{field}` (lists element-wise: `{field[i]}`)."""
    masked = dict(example)
    for field in instance_fields:
        value = example.get(field)
        if isinstance(value, str):
            masked[field] = _placeholder(field)
        elif isinstance(value, (list, tuple)):
            masked[field] = [_placeholder(f"{field}[{i}]") for i in range(len(value))]
    return masked


def instance_text(example: Mapping[str, Any], instance_fields: Sequence[str], instruction: str) -> str:
    """`field: value` lines for the instance fields the instruction refers to (all of them if none)."""
    lines, shown = [], []
    for field in instance_fields:
        value = example.get(field)
        if isinstance(value, str):
            items = [(field, value)]
        elif isinstance(value, (list, tuple)):
            items = [(f"{field}[{i}]", str(v)) for i, v in enumerate(value)]
        else:
            continue
        lines.extend(items)
        shown.extend(item for item in items if _placeholder(item[0]) in instruction)
    return "\n".join(f"{k}: {v}" for k, v in (shown or lines))


def render_example(
    template: Template,
    example: Mapping[str, Any],
    instance_fields: Sequence[str],
    task_name: str,
    with_choices: bool,
    where: str = "",
) -> dict[str, Any] | None:
    """One (example, template) -> the feature-contract dict, or None when the template renders it empty."""
    seed = _choice_seed(template, example)
    choices = template.answer_choices_list(example, seed)
    parts = template.apply(example, seed, answer_choices=choices)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    full_inputs, target = parts
    hyper = template.apply(mask_instance(example, instance_fields), seed)[0]
    out = {
        F.INPUTS: instance_text(example, instance_fields, hyper),
        F.HYPER_INPUTS: hyper,
        F.FULL_INPUTS: full_inputs,
        F.TARGETS: target,
        F.TASK_NAME: task_name,
    }
    if with_choices:
        if not choices:
            raise ValueError(f"{where}template {template.name!r} has no answer_choices; rank classification needs them")
        if target not in choices:
            raise ValueError(f"{where}template {template.name!r}: target {target!r} is not one of the answer "
                             f"choices {choices}")
        out.update({F.REFERENCES: [target], ANSWER_CHOICES: choices, LABEL: choices.index(target)})
    return out


def _signature(with_choices: bool) -> dict[str, tf.TensorSpec]:
    sig = {name: tf.TensorSpec((), tf.string) for name in F.STRING_FEATURES}
    if with_choices:
        sig[F.REFERENCES] = tf.TensorSpec([None], tf.string)
        sig[ANSWER_CHOICES] = tf.TensorSpec([None], tf.string)
        sig[LABEL] = tf.TensorSpec((), tf.int32)
        sig[IDX] = tf.TensorSpec((), tf.int32)
    return sig


def to_dataset(examples: Callable[[], Iterable[Mapping[str, Any]]], with_choices: bool) -> tf.data.Dataset:
    """Stream rendered examples (a generator function) into tf.data with fixed feature specs."""
    sig = _signature(with_choices)

    def gen():
        for ex in examples():
            yield {k: ex[k] for k in sig}

    return tf.data.Dataset.from_generator(gen, output_signature=sig)


def expand_rank_classification(dataset: tf.data.Dataset, vocabulary=None) -> tf.data.Dataset:
    """Evaluation examples -> one example per answer choice (t5/seqio rank-classification layout).

    Each row gets `targets` = the choice, `idx` = [example idx, choice index] and `is_correct` = (choice index
    == label); other features are repeated. On a tokenized dataset (a task's output, with
    `targets_pretokenized`) pass the task's `vocabulary`: the choice becomes `targets_pretokenized` and its
    tokens + EOS the new `targets`. Score each row, then `tagi_jax.metrics.group_choice_scores` regroups them.
    """
    tokenized = f"{F.TARGETS}_pretokenized" in dataset.element_spec
    if tokenized and vocabulary is None:
        raise ValueError("expand_rank_classification: the dataset is tokenized; pass the task's vocabulary")

    def expand(ex):
        choices = ex[ANSWER_CHOICES]
        n = tf.shape(choices)[0]
        positions = tf.range(n, dtype=tf.int32)
        rows = {k: tf.repeat(tf.expand_dims(v, 0), n, axis=0) for k, v in ex.items()
                if k not in (F.TARGETS, f"{F.TARGETS}_pretokenized", IDX, ANSWER_CHOICES, F.REFERENCES)}
        rows[IDX] = tf.stack([tf.fill([n], ex[IDX]), positions], axis=1)
        rows["is_correct"] = tf.equal(positions, ex[LABEL])
        rows[f"{F.TARGETS}_pretokenized" if tokenized else F.TARGETS] = choices
        return tf.data.Dataset.from_tensor_slices(rows)

    def tokenize(ex):
        tokens = vocabulary.encode_tf(ex[f"{F.TARGETS}_pretokenized"])
        eos = tf.constant([vocabulary.eos_id], tokens.dtype)
        return {**ex, F.TARGETS: tf.cast(tf.concat([tokens, eos], axis=0), target_dtype)}

    target_dtype = dataset.element_spec[F.TARGETS].dtype
    dataset = dataset.flat_map(expand)
    if tokenized:
        dataset = dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset


def string_fields(example: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(k for k, v in example.items()
                 if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v)))

