"""Evaluating trained methods of a work directory on a benchmark: the end of a pipeline run (`evaluate_methods`,
summary.json) and `launch/eval.py` (`run_evaluation`, any benchmark), one evaluator per protocol (`EVALUATORS`)."""
from __future__ import annotations

import copy
import dataclasses
import os
from typing import Callable, Mapping, Sequence

import jax
from absl import logging
from ml_collections import config_dict

from tagi_jax.data.batches import eval_examples, task_lengths
from tagi_jax.data.benchmarks import Benchmark, register_benchmark
from tagi_jax.eval import generation, rank_classification
from tagi_jax.models import quantize
from tagi_jax.eval.adapters import AdapterCache
from tagi_jax.eval.report import format_metrics, format_summary, format_timing, summary_entry, write_json, write_jsonl
from tagi_jax.run.stages import check_method
from tagi_jax.run.workdir import has_checkpoint, load_trained, load_workdir_config, training_progress


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """How examples are read, batched and decoded (`config.eval`, overridable from the command line)."""

    lengths: Mapping[str, int]
    batch_size: int
    max_examples_per_task: int
    max_decode_len: int
    beam_size: int

    @classmethod
    def from_config(cls, config, **overrides) -> "EvalSettings":
        e = config.eval
        values = dict(lengths=task_lengths(config.data), batch_size=int(e.batch_size),
                      max_examples_per_task=int(e.max_examples_per_task), max_decode_len=int(e.max_decode_len),
                      beam_size=int(e.beam_size))
        values.update({k: int(v) for k, v in overrides.items() if v})
        return cls(**values)


def _generate(method, model, params, examples, bench: Benchmark, s: EvalSettings, cache):
    return generation.evaluate(method, model, params, examples, bench.vocabulary, lengths=s.lengths,
                               batch_size=s.batch_size, max_decode_len=s.max_decode_len, beam_size=s.beam_size,
                               categories=bench.categories, cache=cache, scoring=bench.scoring)


def _rank(method, model, params, examples, bench: Benchmark, s: EvalSettings, cache):
    return rank_classification.evaluate_rank_classification(method, model, params, examples, bench.vocabulary,
                                                            lengths=s.lengths, batch_size=s.batch_size, cache=cache)


EVALUATORS: dict[str, Callable] = {"generation": _generate, "rank_classification": _rank}


def _split_examples(bench: Benchmark, splits: Mapping[str, Sequence[str]], s: EvalSettings) -> dict[str, list]:
    return {label: eval_examples(names, None, s.max_examples_per_task, bench.categories)
            for label, names in splits.items()}


def _evaluate(workdir: str, method: str, model, params, bench: Benchmark, examples: Mapping[str, list],
              s: EvalSettings, cache: AdapterCache, predictions_name: Callable[[str], str],
              report: Callable[[str, dict, list], None]) -> dict[str, dict]:
    """The trained `method` on every split: {label: metrics}; predictions written to
    eval/<predictions_name(label)>, `report(label, metrics, examples)` called for each split."""
    evaluator = EVALUATORS[bench.protocol]
    results = {}
    for label, split in examples.items():
        records, results[label] = evaluator(method, model, params, split, bench, s, cache)
        report(label, results[label], split)
        if jax.process_index() == 0:
            write_jsonl(os.path.join(workdir, "eval", predictions_name(label)), records)
    return results


def evaluate_methods(workdir: str, methods: Sequence[str], config, bench: Benchmark) -> dict:
    """Each trained method on the benchmark's evaluation splits, written to summary.json ({method: {split:
    `summary_entry`}}) and printed as a table; methods whose stage has no checkpoint are skipped."""
    settings = EvalSettings.from_config(config)
    examples = _split_examples(bench, bench.eval_splits, settings)
    summary: dict[str, dict] = {}
    for method in methods:
        if not has_checkpoint(workdir, check_method(method).stage):
            logging.warning("summary: method %s has no trained stage %s; skipped", method, check_method(method).stage)
            print(f"warning: {method} is not evaluated: stage '{check_method(method).stage}' has no checkpoint",
                  flush=True)
            continue
        _, model, params = load_trained(workdir, method)
        progress = _progress_note(workdir, method, config)
        cache = AdapterCache(os.path.join(workdir, "adapter_cache"))
        results = _evaluate(workdir, method, model, params, bench, examples, settings, cache,
                            predictions_name=lambda label, method=method: f"{method}_{label}_predictions.jsonl",
                            report=lambda label, m, _, method=method: print(f"{method} / {label}: {format_timing(m)}",
                                                                              flush=True))
        summary[method] = {label: {**summary_entry(m), **progress} for label, m in results.items()}
    if methods and not summary:
        raise FileNotFoundError(f"{workdir}: none of the methods {', '.join(methods)} has a trained stage to "
                                "evaluate (train them first, or list trained ones in pipeline.evaluate)")
    if jax.process_index() == 0:
        write_json(os.path.join(workdir, "summary.json"), summary)
    print(format_summary(summary), flush=True)
    return summary


