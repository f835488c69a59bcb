"""The generation protocol (Super-NaturalInstructions, the synthetic suite): decode every example, greedy or
beam search, with its task's generated adapter (batches mix tasks), and score it with the official SNI metrics
(or, for open-domain QA, the DPR exact match)."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from tagi_jax import features as F
from tagi_jax import metrics as metrics_lib
from tagi_jax.eval.adapters import AdapterCache, adapter_setup
from tagi_jax.eval.decode import decode_tokens, detokenize, tokenize
from tagi_jax.eval.examples import categories_of, check_examples, example_id, example_references
from tagi_jax.eval.report import timing
from tagi_jax.run.stages import check_method


SCORINGS = ("sni", "qa")


def _qa_scores(predictions, references, task_names) -> dict:
    """Open-domain QA exact match overall and per task (dataset split), with the example count."""
    result = metrics_lib.qa_metrics(predictions, references)
    per_task = {}
    for task in sorted(set(task_names)):
        idx = [i for i, t in enumerate(task_names) if t == task]
        per_task[task] = metrics_lib.qa_metrics([predictions[i] for i in idx], [references[i] for i in idx])
    return {**result, "per_task": per_task, "num_examples": len(predictions)}


def evaluate(
    method: str,
    model,
    params,
    examples: Sequence[Mapping[str, Any]],
    vocab,
    *,
    lengths: Mapping[str, int],
    batch_size: int,
    max_decode_len: int = 128,
    beam_size: int = 1,
    cache: AdapterCache | None = None,
    categories: Mapping[str, str] | None = None,
    alpha: float = 0.6,
    length_penalty_style: str = "t5x",
    scoring: str = "sni",
) -> tuple[list[dict], dict]:
    """Decode every example and score it with the official SNI metrics.

    Args:
      method: one of `tagi_jax.run.stages.METHODS` (which says what each reads).
      model, params: a `tagi_jax.models.tagi.TAGI` and its parameter tree (baselines use `params["t5"]`).
      examples: dicts with the string features, `task_name`, `references` (or `targets`), optionally `id` and
        `category`. Batches mix tasks freely.
      lengths: token lengths per text feature (`inputs`, `hyper_inputs`, `full_inputs`).
      batch_size: examples per decoding batch, and instructions per generation batch.
      max_decode_len, beam_size: greedy when beam_size == 1 (SNI: 128 tokens), else beam search.
      categories: task name -> category, for examples without a `category` field.
      scoring: "sni" (the official SNI exact match and ROUGE-L) or "qa" (open-domain QA exact match,
        `metrics.qa_metrics`: {"em", "per_task": {task: {"em"}}}).
    Returns:
      (records [{"id", "task_name", "prediction", "references"}], metrics): `sni_metrics` overall, `per_task`,
      `per_category` (when every example has a category), plus timing and truncation counts.
    """
    check_examples(examples, method)
    if scoring not in SCORINGS:
        raise ValueError(f"evaluate: scoring must be one of {SCORINGS}, got {scoring!r}")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    table, rows = adapter_setup(method, model, params, examples, vocab, lengths, batch_size, cache)
    input_key = check_method(method).encoder_input
    enc, truncated = tokenize(vocab, [ex[input_key] for ex in examples], int(lengths[input_key]))
    tree = table.device_tree() if table is not None else None
    tokens, seconds, compile_seconds = decode_tokens(
        model, params, tree, rows, enc, vocab=vocab, batch_size=batch_size, max_decode_len=max_decode_len,
        beam_size=beam_size, alpha=alpha, length_penalty_style=length_penalty_style,
        passages=input_key == F.FULL_INPUTS)
    predictions = detokenize(vocab, tokens)

    references = [example_references(ex) for ex in examples]
    task_names = [str(ex[F.TASK_NAME]) for ex in examples]
    cats = categories_of(examples, categories)
    if scoring == "qa":
        result = _qa_scores(predictions, references, task_names)
    else:
        result = metrics_lib.sni_metrics(predictions, references, task_names, cats)
    result.update(timing(len(examples), table, seconds, compile_seconds))
    result.update({"method": method, "num_tasks": len(set(task_names)), "beam_size": int(beam_size),
                   "max_decode_len": int(max_decode_len), "truncated_inputs": truncated})
    records = [{"id": example_id(ex, i), "task_name": task_names[i], "prediction": predictions[i],
                "references": references[i]} for i, ex in enumerate(examples)]
    return records, result
