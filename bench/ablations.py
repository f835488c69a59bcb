"""The paper's ablation (Table 4) on the demo suite: TAGI and each variant from one shared backbone, one budget.

    python bench/ablations.py --out=runs/ablations [--pretrain_steps=200] [--finetune_steps=800] [--variants=...]

The instruction-concatenation backbone and the LoRA teachers of `configs/demo.py` are trained once (into
OUT/shared); every variant then copies them and trains its own `pretrain` (unless it drops it) and `finetune`
with the same steps, and is evaluated as the demo evaluates TAGI (ROUGE-L / EM, unseen and seen tasks). Variants
that only change the stage-2 objective reuse the full model's pretraining. Re-running resumes: finished variants
are read back, not trained again. Writes OUT/ablations.json and OUT/ablations.md and prints the table.
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

from configs.demo import get_config as demo_config  # noqa: E402
from tagi_jax.run import pipeline  # noqa: E402

# name -> (what it removes or changes, config overrides, reuses the full model's pretraining, runs pretraining)
VARIANTS = {
    "full": ("TAGI as the demo trains it (backbone 'all', dense generator heads)", {}, False, True),
    "no_kl": ("- KL (λ1 = 0)", {"loss.lambda_kl": 0.0}, True, True),
    "no_l_ins": ("- L_ins (λ2 = 0)", {"loss.lambda_ins": "0"}, True, True),
    "relative_l_ins": ("L_ins relative to the teacher's update (the paper configs' reduction)",
                       {"loss.alignment_reduction": "relative"}, True, True),
    "no_pretraining": ("- hypernetwork pretraining (finetune starts from the backbone)", {}, False, False),
    "no_fusion": ("- instruction fusion (tagi.fusion = none)", {"tagi.fusion": "none"}, False, True),
    "backbone_none": ("backbone frozen (tagi.train_backbone = none)", {"tagi.train_backbone": "none"}, False, True),
    "backbone_norms_embeddings": ("norms + embedding train (the original code's)",
                                  {"tagi.train_backbone": "norms_embeddings"}, False, True),
    "bottleneck_generator": ("the original's generator: width-8 bottleneck heads",
                             {"hypernet.head": "bottleneck", "hypernet.head_dim": 8}, False, True),
}
SHARED = ("concat", "teachers")


@dataclasses.dataclass
class Settings:
    out: str = "runs/ablations"
    pretrain_steps: int = 200
    finetune_steps: int = 800
    variants: str = ",".join(VARIANTS)

    def __post_init__(self):
        unknown = [v for v in self.names() if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)})")
        if self.pretrain_steps <= 0 or self.finetune_steps <= 0:
            raise ValueError("--pretrain_steps and --finetune_steps must be positive")

    def names(self) -> list[str]:
        return [v.strip() for v in self.variants.split(",") if v.strip()]


def _set(config, dotted: str, value) -> None:
    *path, key = dotted.split(".")
    node = config
    for part in path:
        node = node[part]
    node[key] = value


def variant_config(settings: Settings, name: str):
    """The demo config with the variant's overrides (as `run_variant` trains it)."""
    _, overrides, _, pretrains = VARIANTS[name]
    c = base_config(settings)
    for key, value in overrides.items():
        _set(c, key, value)
    c.pipeline.stages = ("pretrain", "finetune") if pretrains else ("finetune",)
    if not pretrains:
        c.stages.finetune.init_from = "concat"
    c.pipeline.evaluate = ("tagi",)
    return c


def base_config(settings: Settings):
    c = demo_config()
    for stage, steps in (("pretrain", settings.pretrain_steps), ("finetune", settings.finetune_steps)):
        c.stages[stage].train.steps = steps
        c.stages[stage].optimizer.warmup_steps = min(100, steps // 10)  # the demo's rule, for any budget
    for stage in c.stages:
        c.stages[stage].train.progress_bar = False
    return c


def train_shared(settings: Settings) -> str:
    """The demo's concat backbone and LoRA teachers, once."""
    shared = os.path.join(settings.out, "shared")
    c = base_config(settings)
    c.pipeline.stages, c.pipeline.evaluate = SHARED, ()
    print(f"== shared: {', '.join(SHARED)} -> {shared}", flush=True)
    pipeline.run(c, shared)
    return shared


def _copy_stage(src_workdir: str, dst_workdir: str, name: str) -> None:
    src, dst = os.path.join(src_workdir, name), os.path.join(dst_workdir, name)
    if not os.path.exists(dst):
        shutil.copytree(src, dst)


def run_variant(settings: Settings, shared: str, name: str) -> dict:
    workdir = os.path.join(settings.out, name)
    summary_path = os.path.join(workdir, "summary.json")
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            return {"summary": json.load(f)["tagi"], "seconds": None}
    reuse_pretrain = VARIANTS[name][2]
    os.makedirs(workdir, exist_ok=True)
    for part in SHARED + ("data",):  # the same backbone, teachers and vocabulary for every variant
        _copy_stage(shared, workdir, part)
    if reuse_pretrain:
        _copy_stage(os.path.join(settings.out, "full"), workdir, "pretrain")
    c = variant_config(settings, name)
    print(f"== {name}: {VARIANTS[name][0]}", flush=True)
    t0 = time.time()
    result = pipeline.run(c, workdir)
    return {"summary": result["summary"]["tagi"], "seconds": time.time() - t0}


def table(settings: Settings, rows: dict) -> str:
    lines = ["| variant | unseen ROUGE-L | unseen EM | seen ROUGE-L | seen EM | minutes |",
             "|---|---|---|---|---|---|"]
    for name, row in rows.items():
        s = row["summary"]
        minutes = "" if row["seconds"] is None else f"{row['seconds'] / 60:.1f}"
        lines.append(f"| {VARIANTS[name][0]} | {s['unseen']['rougeL']:.1f} | {s['unseen']['exact_match']:.1f} | "
                     f"{s['seen']['rougeL']:.1f} | {s['seen']['exact_match']:.1f} | {minutes} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = settings_parser(Settings, __doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    settings = settings_from_args(Settings, args, "ablations.py")
    print_run_header("bench/ablations.py", args)
    names = settings.names()
    if any(VARIANTS[n][2] for n in names) and "full" not in names:
        names = ["full"] + names  # their pretraining is the full model's
    shared = train_shared(settings)
    rows, failed = {}, []
    for name in names:
        try:
            rows[name] = run_variant(settings, shared, name)
        except Exception as e:  # noqa: BLE001 - one variant's failure must not cost the others
            print(f"error: variant {name}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            failed.append(name)
    text = table(settings, rows)
    with open(os.path.join(settings.out, "ablations.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(settings), "rows": rows}, f, indent=2)
    with open(os.path.join(settings.out, "ablations.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
