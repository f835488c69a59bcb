"""The speed levers, each a config switch, measured on our own training step side by side (no torch): the
step of bench/train_step.py (same shapes, weights and batch) under

* baseline:     float32 compute, `model.attention="einsum"`, no rematerialisation, the state donated;
* bfloat16:     `model.dtype="bfloat16"` (float32 master weights and optimizer state; bfloat16 activations);
* remat_full:   `model.remat_policy="full"` (each layer recomputed in the backward pass);
* remat_dots:   `model.remat_policy="dots"` (matmul outputs kept, the rest recomputed);
* attention_xla: `model.attention="xla"` (`jax.nn.dot_product_attention`; "cudnn" is its GPU kernel);
* no_donation:  the step without donating the state (what donation saves: one copy of the state).

Each lever is compiled ahead of time, run once untimed, then timed `--repeats` times in rotating order.
Printed per variant and lever: median and range of the step time, `speedup <variant> <lever> = X` (baseline
median / lever median: > 1 is faster), the compiled step's temporary and argument memory (XLA's memory
analysis: what remat trades time for; total = arguments + outputs + temporaries - the outputs written into
donated inputs), and the step-0 loss (bfloat16 moves it by its rounding, the others must
not move it beyond float noise).

    python bench/speed_levers.py                 # the issue's shapes (T5 v1.1, d_model 512, 4+4, batch 8, 256/64)
    python bench/speed_levers.py --tiny          # seconds; what tests/test_bench.py checks
"""
from __future__ import annotations

import dataclasses
import gc
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # `python bench/x.py`: find the repo

import numpy as np  # noqa: E402

from bench import _common as C  # noqa: E402
from bench import _torch_pairs as P  # noqa: E402
from tagi_jax.models import tagi as tagi_lib  # noqa: E402
from tagi_jax.run import defaults, objectives, stages  # noqa: E402

# lever -> (T5Config overrides, donate)
LEVERS = {
    "baseline": ({}, True),
    "bfloat16": ({"dtype": "bfloat16"}, True),
    "remat_full": ({"remat_policy": "full"}, True),
    "remat_dots": ({"remat_policy": "dots"}, True),
    "attention_xla": ({"attention": "xla"}, True),
    "no_donation": ({}, False),
}
VARIANTS = ("full_finetune", "tagi")


@dataclasses.dataclass(frozen=True)
class Settings:
    tiny: bool = False
    variants: str = ",".join(VARIANTS)
    levers: str = ",".join(LEVERS)
    head: str = "bottleneck"
    repeats: int = 5
    seed: int = 0
    learning_rate: float = 1e-3

    def __post_init__(self):
        for key, known in (("variants", VARIANTS), ("levers", LEVERS)):
            values = getattr(self, key).split(",")
            bad = [v for v in values if v not in known]
            if bad or not values:
                raise ValueError(f"--{key}: {getattr(self, key)!r}; choose from {','.join(known)}")
        if "baseline" not in self.levers.split(","):
            raise ValueError("--levers must include baseline (every speedup is against it)")
        if self.repeats < 1 or self.learning_rate <= 0:
            raise ValueError("--repeats must be >= 1 and --learning_rate > 0")

    @property
    def shapes(self) -> P.Shapes:
        return P.TINY if self.tiny else P.ISSUE


def build_step(variant: str, lever: str, settings: Settings, batch) -> P.JaxStep:
    """Our compiled step of `variant` with `lever`'s settings, on the weights every lever shares."""
    overrides, donate = LEVERS[lever]
    s = settings.shapes
    run_cfg = defaults.default_config()
    if variant == "full_finetune":
        model_cfg = P.tagi_config(s, settings.head, 0)
        params = {"t5": P.init_t5(model_cfg.t5, settings.seed)}
        model_cfg = dataclasses.replace(model_cfg, t5=model_cfg.t5.replace(**overrides))
        loss_fn = objectives.make_loss_fn("concat", run_cfg, tagi_lib.TAGI(model_cfg), None)
        return P.JaxStep(loss_fn, params, (), batch, settings, donate=donate)
    model_cfg = P.tagi_config(s, settings.head, s.tasks)
    params = P.perturbed_finetune_params(model_cfg, settings.seed)
    model_cfg = dataclasses.replace(model_cfg, t5=model_cfg.t5.replace(**overrides))
    loss_fn = objectives.make_loss_fn("finetune", run_cfg, tagi_lib.TAGI(model_cfg), np.arange(s.tasks))
    return P.JaxStep(loss_fn, params, stages.frozen_patterns("finetune", "all"), batch, settings, donate=donate)


def measure(variant: str, settings: Settings) -> list[dict]:
    batch = P.make_batch(settings.shapes, settings.seed)
    levers = settings.levers.split(",")
    steps = {lever: build_step(variant, lever, settings, batch) for lever in levers}
    for step in steps.values():
        C.block(step())  # untimed step 0 (compiled before)
    times = C.interleaved_timings(steps, settings.repeats)
    rows = []
    for lever, step in steps.items():
        memory = step.compiled.memory_analysis()
        # Live at the peak: inputs + outputs + temporaries, less the outputs that reuse donated inputs.
        total = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                 - memory.alias_size_in_bytes)
        rows.append({"variant": variant, "lever": lever, "times": times[lever], "loss0": float(step.last_loss),
                     "temp_mb": memory.temp_size_in_bytes / 2**20, "total_mb": total / 2**20})
    del steps
    gc.collect()
    return rows


def report(rows: list[dict]) -> str:
    table = C.Table(["variant", "lever", "step s (median)", "min-max", "speedup vs baseline", "temporaries MB",
                     "total MB", "loss@0"])
    lines = []
    for r in rows:
        base = next(b for b in rows if b["variant"] == r["variant"] and b["lever"] == "baseline")
        speedup = C.median(base["times"]) / C.median(r["times"])
        table.add(r["variant"], r["lever"], f"{C.median(r['times']):.4g}",
                  f"{min(r['times']):.4g}-{max(r['times']):.4g}", f"{speedup:.2f}", f"{r['temp_mb']:.1f}",
                  f"{r['total_mb']:.1f}", f"{r['loss0']:.6f}")
        if r["lever"] != "baseline":
            lines.append(f"speedup {r['variant']} {r['lever']} = {speedup:.2f}  (baseline median / this lever's; "
                         f"memory {r['total_mb']:.1f} MB vs {base['total_mb']:.1f} MB)")
    return "\n".join([table.render(), ""] + lines)


def main(argv=None) -> None:
    settings, args = C.parse_settings(Settings, __doc__.split("\n\n")[0], argv)
    C.print_run_header("bench/speed_levers.py", args)
    print(f"shapes: {settings.shapes.describe()}; TAGI head {settings.head!r}, fusion prepend")
    start_wall, start_cpu = C.time.perf_counter(), C.cpu_seconds()
    rows = []
    for variant in settings.variants.split(","):
        rows += measure(variant, settings)
        print(f"[{variant}] done", flush=True)
    print()
    print(report(rows))
    print(f"\nrun: {C.time.perf_counter() - start_wall:.0f} s wall, {C.cpu_seconds() - start_cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
