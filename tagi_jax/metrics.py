"""Evaluation metrics: the official Super-NaturalInstructions scorer, P3/T0 rank classification and open-domain
QA exact match.

Pure Python/NumPy, no model code: the evaluator hands in strings or scores and gets numbers back.

* `sni_metrics` reproduces natural-instructions `eval/automatic/evaluation.py` (the default, English track):
  exact match after SQuAD-style normalisation *without* article removal, ROUGE-L F-measure from the
  `rouge-score` package with the Porter stemmer and its default tokenizer, each the maximum over an instance's
  references, averaged over instances (micro) and multiplied by 100, rounded to 4 decimals as the official
  script does. Per-task and per-category breakdowns are computed the same way on each group's instances.
* `rank_classification_accuracy` and `p3_summary` implement the T0 protocol: the prediction for an instance is
  the answer choice the model scores highest; accuracy per template, averaged over a dataset's templates, then
  over datasets (two published averages, see `p3_summary`).
* `qa_metrics` is the exact match of open-domain QA (NQ-open, WebQuestions, TriviaQA) as DPR / FiD score it:
  the SQuAD v1.1 normalisation *with* article removal (`normalize_qa_answer`), the maximum over an instance's
  references, averaged over instances and multiplied by 100.
"""
from __future__ import annotations

import math
import re
import string
from typing import Mapping, Sequence

import numpy as np

# ---------------------------------------------------------------------------------------------------------------
# Super-NaturalInstructions
# ---------------------------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ROUGE_SCORER = None


def normalize_answer(text: str) -> str:
    """Lowercase, drop ASCII punctuation, collapse whitespace (articles are kept, unlike SQuAD)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def _rouge_scorer():
    # Built lazily: importing rouge_score pulls in nltk, which the rest of the package does not need.
    global _ROUGE_SCORER
    if _ROUGE_SCORER is None:
        from rouge_score import rouge_scorer

        _ROUGE_SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE_SCORER


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score's default tokenizer: lowercase, [a-z0-9] tokens, Porter stem > 3 chars)."""
    return _rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure


def _check_references(references: Sequence[Sequence[str]], n: int, caller: str = "sni_metrics") -> None:
    if len(references) != n:
        raise ValueError(f"{caller}: {n} predictions but {len(references)} reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, (str, bytes)):
            raise ValueError(f"{caller}: references[{i}] is a string; expected a list of reference strings")
        if len(refs) == 0:
            raise ValueError(f"{caller}: references[{i}] is empty; every instance needs at least one reference")


def _micro_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    em = sum(max(exact_match(p, r) for r in refs) for p, refs in zip(predictions, references))
    rl = sum(max(rouge_l(p, r) for r in refs) for p, refs in zip(predictions, references))
    n = len(predictions)
    return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rl / n, 4)}


def _grouped(predictions, references, groups) -> dict[str, dict[str, float]]:
    by_group: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by_group.setdefault(g, []).append(i)
    return {
        g: _micro_scores([predictions[i] for i in idx], [references[i] for i in idx])
        for g, idx in by_group.items()
    }


def _text(value) -> str:
    """Strings as given; bytes (what tf.data hands back) decoded as UTF-8."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def category_key(category: str) -> str:
    """The official scorer's group key for a category: lowercased, words joined by '_'."""
    return "_".join(category.lower().split())


def sni_metrics(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    task_names: Sequence[str] | None = None,
    categories: Sequence[str] | None = None,
) -> dict:
    """Exact match and ROUGE-L as the official SNI scorer computes them (values in [0, 100]).

    Args:
      predictions: one predicted string per instance (an empty string scores 0 unless a reference normalises
        to the empty string too, exactly as officially).
      references: one list of reference strings per instance; the best reference counts.
      task_names: optional task name per instance -> adds `per_task: {task: {exact_match, rougeL}}`.
      categories: optional category per instance -> adds `per_category` keyed by `category_key(category)`
        ("Textual Entailment" -> "textual_entailment"), as the official script keys them.
    Returns:
      {"exact_match", "rougeL"[, "per_task"][, "per_category"]}, micro-averaged, rounded to 4 decimals.
    """
    predictions = [_text(p) for p in predictions]
    if not predictions:
        raise ValueError("sni_metrics: no predictions to score")
    _check_references(references, len(predictions))
    references = [[_text(r) for r in refs] for refs in references]
    result: dict = _micro_scores(predictions, references)
    for key, groups, keyfn in (("per_task", task_names, str), ("per_category", categories, category_key)):
        if groups is None:
            continue
        if len(groups) != len(predictions):
            raise ValueError(f"sni_metrics: {len(predictions)} predictions but {len(groups)} {key[4:]} labels")
        result[key] = _grouped(predictions, references, [keyfn(_text(g)) for g in groups])
    return result


