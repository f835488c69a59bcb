"""One training step, ours (JAX, the package's compiled `train_step`) vs PyTorch (Hugging Face T5), same shapes,
same weights, same loss, one AdamW update (global-norm clipping 1.0, lr 1e-3, no weight decay) per step.

Variants:

* full_finetune: every T5 weight trained on cross-entropy (ours: the `concat` stage's loss; torch: HF T5).
* lora:          LoRA rank r on q and v of every attention block, backbone frozen. Ours: the `teachers` stage
                 (stage 0) with a teacher table of one row, i.e. the package's own single-LoRA step; torch: PEFT
                 `LoraConfig(r, lora_alpha, target_modules=["q", "v"])` holding the same factors.
* tagi:          the stage-2 step, `CE + 5·KL(teacher ‖ student) + sigmoid(L_ins)·L_ins`. Ours: the `finetune`
                 stage's loss on its {"student", "teacher"} tree; torch: `bench/_torch_tagi.py`, the original code's
                 structure (generated A, B regenerated inside every q/v forward, a frozen teacher T5 + its task's
                 LoRA reading the full instruction) with our hypernetwork's math and weights.

The step-0 losses of both sides must agree to `--tolerance` before anything is timed (otherwise: exit 1).
Each variant is compiled (ours: ahead of time) and run once untimed on both sides, then timed `--repeats`
times, the two sides alternating. Printed: median and range per side, `ratio jax/torch <variant> = X` (torch
median / our median: > 1 means ours is faster), the load average before/after, the process's peak RSS.
Dropout is 0 on both sides; random weights (cost does not depend on them), with every zero-initialised LoRA B
factor perturbed so that the adapters change the function.

    python bench/train_step.py            # the issue's shapes: T5 v1.1, d_model 512, 4+4 layers, batch 8, 256/64
    python bench/train_step.py --tiny     # seconds; what tests/test_train_step_bench.py checks
    python bench/train_step.py --breakdown --variants=full_finetune   # + forward / backward / update apart

The two sides of each variant (shapes, weights, steps) are built in bench/_torch_pairs.py, torch's TAGI in
bench/_torch_tagi.py. JAX's CPU threads follow XLA_FLAGS (printed), torch's `--torch_threads`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import pathlib
import resource
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # `python bench/x.py`: find the repo

from bench import _common as C  # noqa: E402
from bench import _torch_pairs as P  # noqa: E402
from bench._torch_pairs import VARIANTS, build  # noqa: E402,F401  (the test's entry points)
from tagi_jax.models.hypernet import HEADS  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Settings:
    tiny: bool = False
    variants: str = ",".join(VARIANTS)
    head: str = "bottleneck"  # the original code's generator; "dense" / "factorised": tagi_jax.models.hypernet
    repeats: int = 5
    seed: int = 0
    learning_rate: float = 1e-3
    tolerance: float = 1e-4
    torch_compile: bool = False
    torch_threads: int = 0  # 0: torch's default
    breakdown: bool = False  # also time forward, forward+backward and the update alone

    def __post_init__(self):
        unknown = [v for v in self.variant_list if v not in VARIANTS]
        if unknown or not self.variant_list:
            raise ValueError(f"--variants: {self.variants!r}; choose from {','.join(VARIANTS)}")
        if self.head not in HEADS:
            raise ValueError(f"--head: {self.head!r}; choose one of {','.join(HEADS)}")
        if self.repeats < 1 or self.torch_threads < 0 or self.learning_rate <= 0 or self.tolerance <= 0:
            raise ValueError("--repeats must be >= 1, --torch_threads >= 0, --learning_rate and --tolerance > 0")

    @property
    def variant_list(self) -> tuple[str, ...]:
        return tuple(v for v in self.variants.split(",") if v)

    @property
    def shapes(self) -> P.Shapes:
        return P.TINY if self.tiny else P.ISSUE


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_average() -> str:
    return "%.2f / %.2f / %.2f" % os.getloadavg()


def measure(name: str, settings: Settings) -> dict:
    """Build, check step-0 parity, time; every figure of one variant's row."""
    load_before = load_average()
    pair = P.build(name, settings)
    C.block(pair.jax_step())  # untimed step 0 (compiled before)
    pair.torch_step()
    loss0 = (float(pair.jax_step.last_loss), pair.torch_step.last_loss)
    if not abs(loss0[0] - loss0[1]) <= settings.tolerance:
        raise SystemExit(f"error: {name}: step-0 losses differ: ours {loss0[0]:.6f} vs torch {loss0[1]:.6f} "
                         f"(tolerance {settings.tolerance}); nothing timed")
    times = C.interleaved_timings({"jax": pair.jax_step, "torch": pair.torch_step}, settings.repeats)
    row = {"variant": name, "jax": times["jax"], "torch": times["torch"], "loss0": loss0,
           "load_before": load_before, "load_after": load_average(), "peak_rss_mb": peak_rss_mb()}
    if settings.breakdown:
        ours, theirs = pair.jax_step.parts(), pair.torch_step.parts()
        fns = {(side, part): fn for side, parts in (("jax", ours), ("torch", theirs)) for part, fn in parts.items()}
        for fn in fns.values():  # warm-up
            C.block(fn())
        row["parts"] = C.interleaved_timings(fns, settings.repeats)
    del pair
    gc.collect()
    return row