def _progress_note(workdir: str, method: str, config) -> dict:
    """`training_progress` for the outputs, said on the console too when the stage stopped early."""
    progress = training_progress(workdir, method, config)
    if progress:
        print(f"warning: {method}: stage '{check_method(method).stage}' stopped at step {progress['step']} of "
              f"{progress['steps']}: these are the scores of a partly trained model", flush=True)
    return progress


def _shared_data_path(sub: str) -> str:
    root = os.environ.get("TAGI_SHARED_DATA", "")
    return os.path.join(root, sub) if root else ""


def eval_data_config(config, benchmark: str | None = None, *, sni_dir: str | None = None,
                     p3_templates_dir: str | None = None, p3_data_dir: str | None = None,
                     p3_datasets: Sequence[str] | None = None) -> config_dict.ConfigDict:
    """A copy of the run config's `data` section with `launch/eval.py`'s choices applied: another benchmark, its
    directories (P3 falls back to $TAGI_SHARED_DATA's promptsource templates and held-out sets), datasets."""
    data = copy.deepcopy(config.data)
    with data.unlocked():
        data.benchmark = benchmark or data.benchmark
        if sni_dir:
            data.sni.dir = sni_dir
        data.p3.templates_dir = (p3_templates_dir or data.p3.templates_dir
                                 or _shared_data_path("promptsource_templates"))
        data.p3.eval_data_dir = p3_data_dir or data.p3.eval_data_dir or _shared_data_path("p3_eval")
        if p3_datasets:
            data.p3.eval_datasets = tuple(p3_datasets)
    return data


def result_name(method: str, backbone_weights: str | None = None) -> str:
    """What `run_evaluation`'s files and results are named: the method, with the backbone storage it was made
    to evaluate in (`tagi_int8`), if any."""
    return method if backbone_weights is None else f"{method}_{backbone_weights}"


def run_evaluation(
    workdir: str,
    method: str = "tagi",
    benchmark: str | None = None,
    *,
    config=None,
    tasks: Sequence[str] | None = None,
    max_examples_per_task: int | None = None,
    batch_size: int | None = None,
    beam_size: int | None = None,
    max_decode_len: int | None = None,
    use_cache: bool = True,
    sni_dir: str | None = None,
    p3_templates_dir: str | None = None,
    p3_data_dir: str | None = None,
    p3_datasets: Sequence[str] | None = None,
    backbone_weights: str | None = None,
    print_fn: Callable[[str], None] | None = print,
) -> dict:
    """Evaluate `method` of a pipeline work directory on a benchmark; writes
    `<workdir>/eval/<method>_<benchmark>_<split>_predictions.jsonl` and `<method>_<benchmark>_metrics.json`
    ({split: metrics}) and returns the metrics. `config` (default: the work directory's config.json) gives
    the data and eval settings; the model always comes from the work directory. `backbone_weights` ("int8",
    "float") stores the backbone's matmul kernels so after loading (`load_trained`); the files are then named
    `<method>_<backbone_weights>_...`, beside the method's own."""
    check_method(method)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: work directory not found")
    _, model, params = load_trained(workdir, method, backbone_weights)
    name = result_name(method, backbone_weights)
    if config is None:
        config = load_workdir_config(workdir)
    data = eval_data_config(config, benchmark, sni_dir=sni_dir, p3_templates_dir=p3_templates_dir,
                            p3_data_dir=p3_data_dir, p3_datasets=p3_datasets)
    bench = register_benchmark(data, workdir, training=False)
    settings = EvalSettings.from_config(config, batch_size=batch_size, max_examples_per_task=max_examples_per_task,
                                        beam_size=beam_size, max_decode_len=max_decode_len)
    splits = bench.select(tasks)
    cache = AdapterCache(os.path.join(workdir, "adapter_cache") if use_cache else None)

    progress = _progress_note(workdir, method, load_workdir_config(workdir))
    progress["backbone_weights"] = "int8" if quantize.quantized_kernel_paths(params) else "float"

    def report(label: str, metrics: dict, examples: list) -> None:
        metrics["benchmark"], metrics["split"] = bench.name, label
        metrics.update(progress)
        if print_fn is not None:
            print_fn(format_metrics(metrics, title=f"\n== {name} on {bench.name} / {label} "
                                                   f"({len(splits[label])} tasks, {len(examples)} examples) =="))

    results = _evaluate(workdir, method, model, params, bench, _split_examples(bench, splits, settings), settings,
                        cache,
                        predictions_name=lambda label: f"{name}_{bench.name}_{label}_predictions.jsonl",
                        report=report)
    if jax.process_index() == 0:
        path = write_json(os.path.join(workdir, "eval", f"{name}_{bench.name}_metrics.json"), results)
        if print_fn is not None:
            print_fn(f"\nmetrics: {path}")
    return results
