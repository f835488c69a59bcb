"""T0's rank-classification protocol (P3): every answer choice scored with the example's adapter (token-averaged
log-likelihood), the best one wins; accuracy per template, per dataset and the MTest11 / HyperT5 averages."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from tagi_jax import features as F
from tagi_jax import metrics as metrics_lib
from tagi_jax.eval.adapters import AdapterCache, adapter_setup
from tagi_jax.eval.decode import score_tokens, shift_right, tokenize
from tagi_jax.eval.examples import check_examples, example_id
from tagi_jax.eval.report import timing
from tagi_jax.run.stages import check_method
from tasks.p3.datasets import ANLI_ROUNDS, HYPERT5, MTEST11

ANSWER_CHOICES, LABEL = "answer_choices", "label"


def evaluate_rank_classification(
    method: str,
    model,
    params,
    examples: Sequence[Mapping[str, Any]],
    vocab,
    *,
    lengths: Mapping[str, int],
    batch_size: int,
    cache: AdapterCache | None = None,
    length_normalize: bool = True,
) -> tuple[list[dict], dict]:
    """T0-style rank classification: every answer choice scored with the example's adapter, best one wins.

    Examples carry `answer_choices` (strings) and `label` (index of the correct one). The score of a choice is
    its token-averaged log-likelihood (`length_normalize=False`: the summed one). Accuracy per task (a P3
    task is one template), overall, and, for `p3_<dataset>_<template>` task names, `metrics.p3_summary`
    (per-dataset means over templates, MTest11 and HyperT5 averages).
    """
    check_examples(examples, method, extra=(ANSWER_CHOICES, LABEL))
    table, rows = adapter_setup(method, model, params, examples, vocab, lengths, batch_size, cache)
    input_key = check_method(method).encoder_input
    flat_example, flat_texts, flat_choices = [], [], []
    for i, ex in enumerate(examples):
        choices = [str(c) for c in ex[ANSWER_CHOICES]]
        if not choices:
            raise ValueError(f"evaluate_rank_classification: example {i} (task {ex[F.TASK_NAME]!r}) has no answer choices")
        if not 0 <= int(ex[LABEL]) < len(choices):
            raise ValueError(f"evaluate_rank_classification: example {i} (task {ex[F.TASK_NAME]!r}) has label "
                             f"{ex[LABEL]} but {len(choices)} answer choices")
        for c in choices:
            flat_example.append(i)
            flat_choices.append(c)
        flat_texts.append(ex[input_key])
    enc_per_example, truncated = tokenize(vocab, flat_texts, int(lengths[input_key]))
    targets, truncated_targets = tokenize(vocab, flat_choices, int(lengths[F.TARGETS]))
    flat_example = np.asarray(flat_example, np.int32)
    enc = enc_per_example[flat_example]
    dec = shift_right(targets, int(model.config.t5.decoder_start_token_id))
    tree = table.device_tree() if table is not None else None
    total, mean, seconds, compile_seconds = score_tokens(model, params, tree, rows[flat_example], enc, dec, targets,
                                                         batch_size=batch_size,
                                                         passages=input_key == F.FULL_INPUTS)
    scores = mean if length_normalize else total

    per_example_scores: list[list[float]] = [[] for _ in examples]
    for i, s in zip(flat_example.tolist(), scores.tolist()):
        per_example_scores[i].append(s)
    by_task: dict[str, list[int]] = {}
    records = []
    for i, ex in enumerate(examples):
        task = str(ex[F.TASK_NAME])
        by_task.setdefault(task, []).append(i)
        choices = [str(c) for c in ex[ANSWER_CHOICES]]
        pick = int(np.argmax(per_example_scores[i]))
        records.append({"id": example_id(ex, i), "task_name": task, "prediction": choices[pick],
                        "references": [choices[int(ex[LABEL])]], "label": int(ex[LABEL]), "choice": pick,
                        "scores": [round(s, 6) for s in per_example_scores[i]]})
    per_task = {
        task: metrics_lib.rank_classification_accuracy([per_example_scores[i] for i in idx],
                                                       [int(examples[i][LABEL]) for i in idx])
        for task, idx in by_task.items()
    }
    result: dict = {
        "accuracy": metrics_lib.rank_classification_accuracy(per_example_scores, [int(ex[LABEL]) for ex in examples]),
        "per_task": per_task,
    }
    try:
        result["p3"] = metrics_lib.p3_summary(per_task, mtest11=MTEST11, hypert5=HYPERT5, anli_rounds=ANLI_ROUNDS)
    except ValueError:
        pass  # task names that are not P3 templates: per-task accuracies only
    result.update(timing(len(examples), table, seconds, compile_seconds))
    result.update({"method": method, "num_tasks": len(per_task), "num_choices_scored": int(len(flat_example)),
                   "length_normalized": bool(length_normalize), "truncated_inputs": truncated,
                   "truncated_choices": truncated_targets})
    return records, result