def report(rows: list[dict]) -> str:
    table = C.Table(["variant", "ours s (median)", "ours min-max", "torch s (median)", "torch min-max",
                     "torch/ours", "loss@0 ours", "loss@0 torch", "|diff|", "load before -> after",
                     "peak RSS MB (so far)"])
    lines = []
    for r in rows:
        mj, mt = C.median(r["jax"]), C.median(r["torch"])
        table.add(r["variant"], f"{mj:.4g}", f"{min(r['jax']):.4g}-{max(r['jax']):.4g}", f"{mt:.4g}",
                  f"{min(r['torch']):.4g}-{max(r['torch']):.4g}", f"{mt / mj:.2f}", f"{r['loss0'][0]:.6f}",
                  f"{r['loss0'][1]:.6f}", f"{abs(r['loss0'][0] - r['loss0'][1]):.1e}",
                  f"{r['load_before']} -> {r['load_after']}", f"{r['peak_rss_mb']:.0f}")
        lines.append(f"ratio jax/torch {r['variant']} = {mt / mj:.2f}  (torch median step time / ours; > 1 means "
                     "ours is faster)")
    parts = C.Table(["variant", "part", "ours s (median)", "ours min-max", "torch s (median)", "torch min-max",
                     "torch/ours"])
    for r in rows:
        for part in dict.fromkeys(part for _, part in r.get("parts", {})):
            tj, tt = r["parts"][("jax", part)], r["parts"][("torch", part)]
            parts.add(r["variant"], part, f"{C.median(tj):.4g}", f"{min(tj):.4g}-{max(tj):.4g}",
                      f"{C.median(tt):.4g}", f"{min(tt):.4g}-{max(tt):.4g}", f"{C.median(tt) / C.median(tj):.2f}")
    extra = ["", "parts of the step, each compiled / run alone:", parts.render()] if parts.rows else []
    return "\n".join([table.render(), ""] + lines + extra)


def parse_settings(argv=None) -> tuple[Settings, argparse.Namespace]:
    return C.parse_settings(Settings, __doc__.split("\n\n")[0], argv)


def main(argv=None) -> None:
    settings, args = parse_settings(argv)
    torch, _ = P.torch_modules(settings)
    C.print_run_header("bench/train_step.py", args)
    print(f"torch {torch.__version__}: {torch.get_num_threads()} intra-op threads; XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}")
    print(f"shapes: {settings.shapes.describe()}; TAGI head {settings.head!r}, fusion prepend")
    start_wall, start_cpu = C.time.perf_counter(), C.cpu_seconds()
    rows = []
    for name in settings.variant_list:
        rows.append(measure(name, settings))
        print(f"[{name}] done, load {rows[-1]['load_after']}", flush=True)
    print()
    print(report(rows))
    print(f"\nrun: {C.time.perf_counter() - start_wall:.0f} s wall, {C.cpu_seconds() - start_cpu:.0f} s CPU; "
          f"load average {load_average()} (1/5/15 min) at the end")


if __name__ == "__main__":
    main()
