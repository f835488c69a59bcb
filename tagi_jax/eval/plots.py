"""The run's pictures: `summary.png` (each method's unseen / seen scores as grouped bars) and `curves.png` (each
stage's training loss terms against step, from DIR/<stage>/metrics.jsonl), drawn with matplotlib off-screen.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so drawing them changes
no global backend (a notebook's inline plots keep working) and needs no display. A file that cannot be read or
drawn is a `PlotError` naming the file (and the line), which the launchers print as one warning line.
"""
from __future__ import annotations

import json
import math
import os
from typing import Iterable, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tagi_jax.eval.report import summary_entry
from tagi_jax.run.stages import METHODS, STAGES
from tagi_jax.run.workdir import stage_dir

SUMMARY_PNG, CURVES_PNG = "summary.png", "curves.png"
# What counts as a loss term in a stage's metrics.jsonl (tagi_jax/run/objectives.py and tagi_jax/losses.py
# name them); everything else logged there (norms, learning rate, throughput) is not a loss.
LOSS_TERMS = ("loss", "cross_entropy", "kl", "l_ins", "z_loss")
# Split labels first in this order, then any other label alphabetically (as format_summary orders them).
_LABEL_ORDER = ("unseen", "seen")


class PlotError(ValueError):
    """A summary or metrics file that cannot be drawn; the message names the file."""


def _canvas(fig: Figure) -> Figure:
    FigureCanvasAgg(fig)  # attaches itself: savefig then renders with Agg whatever pyplot's backend is
    return fig


def _labels(summary: Mapping[str, Mapping[str, Mapping]]) -> list[str]:
    found = {label for by_label in summary.values() for label in by_label}
    return sorted(found, key=lambda x: (_LABEL_ORDER.index(x) if x in _LABEL_ORDER else len(_LABEL_ORDER), x))


def _panels(summary) -> list[tuple[str, str]]:
    """(metric key, axis title) of each panel: accuracy for rank classification (P3), EM for open-domain QA,
    else ROUGE-L and EM."""
    entries = [m for by_label in summary.values() for m in by_label.values()]
    if entries and all("accuracy" in m for m in entries):
        return [("accuracy", "accuracy (rank classification)")]
    if entries and all("rougeL" in m and "exact_match" in m for m in entries):
        return [("rougeL", "ROUGE-L"), ("exact_match", "exact match")]
    if entries and all("em" in m for m in entries):
        return [("em", "exact match (open-domain QA)")]
    raise PlotError("summary: every entry needs 'rougeL' and 'exact_match' (or 'accuracy' for P3, 'em' for QA)")


