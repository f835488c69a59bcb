"""Step time and model-FLOPs utilisation (MFU) of our training steps at T5-Base shapes on one accelerator.

MFU = FLOPs of one step (XLA's cost analysis of the compiled step) / median step time / the chip's peak dense
bfloat16 FLOP/s. No rematerialisation, so the cost analysis counts each FLOP once (the model's own FLOPs). The
steps are bench/speed_levers.py's (the package's `train_step`, state donated):

* tagi:          TAGI stage 2 (student with generated adapters + frozen teacher with its task LoRA, CE + 5·KL
                 + sigmoid(L_ins)·L_ins), the factorised generator heads of the paper configs;
* full_finetune: the instruction-concatenation baseline's step (the whole T5 trains).

    python bench/mfu.py                      # T5 v1.1 Base, bfloat16 (what bench/gpu_check.sh runs)
    python bench/mfu.py --tiny --dtype=float32 --repeats=2   # seconds on a CPU (tests/test_bench.py)

One line per figure: `step_s <variant> = X`, `tflops_per_s <variant> = X`, `mfu <variant> = X` (a fraction;
"n/a" where the chip's peak is unknown: give `--peak_tflops`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # `python bench/x.py`: find the repo

import jax  # noqa: E402

from bench import _common as C  # noqa: E402
from bench import _torch_pairs as P  # noqa: E402
from bench import speed_levers  # noqa: E402

# T5 v1.1 Base with the SNI paper config's lengths (configs/sni_t5_lm.py: instance 256, instruction + instance
# 1024, targets 128) and hypernetwork (rank 32, factorised heads of width 64); 60 teachers (one per category).
BASE = P.Shapes(vocab=32128, d_model=768, d_kv=64, heads=12, d_ff=2048, layers=12, buckets=32, max_distance=128,
                batch=16, enc_len=1024, dec_len=128, instruction_len=768, rank=32, hyper_hidden=768,
                hyper_embed=128, head_dim=64, tasks=60)

# Peak dense bfloat16 tensor FLOP/s by `device_kind` prefix (vendor data sheets; no sparsity).
PEAK_TFLOPS = (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100", 989.4), ("NVIDIA H200", 989.4),
               ("NVIDIA GH200", 989.4), ("NVIDIA A100", 312.0), ("NVIDIA L4", 121.0), ("TPU v4", 275.0),
               ("TPU v5 lite", 197.0), ("TPU v5e", 197.0), ("TPU v5p", 459.0), ("TPU v6", 918.0))
VARIANTS = ("tagi", "full_finetune")
LEVER = {"bfloat16": "bfloat16", "float32": "baseline"}  # speed_levers' lever of each compute dtype


@dataclasses.dataclass(frozen=True)
class Settings:
    tiny: bool = False
    variants: str = ",".join(VARIANTS)
    dtype: str = "bfloat16"
    repeats: int = 10
    peak_tflops: float = 0.0  # 0: from the device kind
    batch: int = 0  # 0: the shapes' own
    seed: int = 0
    learning_rate: float = 1e-3
    head: str = "factorised"

    def __post_init__(self):
        bad = [v for v in self.variants.split(",") if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"--variants: {self.variants!r}; choose from {','.join(VARIANTS)}")
        if self.dtype not in LEVER:
            raise ValueError(f"--dtype: {self.dtype!r}; choose from {','.join(LEVER)}")
        if self.repeats < 1 or self.peak_tflops < 0 or self.batch < 0:
            raise ValueError("--repeats must be >= 1, --peak_tflops and --batch >= 0")

    @property
    def shapes(self) -> P.Shapes:
        shapes = P.TINY if self.tiny else BASE
        return dataclasses.replace(shapes, batch=self.batch) if self.batch else shapes


def peak_tflops(device_kind: str) -> float | None:
    """The peak dense bfloat16 TFLOP/s of a device kind, or None when it is not in the table."""
    for prefix, tflops in PEAK_TFLOPS:
        if device_kind.startswith(prefix):
            return tflops
    return None


def measure(variant: str, settings: Settings) -> dict:
    """Median / min step seconds and the compiled step's FLOPs of one variant."""
    batch = P.make_batch(settings.shapes, settings.seed)
    step = speed_levers.build_step(variant, LEVER[settings.dtype], settings, batch)
    C.block(step())  # untimed first step (compiled before)
    times = C.interleaved_timings({variant: step}, settings.repeats)[variant]
    return {"median": C.median(times), "min": min(times), "flops": C.xla_flops(step.compiled),
            "loss0": float(step.last_loss)}


def report(variant: str, figures: dict, peak: float | None) -> list[str]:
    achieved = figures["flops"] / figures["median"] / 1e12
    mfu = f"{achieved / peak:.3f}" if peak else "n/a (unknown peak: pass --peak_tflops)"
    return [f"step_s {variant} = {figures['median']:.4f}  (min {figures['min']:.4f}, loss {figures['loss0']:.4f})",
            f"tflops_per_s {variant} = {achieved:.2f}  ({figures['flops'] / 1e12:.4g} TFLOP a step)",
            f"mfu {variant} = {mfu}"]


def main(argv=None) -> None:
    settings, args = C.parse_settings(Settings, __doc__.split("\n\n")[0], argv)
    C.print_run_header("bench/mfu.py", args)
    device = jax.devices()[0]
    peak = settings.peak_tflops or peak_tflops(device.device_kind)
    print(f"device: {device.device_kind} ({device.platform}); peak bf16 {peak or 'unknown'} TFLOP/s; "
          f"compute {settings.dtype}, no remat")
    print(f"shapes: {settings.shapes.describe()}; TAGI head {settings.head!r}, fusion prepend", flush=True)
    for variant in settings.variants.split(","):
        print("\n".join(report(variant, measure(variant, settings), peak)), flush=True)


if __name__ == "__main__":
    main()