# ---------------------------------------------------------------------------------------------------------------
# Open-domain QA (DPR / FiD / SQuAD exact match)
# ---------------------------------------------------------------------------------------------------------------

_QA_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_qa_answer(text: str) -> str:
    """DPR/FiD's answer normalisation for exact match (DPR `qa_validation._normalize_answer`, SQuAD v1.1's
    `normalize_answer`), in its order: lowercase, drop ASCII punctuation, articles a/an/the (whole words) -> " ",
    collapse whitespace.

    As there, only `string.punctuation` is removed (curly quotes and dashes stay) and there is no Unicode
    normalisation (DPR applies NFD only in its retrieval `has_answer`, not to exact match): a decomposed "é"
    does not equal a composed one, so the published numbers are reproduced exactly.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _QA_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def qa_exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals the normalised form of any reference, else 0.0."""
    if isinstance(references, (str, bytes)):
        raise ValueError("qa_exact_match: references is a string; expected a list of reference strings")
    if len(references) == 0:
        raise ValueError("qa_exact_match: no references; every instance needs at least one reference")
    pred = normalize_qa_answer(_text(prediction))
    return float(any(pred == normalize_qa_answer(_text(r)) for r in references))


def qa_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Open-domain QA exact match (DPR / FiD / ORQA): {"em": mean over instances of `qa_exact_match` x 100}.

    Args:
      predictions: one predicted answer per instance (strings, or UTF-8 bytes as tf.data hands them back).
      references: one non-empty list of reference answers per instance; any match counts.
    """
    predictions = [_text(p) for p in predictions]
    if not predictions:
        raise ValueError("qa_metrics: no predictions to score")
    _check_references(references, len(predictions), caller="qa_metrics")
    em = sum(qa_exact_match(p, refs) for p, refs in zip(predictions, references))
    return {"em": 100.0 * em / len(predictions)}


# ---------------------------------------------------------------------------------------------------------------
# Rank classification (P3 / T0)
# ---------------------------------------------------------------------------------------------------------------

def rank_classification_accuracy(scores: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """Accuracy (x100) of picking, per instance, the answer choice with the highest score.

    Args:
      scores: per instance, one score per answer choice (e.g. the model's token-averaged log-likelihood of the
        choice); instances may have different numbers of choices. Ties go to the first choice (np.argmax).
      labels: per instance, the index of the correct choice.
    """
    if len(scores) != len(labels):
        raise ValueError(f"rank_classification_accuracy: {len(scores)} score rows but {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("rank_classification_accuracy: no instances to score")
    correct = 0
    for i, (row, label) in enumerate(zip(scores, labels)):
        row = np.asarray(row, dtype=np.float64)
        if row.ndim != 1 or row.size == 0:
            raise ValueError(f"rank_classification_accuracy: scores[{i}] must be a non-empty list of choice scores")
        if not 0 <= int(label) < row.size:
            raise ValueError(f"rank_classification_accuracy: labels[{i}]={label} but only {row.size} choices")
        if np.isnan(row).any():
            raise ValueError(f"rank_classification_accuracy: scores[{i}] contains NaN")
        correct += int(np.argmax(row)) == int(label)
    return 100.0 * correct / len(labels)


def group_choice_scores(
    example_ids: Sequence[int], choice_ids: Sequence[int], scores: Sequence[float], is_correct: Sequence[bool]
) -> tuple[list[list[float]], list[int]]:
    """Regroup one-row-per-choice scores (t5/seqio rank-classification layout: idx = (example, choice),
    is_correct) into per-example score rows and labels for `rank_classification_accuracy`."""
    rows: dict[int, dict[int, float]] = {}
    labels: dict[int, int] = {}
    for ex, ch, s, ok in zip(example_ids, choice_ids, scores, is_correct):
        rows.setdefault(int(ex), {})[int(ch)] = float(s)
        if ok:
            if int(ex) in labels:
                raise ValueError(f"group_choice_scores: example {ex} has more than one correct choice")
            labels[int(ex)] = int(ch)
    out_scores, out_labels = [], []
    for ex in sorted(rows):
        if ex not in labels:
            raise ValueError(f"group_choice_scores: example {ex} has no correct choice")
        choices = rows[ex]
        if sorted(choices) != list(range(len(choices))):
            raise ValueError(f"group_choice_scores: example {ex} has choices {sorted(choices)}, expected 0..n-1")
        out_scores.append([choices[c] for c in range(len(choices))])
        out_labels.append(labels[ex])
    return out_scores, out_labels


def _dataset_of(task_name: str, datasets: Sequence[str]) -> tuple[str, str]:
    """'p3_anli_r1_GPT_3_style' -> ('anli_r1', 'GPT_3_style'), for the given dataset names."""
    name = task_name[3:] if task_name.startswith("p3_") else task_name
    for ds in sorted(datasets, key=len, reverse=True):
        if name.startswith(ds + "_"):
            return ds, name[len(ds) + 1:]
    raise ValueError(f"p3_summary: cannot tell the dataset of task {task_name!r} (expected p3_<dataset>_<template> "
                     f"with <dataset> one of {', '.join(datasets)})")


def _mean(values) -> float | None:
    values = list(values)
    return float(sum(values) / len(values)) if values else None


def p3_summary(per_template_accuracies: Mapping[str, Mapping[str, float]] | Mapping[str, float], *,
               mtest11: Sequence[str], hypert5: Sequence[str], anli_rounds: Sequence[str]) -> dict:
    """Aggregate per-template accuracies the T0 way, with both published averages.

    Args:
      per_template_accuracies: either nested `{dataset: {template: accuracy}}`, or flat `{task_name: accuracy}`
        with task names `p3_<dataset>_<template>` as tasks/p3 registers them. Datasets are those of `mtest11`
        (anli_r1/r2/r3 separately); other datasets are averaged and reported but enter no average.
      mtest11, hypert5, anli_rounds: the dataset lists of the two averages and ANLI's rounds, in order
        (`tasks.p3.datasets.MTEST11`, `HYPERT5`, `ANLI_ROUNDS`).
    Returns:
      per_dataset: {dataset: mean over its templates}.
      mtest11_average: the T0 paper's held-out average, the mean over the 11 datasets RTE, CB, COPA, WiC, WSC,
        Winogrande, ANLI R1, ANLI R2, ANLI R3, HellaSwag, StoryCloze -- over those present;
        `mtest11_missing` lists the absent ones (the average is then not comparable to the paper's).
      hypert5_average: the HyperT5/HINT average: no StoryCloze, and ANLI counted once (R1-R3, those present,
        averaged into one "anli" entry): the mean over RTE, CB, COPA, WiC, WSC, Winogrande, ANLI, HellaSwag;
        `hypert5_missing` lists absent ones. `anli` holds the combined ANLI value when any round is present.
      Averages are None when no dataset of theirs is present.
    """
    nested: dict[str, dict[str, float]] = {}
    for key, value in per_template_accuracies.items():
        if isinstance(value, Mapping):
            nested.setdefault(key, {}).update({str(t): float(a) for t, a in value.items()})
        else:
            ds, template = _dataset_of(key, mtest11)
            nested.setdefault(ds, {})[template] = float(value)
    per_dataset = {}
    for ds, templates in nested.items():
        if not templates:
            raise ValueError(f"p3_summary: dataset {ds!r} has no template accuracies")
        if any(math.isnan(a) for a in templates.values()):
            raise ValueError(f"p3_summary: dataset {ds!r} has a NaN accuracy")
        per_dataset[ds] = _mean(templates.values())

    mtest_present = [d for d in mtest11 if d in per_dataset]
    anli = _mean(per_dataset[d] for d in anli_rounds if d in per_dataset)
    if "anli" in per_dataset:  # ANLI given as one dataset (e.g. already combined): only valid without rounds
        if anli is not None:
            raise ValueError("p3_summary: got both 'anli' and per-round anli_r* accuracies; give one or the other")
        anli = per_dataset["anli"]
    hyper_values = {d: per_dataset[d] for d in hypert5 if d in per_dataset and d != "anli"}
    if anli is not None:
        hyper_values["anli"] = anli
    return {
        "per_dataset": per_dataset,
        "mtest11_average": _mean(per_dataset[d] for d in mtest_present),
        "mtest11_missing": [d for d in mtest11 if d not in per_dataset],
        "anli": anli,
        "hypert5_average": _mean(hyper_values.values()),
        "hypert5_missing": [d for d in hypert5 if d not in hyper_values],
    }
