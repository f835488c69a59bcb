"""IAG's four readers on the synthetic closed-book QA suite (`configs/iag_demo.py`): exact match on test questions
whose facts were stated only in the pretraining documents.

    python bench/iag_synthetic.py --out=runs/iag [--steps_scale=1.0]

Run 1 (OUT/closed_book) trains the demo's stages: the backbone on the documents, the Fusion-in-Decoder reader
(`concat`: question + the supporting document and a distractor), plain closed-book T5 (`no_instruction`),
hypernetwork pretraining and the IAG student (`finetune`: an adapter from each question, CE + KL from the FiD
reader). Run 2 (OUT/imagined) copies run 1's backbone, pretraining, reader and vocabulary and trains the student
again with `data.qa.student_document = imagined` (it also reads one noisy imagined document), so the two
students differ only in what they read. Writes OUT/iag.json and OUT/iag.md and prints the table.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # `python bench/x.py`: find the repo

from bench._common import print_run_header, settings_from_args, settings_parser  # noqa: E402

from configs.iag_demo import get_config as iag_config  # noqa: E402
from tagi_jax.run import pipeline  # noqa: E402

SHARED = ("backbone", "pretrain", "concat", "data")  # what the imagined-document run reuses
# (row label, run, method) of the table, in the order IAG's paper reports them.
ROWS = (("T5 closed-book (no_instruction)", "closed_book", "no_instruction"),
        ("IAG closed-book (question -> adapter)", "closed_book", "tagi"),
        ("FiD reader with the supporting document (concat)", "closed_book", "concat"),
        ("IAG + one imagined document", "imagined", "tagi"))


@dataclasses.dataclass
class Settings:
    out: str = "runs/iag"
    steps_scale: float = 1.0  # every stage's steps times this (tests run tiny budgets)

    def __post_init__(self):
        if not self.steps_scale > 0:
            raise ValueError(f"--steps_scale must be > 0, got {self.steps_scale}")


def run_config(settings: Settings, imagined: bool):
    c = iag_config("imagined" if imagined else "closed_book")
    for stage in c.pipeline.stages:
        train = c.stages[stage].train
        train.steps = max(2, round(train.steps * settings.steps_scale))
        c.stages[stage].optimizer.warmup_steps = min(100, train.steps // 10)
        train.progress_bar = False
    if imagined:
        c.pipeline.stages, c.pipeline.evaluate = ("finetune",), ("tagi",)
    return c


def run(settings: Settings, name: str) -> dict:
    workdir = os.path.join(settings.out, name)
    imagined = name == "imagined"
    if imagined:
        os.makedirs(workdir, exist_ok=True)
        for part in SHARED:
            src, dst = os.path.join(settings.out, "closed_book", part), os.path.join(workdir, part)
            if not os.path.exists(dst):
                shutil.copytree(src, dst)
    print(f"== {name} -> {workdir}", flush=True)
    t0 = time.time()
    result = pipeline.run(run_config(settings, imagined), workdir)
    return {"summary": result["summary"], "seconds": time.time() - t0}


def table(runs: dict) -> str:
    lines = ["| reader | test EM |", "|---|---|"]
    for label, name, method in ROWS:
        lines.append(f"| {label} | {runs[name]['summary'][method]['test']['em']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = settings_parser(Settings, __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    settings = settings_from_args(Settings, args, "iag_synthetic.py")
    print_run_header("bench/iag_synthetic.py", args)
    t0 = time.time()
    runs = {name: run(settings, name) for name in ("closed_book", "imagined")}
    text = table(runs) + f"\n\n(both runs: {(time.time() - t0) / 60:.1f} min)"
    with open(os.path.join(settings.out, "iag.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(settings), "runs": runs}, f, indent=2)
    with open(os.path.join(settings.out, "iag.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