def summary_figure(summary: Mapping[str, Mapping[str, Mapping]], title: str = "") -> Figure:
    """Grouped bars: one group per method, one bar per split label (unseen, seen), a panel per metric."""
    if not isinstance(summary, Mapping) or not summary or not all(isinstance(v, Mapping) for v in summary.values()):
        raise PlotError("summary: expected {method: {split: {metric: value}}} with at least one method")
    panels, labels, methods = _panels(summary), _labels(summary), list(summary)
    fig = _canvas(Figure(figsize=(max(5.0, 1.4 * len(methods) * len(panels) + 2), 3.8), layout="constrained"))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    width = 0.8 / max(len(labels), 1)
    for ax, (key, name) in zip(axes, panels):
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * width for i in range(len(methods))]
            values = [summary[m].get(label, {}).get(key) for m in methods]
            heights = [float(v) if v is not None else 0.0 for v in values]
            bars = ax.bar(xs, heights, width, label=label)
            for bar, v, m in zip(bars, values, methods):
                partial = summary[m].get(label, {}).get("complete") is False
                text = "-" if v is None else f"{float(v):.1f}" + ("*" if partial else "")
                ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 1), textcoords="offset points")
        ax.set_xticks(range(len(methods)), methods, rotation=20 if len(methods) > 4 else 0)
        ax.set_title(name)
        ax.set_ylim(0, max(100.0 if key == "accuracy" else 0.0, ax.get_ylim()[1] * 1.12))
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(title="tasks", fontsize=8)
    if any(m.get("complete") is False for by_label in summary.values() for m in by_label.values()):
        fig.supxlabel("* stage stopped before its configured steps", fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl (`tagi_jax.trainer.metric_writers`), a step logged twice (a resumed run)
    kept once, the later line winning; a missing file or a line that is not a JSON object is a PlotError."""
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no such metrics file (has the stage run?)")
    by_key: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PlotError(f"{path} line {n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise PlotError(f"{path} line {n}: expected an object with an integer 'step'")
            by_key[(record.get("split", "train"), record["step"])] = record
    return [by_key[k] for k in sorted(by_key, key=lambda k: (k[0], k[1]))]


def _series(records: Iterable[Mapping], split: str = "train") -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        if r.get("split", "train") != split:
            continue
        for term in LOSS_TERMS:
            v = r.get(term)
            if isinstance(v, (int, float)) and math.isfinite(v) and not (term == "z_loss" and v == 0):
                steps, values = out.setdefault(term, ([], []))
                steps.append(r["step"])
                values.append(float(v))
    return out


def curves_figure(curves: Mapping[str, Sequence[Mapping]]) -> Figure:
    """One panel per stage ({stage: metrics records}), each loss term a line against step (log scale when
    every value is positive: L_ins can be 1e-4 while CE is 2); evaluation losses dashed."""
    stages = [s for s in curves if _series(curves[s])]
    if not stages:
        raise PlotError("curves: no stage logged a loss term (" + ", ".join(LOSS_TERMS) + ")")
    cols = min(3, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig = _canvas(Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained"))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, stage in zip(axes, stages):
        train, evals = _series(curves[stage]), _series(curves[stage], "eval")
        positive = True
        for term, (steps, values) in train.items():
            ax.plot(steps, values, label=term, marker="." if len(steps) < 3 else None)
            positive &= min(values) > 0
        for term, (steps, values) in evals.items():
            ax.plot(steps, values, linestyle="--", marker="o", label=f"eval {term}")
            positive &= min(values) > 0
        if positive:
            ax.set_yscale("log")
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(stages):]:
        ax.set_visible(False)
    return fig


def read_summary(path: str) -> dict:
    if not os.path.isfile(path):
        raise PlotError(f"{path}: no summary (the run has not evaluated yet)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PlotError(f"{path}: not JSON (line {e.lineno}: {e.msg})") from None


def benchmark_summary(workdir: str, benchmark: str, trained_benchmark: str) -> dict:
    """What summary.png shows after `launch/eval.py`: summary.json's entries when `benchmark` is the one the run
    trained on, each method's DIR/eval/<method>_<benchmark>_metrics.json (the latest evaluation) over them."""
    summary = {}
    if benchmark == trained_benchmark and os.path.isfile(os.path.join(workdir, "summary.json")):
        summary = read_summary(os.path.join(workdir, "summary.json"))
    for method in METHODS:
        path = os.path.join(workdir, "eval", f"{method}_{benchmark}_metrics.json")
        if os.path.isfile(path):
            by_label = read_summary(path)
            summary[method] = {label: {**summary_entry(m), **({"complete": False} if m.get("complete") is False
                                                               else {})} for label, m in by_label.items()}
    return summary


def summary_png_name(benchmark: str, trained_benchmark: str) -> str:
    """summary.png for the run's own benchmark, summary_<benchmark>.png for another (both can exist)."""
    return SUMMARY_PNG if benchmark == trained_benchmark else f"summary_{benchmark}.png"


def write_summary_png(summary: Mapping, path: str, title: str = "") -> str:
    fig = summary_figure(summary, title)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def stage_curves(workdir: str, stages: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """{stage: records} for every stage of `stages` (default: every stage with a metrics.jsonl, pipeline
    order). A named stage without a readable file is a PlotError."""
    if stages is None:
        stages = [s for s in STAGES if os.path.isfile(os.path.join(stage_dir(workdir, s), "metrics.jsonl"))]
        if not stages:
            raise PlotError(f"{workdir}: no <stage>/metrics.jsonl to draw curves from")
    return {s: read_metrics(os.path.join(stage_dir(workdir, s), "metrics.jsonl")) for s in stages}


def write_curves_png(workdir: str, path: str | None = None, stages: Sequence[str] | None = None) -> str:
    path = path or os.path.join(workdir, CURVES_PNG)
    fig = curves_figure(stage_curves(workdir, stages))
    fig.savefig(path, dpi=110)
    return path


def write_run_figures(workdir: str, summary: Mapping | None = None, stages: Sequence[str] | None = None,
                      summary_name: str = SUMMARY_PNG, title: str = "", print_fn=print) -> list[str]:
    """summary.png (from `summary`, default DIR/summary.json) and curves.png in `workdir`: the paths written.
    A figure that cannot be drawn is skipped with one `warning:` line saying why, never a traceback: the run
    it pictures has already finished and its results are on disk."""
    written = []
    try:
        data = summary if summary is not None else read_summary(os.path.join(workdir, "summary.json"))
        written.append(write_summary_png(data, os.path.join(workdir, summary_name), title))
    except (PlotError, OSError) as e:
        print_fn(f"warning: {summary_name} not written: {e}")
    try:
        written.append(write_curves_png(workdir, stages=stages))
    except (PlotError, OSError) as e:
        print_fn(f"warning: {CURVES_PNG} not written: {e}")
    if written:
        print_fn("figures: " + ", ".join(written))
    return written
