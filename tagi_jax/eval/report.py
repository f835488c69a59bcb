"""The evaluation outputs, written and printed one way: JSON / JSON Lines files, the metrics' timing fields,
the console table of one evaluation, summary.json's entries and table (ROUGE-L / EM, or P3 accuracy), and the
per-category table (DIR/eval/per_category.json and .md)."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Sequence

from tagi_jax import metrics as metrics_lib
from tagi_jax.jsonl import iter_jsonl
from tagi_jax.run.workdir import TASKS_FILE
from tasks.p3.datasets import MTEST11

PER_CATEGORY = "per_category"  # DIR/eval/per_category.json (and .md): {column: {category: scores}}


def write_jsonl(path: str, records: Iterable[Mapping]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_json(path: str, obj: Any) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def format_metrics(metrics: Mapping[str, Any], title: str = "", max_tasks: int | None = 40) -> str:
    """A readable console table of `evaluate` or `evaluate_rank_classification` metrics, with timing."""
    out = [title] if title else []
    if "em" in metrics and "rougeL" not in metrics:  # open-domain QA
        rows = [("overall", float(metrics["em"]), metrics["num_examples"])]
        rows += [(name, float(m["em"]), "") for name, m in sorted((metrics.get("per_task") or {}).items())]
        out.append(_table(("", "EM", "n"), rows))
    elif "rougeL" in metrics:
        rows = [("overall", float(metrics["rougeL"]), float(metrics["exact_match"]), metrics["num_examples"])]
        out.append(_table(("", "ROUGE-L", "EM", "n"), rows))
        for key, label in (("per_category", "category"), ("per_task", "task")):
            groups = metrics.get(key) or {}
            if not groups or (key == "per_task" and max_tasks is not None and len(groups) > max_tasks):
                if groups:
                    out.append(f"({len(groups)} tasks: per-task scores are in the metrics JSON)")
                continue
            rows = [(name, float(m["rougeL"]), float(m["exact_match"])) for name, m in sorted(groups.items())]
            out.append(_table((label, "ROUGE-L", "EM"), rows))
    else:
        p3 = metrics.get("p3")
        if p3:
            rows = [(ds, float(acc)) for ds, acc in p3["per_dataset"].items()]
            for key, label in (("mtest11_average", "MTest11 average"), ("hypert5_average", "HyperT5 average")):
                if p3.get(key) is not None:
                    rows.append((label, float(p3[key])))
            out.append(_table(("dataset", "accuracy"), rows))
            if p3.get("mtest11_missing"):
                out.append(f"(missing from MTest11: {', '.join(p3['mtest11_missing'])})")
        else:
            groups = metrics.get("per_task", {})
            if max_tasks is None or len(groups) <= max_tasks:
                out.append(_table(("task", "accuracy"), [(t, float(a)) for t, a in sorted(groups.items())]))
        out.append(f"overall accuracy {float(metrics['accuracy']):.2f} over {metrics['num_examples']} examples")
    out.append(format_timing(metrics))
    return "\n".join(out)


def format_timing(metrics: Mapping[str, Any]) -> str:
    eps = metrics.get("examples_per_second")
    return (f"timing: adapters {metrics.get('adapter_generation_seconds', 0):.2f}s for "
            f"{metrics.get('adapters_generated', 0)} generated / {metrics.get('adapters_reused', 0)} reused "
            f"(compile {metrics.get('adapter_compile_seconds', 0):.1f}s); decoding "
            f"{metrics.get('decoding_seconds', 0):.2f}s (compile {metrics.get('decoding_compile_seconds', 0):.1f}s); "
            f"{eps if eps is not None else '-'} examples/s")


def timing(n: int, table, seconds: float, compile_seconds: float) -> dict:
    """The timing fields of an evaluator's metrics (`table`: the `AdapterTable` used, or None)."""
    gen = table.seconds if table is not None else 0.0
    out = {
        "num_examples": n,
        "adapter_generation_seconds": round(gen, 4),
        "adapter_compile_seconds": round(table.compile_seconds, 4) if table is not None else 0.0,
        "adapters_generated": table.generated if table is not None else 0,
        "adapters_reused": table.reused if table is not None else 0,
        "generator_calls": table.generator_calls if table is not None else 0,
        "decoding_seconds": round(seconds, 4),
        "decoding_compile_seconds": round(compile_seconds, 4),
        "examples_per_second": round(n / seconds, 3) if seconds > 0 else None,
        "end_to_end_examples_per_second": round(n / (seconds + gen), 3) if seconds + gen > 0 else None,
    }
    return out


