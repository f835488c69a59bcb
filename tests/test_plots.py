"""The run's pictures and per-category table: summary.png and curves.png from handmade summary.json and
metrics.jsonl files (valid PNGs whose bars and lines hold the numbers given), one clear message for a bad or
missing file, the per-category table re-scored from predictions and merged across evaluations, and both written
at the end of `launch/train.py`."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from tagi_jax.eval import plots, report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SUMMARY = {
    "tagi": {"unseen": {"rougeL": 35.2, "exact_match": 19.4}, "seen": {"rougeL": 43.0, "exact_match": 22.3}},
    "concat": {"unseen": {"rougeL": 35.4, "exact_match": 17.6}, "seen": {"rougeL": 47.1, "exact_match": 25.0}},
    "no_instruction": {"unseen": {"rougeL": 15.1, "exact_match": 2.8, "complete": False, "step": 3, "steps": 9}},
}
P3_SUMMARY = {"tagi": {"unseen": {"accuracy": 61.5, "mtest11_average": 60.0, "per_dataset": {"rte": 61.5}}},
              "concat": {"unseen": {"accuracy": 55.0, "mtest11_average": 54.0, "per_dataset": {"rte": 55.0}}}}


def _write_metrics(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _workdir(tmp_path):
    w = tmp_path / "run"
    _write_metrics(str(w / "concat" / "metrics.jsonl"),
                   [{"step": s, "split": "train", "loss": 3.0 / s, "cross_entropy": 3.0 / s, "z_loss": 0.0,
                     "grad_norm": 1.0, "learning_rate": 1e-3} for s in (1, 2, 3)])
    _write_metrics(str(w / "finetune" / "metrics.jsonl"),
                   [{"step": s, "split": "train", "loss": 2.0 / s, "cross_entropy": 1.5 / s, "kl": 0.1 / s,
                     "l_ins": 1e-4 / s} for s in (1, 2)]
                   + [{"step": 2, "split": "train", "loss": 0.7, "cross_entropy": 0.6, "kl": 0.05, "l_ins": 4e-5},
                      {"step": 2, "split": "eval", "loss": 0.9}])  # step 2 twice (a resume): the later counts
    with open(w / "summary.json", "w") as f:
        json.dump(SUMMARY, f)
    return str(w)


def _valid_png(path):
    assert os.path.getsize(path) > 0
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert float(np.std(pixels)) > 0  # something was drawn, not a blank canvas


def test_run_figures_are_valid_pngs(tmp_path):
    w = _workdir(tmp_path)
    lines = []
    written = plots.write_run_figures(w, print_fn=lines.append)
    assert written == [os.path.join(w, "summary.png"), os.path.join(w, "curves.png")]
    for path in written:
        _valid_png(path)
    assert lines == ["figures: " + ", ".join(written)]


def test_summary_bars_hold_the_scores():
    fig = plots.summary_figure(SUMMARY)
    rouge, em = fig.axes[:2]
    assert rouge.get_title() == "ROUGE-L" and em.get_title() == "exact match"
    heights = [round(p.get_height(), 1) for p in rouge.patches]
    # unseen bars for tagi, concat, no_instruction, then seen bars (no_instruction has none: 0)
    assert heights == [35.2, 35.4, 15.1, 43.0, 47.1, 0.0]
    assert [round(p.get_height(), 1) for p in em.patches] == [19.4, 17.6, 2.8, 22.3, 25.0, 0.0]
    assert [t.get_text() for t in rouge.get_xticklabels()] == ["tagi", "concat", "no_instruction"]
    assert "15.1*" in [t.get_text() for t in rouge.texts]  # a partly trained stage is marked


def test_p3_summary_plots_accuracy(tmp_path):
    fig = plots.summary_figure(P3_SUMMARY)
    assert len(fig.axes) == 1 and fig.axes[0].get_title().startswith("accuracy")
    assert [round(p.get_height(), 1) for p in fig.axes[0].patches] == [61.5, 55.0]
    _valid_png(plots.write_summary_png(P3_SUMMARY, str(tmp_path / "p3.png")))


def test_curves_hold_each_loss_term_and_the_later_duplicate_step(tmp_path):
    w = _workdir(tmp_path)
    curves = plots.stage_curves(w)
    assert list(curves) == ["finetune", "concat"]  # pipeline order of tagi_jax.run.stages.STAGES
    fig = plots.curves_figure(curves)
    finetune, concat = fig.axes[:2]
    assert finetune.get_title() == "finetune" and finetune.get_yscale() == "log"
    lines = {ln.get_label(): ln for ln in finetune.get_lines()}
    assert set(lines) == {"loss", "cross_entropy", "kl", "l_ins", "eval loss"}
    assert list(lines["loss"].get_ydata()) == [2.0, 0.7]
    # the zero z_loss and the non-loss metrics are not drawn
    assert {ln.get_label() for ln in concat.get_lines()} == {"loss", "cross_entropy"}


@pytest.mark.parametrize("content, message", [
    (None, "no such metrics file"),
    ('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n', "line 2: not JSON"),
    ('[1, 2]\n', "line 1: expected an object with an integer 'step'"),
])
def test_bad_or_missing_metrics_is_one_clear_message(tmp_path, content, message):
    w = _workdir(tmp_path)
    path = os.path.join(w, "finetune", "metrics.jsonl")
    if content is None:
        os.remove(path)
    else:
        with open(path, "w") as f:
            f.write(content)
    with pytest.raises(plots.PlotError, match=message):
        plots.read_metrics(path)
    lines = []
    stages = ["concat", "finetune"]
    written = plots.write_run_figures(w, stages=stages, print_fn=lines.append)
    assert written == [os.path.join(w, "summary.png")]  # the summary is still drawn
    assert lines[0] == f"warning: curves.png not written: {path}" + lines[0].split(path, 1)[1]
    assert message in lines[0] and "Traceback" not in "".join(lines)
    assert not os.path.exists(os.path.join(w, "curves.png"))


def test_missing_summary_is_a_warning(tmp_path):
    w = _workdir(tmp_path)
    os.remove(os.path.join(w, "summary.json"))
    lines = []
    assert plots.write_run_figures(w, print_fn=lines.append) == [os.path.join(w, "curves.png")]
    assert lines[0].startswith("warning: summary.png not written: ") and "summary.json" in lines[0]


def test_per_category_table_from_predictions_merges_columns(tmp_path):
    w = tmp_path / "run"
    (w / "eval").mkdir(parents=True)
    with open(w / "tasks.json", "w") as f:
        json.dump({"categories": {"t1": "Question Answering", "t2": "Question Answering", "t3": "Sentiment"}}, f)
    preds = [{"task_name": "t1", "prediction": "paris", "references": ["Paris"]},
             {"task_name": "t2", "prediction": "a b", "references": ["a b c d"]},
             {"task_name": "t3", "prediction": "neg", "references": ["positive"]}]
    report.write_jsonl(str(w / "eval" / "tagi_unseen_predictions.jsonl"), preds)
    # A column of an earlier evaluation of another benchmark: kept when this one is merged in.
    report.write_json(str(w / "eval" / "per_category.json"),
                      {"concat sni/unseen": {"sentiment": {"rougeL": 10.0, "exact_match": 0.0}}})
    lines = []
    md = report.write_category_table(str(w), {"tagi": {"unseen": {}}}, "synthetic", from_predictions=True,
                                     print_fn=lines.append)
    with open(w / "eval" / "per_category.json") as f:
        table = json.load(f)
    qa = table["tagi synthetic/unseen"]["question_answering"]
    assert qa["exact_match"] == 50.0 and 50.0 < qa["rougeL"] < 100.0  # (100 + 66.7) / 2 by example
    assert table["tagi synthetic/unseen"]["sentiment"] == {"rougeL": 0.0, "exact_match": 0.0}
    assert table["concat sni/unseen"]["sentiment"]["rougeL"] == 10.0
    text = open(md).read()
    assert text.startswith("| category | concat sni/unseen ROUGE-L / EM | tagi synthetic/unseen ROUGE-L / EM |")
    assert "| sentiment | 10.0 / 0.0 | 0.0 / 0.0 |" in text
    assert "| question_answering | - | 83.3 / 50.0 |" in text
    assert "per category" in lines[0] and md in lines[0]


def test_per_category_table_from_eval_metrics_and_a_damaged_file(tmp_path):
    w = tmp_path / "run"
    (w / "eval").mkdir(parents=True)
    (w / "eval" / "per_category.json").write_text("{not json")
    results = {"hint": {"unseen": {"rougeL": 1.0, "exact_match": 0.0,
                                   "per_category": {"qa": {"rougeL": 40.0, "exact_match": 20.0}}}},
               "concat": {"unseen": {"accuracy": 50.0}}}  # rank classification: no column
    report.write_category_table(str(w), results, "sni", print_fn=lambda _: None)
    table = json.load(open(w / "eval" / "per_category.json"))
    assert table == {"hint sni/unseen": {"qa": {"rougeL": 40.0, "exact_match": 20.0}}}
    assert (w / "eval" / "per_category.json.damaged").read_text() == "{not json"  # kept aside, not lost


def test_eval_summary_overlays_the_latest_metrics(tmp_path):
    w = _workdir(tmp_path)
    report.write_json(os.path.join(w, "eval", "tagi_synthetic_metrics.json"),
                      {"unseen": {"rougeL": 50.0, "exact_match": 30.0, "complete": False}})
    summary = plots.benchmark_summary(w, "synthetic", "synthetic")
    assert summary["tagi"] == {"unseen": {"rougeL": 50.0, "exact_match": 30.0, "complete": False}}
    assert summary["concat"] == SUMMARY["concat"]
    assert plots.benchmark_summary(w, "sni", "synthetic") == {}
    assert plots.summary_png_name("sni", "synthetic") == "summary_sni.png"


def test_train_writes_the_figures_and_the_table(tmp_path):
    """launch/train.py's end: a one-stage run of a tiny model writes summary.png, curves.png and the table; then
    launch/eval.py's end rewrites them from its evaluation."""
    w = tmp_path / "w"
    overrides = ["model.d_model=16", "model.d_kv=4", "model.num_heads=2", "model.d_ff=32",
                 "model.num_encoder_layers=1", "model.num_decoder_layers=1", "data.synthetic.num_train_tasks=6",
                 "data.synthetic.num_unseen_tasks=3", "data.synthetic.train_instances_per_task=8",
                 "data.synthetic.eval_instances_per_task=2", "stages.concat.train.steps=3",
                 "stages.concat.train.batch_size=4", "stages.concat.train.log_every=1",
                 "stages.concat.train.progress_bar=False", "stages.concat.optimizer.warmup_steps=0",
                 "eval.max_examples_per_task=2", "eval.max_decode_len=4"]
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={REPO}/configs/demo.py",
           f"--workdir={w}", "--config.pipeline.stages=('concat',)", "--config.pipeline.evaluate=('concat',)"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device: no mesh to fit
    out = subprocess.run(cmd + [f"--config.{o}" for o in overrides], capture_output=True, text=True, timeout=600,
                         cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("summary.png", "curves.png"):
        _valid_png(str(w / name))
    assert f"figures: {w / 'summary.png'}, {w / 'curves.png'}" in out.stdout
    table = json.load(open(w / "eval" / "per_category.json"))
    assert set(table) == {"concat synthetic/unseen", "concat synthetic/seen"}
    assert "| category |" in open(w / "eval" / "per_category.md").read()
    # launch/eval.py: the same columns from its own metrics, the figure redrawn from them.
    os.remove(w / "summary.png")
    out = subprocess.run([sys.executable, os.path.join(REPO, "launch", "eval.py"), f"--workdir={w}",
                          "--method=concat", "--max_examples_per_task=1"], capture_output=True, text=True,
                         timeout=600, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "per category (ROUGE-L / EM):" in out.stdout
    _valid_png(str(w / "summary.png"))
    metrics = json.load(open(w / "eval" / "concat_synthetic_metrics.json"))
    table = json.load(open(w / "eval" / "per_category.json"))
    assert table["concat synthetic/unseen"] == {c: {k: g[k] for k in ("rougeL", "exact_match")}
                                                for c, g in metrics["unseen"]["per_category"].items()}