def summary_entry(metrics: Mapping[str, Any]) -> dict:
    """What summary.json keeps of one evaluation: ROUGE-L / exact match for the generation benchmarks; for P3,
    rank-classification accuracy with the per-dataset means and the MTest11 / HyperT5 averages (the numbers T0
    and the TAGI paper report)."""
    if "accuracy" in metrics:
        return {"accuracy": float(metrics["accuracy"]), **metrics.get("p3", {})}
    if "em" in metrics:  # open-domain QA
        return {"em": float(metrics["em"])}
    return {"rougeL": float(metrics["rougeL"]), "exact_match": float(metrics["exact_match"])}


def format_summary(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The console table of summary.json: ROUGE-L / EM columns, or accuracy columns for rank classification."""
    labels = sorted({label for m in summary.values() for label in m}, key=lambda x: (x != "unseen", x))
    if any("accuracy" in m for by_label in summary.values() for m in by_label.values()):
        return _format_accuracy_summary(summary, labels)
    if any("em" in m for by_label in summary.values() for m in by_label.values()):
        header = f"{'method':<16}" + "".join(f"{label + ' EM':>16}" for label in labels)
        rows = [f"{method:<16}" + "".join(f"{by_label[label]['em']:>16.1f}" if label in by_label else f"{'-':>16}"
                                          for label in labels) for method, by_label in summary.items()]
        return "\n".join([header, "-" * len(header), *rows])
    header = f"{'method':<16}" + "".join(f"{label + ' ROUGE-L':>16}{label + ' EM':>12}" for label in labels)
    lines = [header, "-" * len(header)]
    for method, by_label in summary.items():
        row = f"{method:<16}"
        for label in labels:
            m = by_label.get(label)
            row += f"{m['rougeL']:>16.1f}{m['exact_match']:>12.1f}" if m else f"{'-':>16}{'-':>12}"
        lines.append(row)
    return "\n".join(lines)


def _format_accuracy_summary(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], labels: list[str]) -> str:
    """Accuracy, the MTest11 / HyperT5 averages and each dataset's mean over its templates, per split label."""
    columns = []  # (header, label, getter)
    for label in labels:
        found = {ds for by_label in summary.values() for ds in (by_label.get(label) or {}).get("per_dataset", {})}
        columns += [(f"{label} acc", label, lambda m: m.get("accuracy")),
                    ("MTest11", label, lambda m: m.get("mtest11_average")),
                    ("HyperT5", label, lambda m: m.get("hypert5_average"))]
        for ds in [d for d in MTEST11 if d in found] + sorted(found - set(MTEST11)):
            columns.append((ds, label, lambda m, ds=ds: m.get("per_dataset", {}).get(ds)))
    widths = [max(9, len(h) + 2) for h, _, _ in columns]
    header = f"{'method':<16}" + "".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for method, by_label in summary.items():
        row = f"{method:<16}"
        for (_, label, get), w in zip(columns, widths):
            value = get(by_label[label]) if label in by_label else None
            row += f"{value:>{w}.1f}" if value is not None else f"{'-':>{w}}"
        lines.append(row)
    missing = {d for by_label in summary.values() for m in by_label.values() for d in m.get("mtest11_missing", [])}
    missing = sorted(missing, key=MTEST11.index)
    if missing:
        lines.append(f"(not in the MTest11 average: {', '.join(missing)})")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ per category
def category_column(method: str, benchmark: str, label: str) -> str:
    """A per-category table's column: e.g. "tagi sni/unseen"."""
    return f"{method} {benchmark}/{label}"


def per_category_from_metrics(results: Mapping[str, Mapping[str, Mapping]], benchmark: str) -> dict:
    """{column: {category: {rougeL, exact_match}}} from {method: {split: metrics}} (`run_evaluation`'s); splits
    scored without categories (P3: its per-dataset accuracies are the table) give no column."""
    out = {}
    for method, by_label in results.items():
        for label, m in by_label.items():
            groups = m.get("per_category")
            if groups:
                out[category_column(method, benchmark, label)] = {
                    c: {"rougeL": float(g["rougeL"]), "exact_match": float(g["exact_match"])}
                    for c, g in sorted(groups.items())}
    return out


def per_category_from_predictions(workdir: str, summary: Mapping[str, Mapping], benchmark: str) -> dict:
    """The same table re-scored from the predictions a pipeline run wrote (DIR/eval/<method>_<split>_predictions
    .jsonl, categories from DIR/tasks.json): the end of training keeps only summary.json's overall scores."""
    with open(os.path.join(workdir, TASKS_FILE), encoding="utf-8") as f:
        categories = json.load(f).get("categories") or {}
    out = {}
    for method, by_label in summary.items():
        for label in by_label:
            path = os.path.join(workdir, "eval", f"{method}_{label}_predictions.jsonl")
            if not os.path.isfile(path):
                continue
            records = [r for _, r in iter_jsonl(path)]
            if not records or not all(isinstance(r, dict) and "references" in r for r in records):
                continue  # rank classification records: no column (P3's per-dataset accuracies are the table)
            cats = [categories.get(r.get("task_name")) for r in records]
            if any(c is None for c in cats):
                continue  # tasks without a category
            scored = metrics_lib.sni_metrics([r["prediction"] for r in records], [r["references"] for r in records],
                                             categories=cats)
            out[category_column(method, benchmark, label)] = {
                c: {"rougeL": float(g["rougeL"]), "exact_match": float(g["exact_match"])}
                for c, g in sorted(scored["per_category"].items())}
    return out


def format_per_category(table: Mapping[str, Mapping[str, Mapping]]) -> str:
    """A Markdown table: one row per category, one "ROUGE-L / EM" column per method and split."""
    columns = sorted(table)  # as per_category.json keeps them (write_json sorts keys)
    categories = sorted({c for col in table.values() for c in col})
    lines = ["| category | " + " | ".join(f"{c} ROUGE-L / EM" for c in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for cat in categories:
        cells = []
        for col in columns:
            g = table[col].get(cat)
            cells.append(f"{g['rougeL']:.1f} / {g['exact_match']:.1f}" if g else "-")
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_per_category(workdir: str, table: Mapping[str, Mapping]) -> tuple[str, str] | None:
    """Merge `table`'s columns into DIR/eval/per_category.json (columns of other methods and benchmarks already
    there are kept) and write the whole table as per_category.md; None when there is nothing to write."""
    path = os.path.join(workdir, "eval", PER_CATEGORY + ".json")
    merged: dict = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                merged = json.load(f)
        except json.JSONDecodeError:  # kept aside, not overwritten; the table restarts from this evaluation
            os.replace(path, path + ".damaged")
            merged = {}
    merged.update(table)
    if not merged:
        return None
    write_json(path, merged)
    md = os.path.join(workdir, "eval", PER_CATEGORY + ".md")
    with open(md, "w", encoding="utf-8") as f:
        f.write(format_per_category(merged) + "\n")
    return path, md


def write_category_table(workdir: str, results: Mapping[str, Mapping], benchmark: str, *,
                         from_predictions: bool = False, print_fn=print) -> str | None:
    """Build the per-category table (from `run_evaluation` metrics, or re-scored from the predictions a pipeline
    run wrote when `from_predictions`; `results` is then summary.json's {method: {split: ...}}), merge it into
    DIR/eval/per_category.{json,md} and print it. A table that cannot be built is one warning line: the scores
    it would regroup are already on disk."""
    try:
        table = (per_category_from_predictions(workdir, results, benchmark) if from_predictions
                 else per_category_from_metrics(results, benchmark))
        if not table:
            return None
        paths = write_per_category(workdir, table)
    except (OSError, ValueError, KeyError) as e:
        print_fn(f"warning: per-category table not written: {e}")
        return None
    print_fn("\nper category (ROUGE-L / EM):\n" + format_per_category(table) + f"\n(table: {paths[1]})")
    return paths[1]
