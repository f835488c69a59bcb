"""The int8 frozen backbone (`model.backbone_weights = "int8"`): memory per chip, and what it costs in accuracy.

    python bench/quantize.py [--workdir=runs/demo] [--part=memory,accuracy]

memory: for each paper config on the slice it is meant for, the per-chip bytes of every stage's parameters with
the frozen backbone kernels in float32 and in int8, from abstract trees (`jax.eval_shape`, nothing allocated)
sharded by the config's mesh and logical axis rules over an abstract mesh of the slice's size (FSDP included).
The optimizer state is the same both ways: frozen parameters have none.

accuracy: on a trained pipeline work directory (the demo's by default: run the README's first command), TAGI
with its backbone quantised after training against the float32 model, side by side: the student's teacher-forced
logits on training batches (max and mean |Δ|, the largest |logit|, the share of target positions whose argmax
changes), then the whole evaluation (ROUGE-L / EM on seen and unseen tasks; `eval/tagi_float_*` and
`eval/tagi_int8_*` are written into the work directory beside the pipeline's own files, which stay as they are).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tagi_jax import partitioning  # noqa: E402
from tagi_jax.models import quantize  # noqa: E402
from tagi_jax.models import tagi as tagi_lib  # noqa: E402
from tagi_jax.models.t5_config import t5_v1_1_config  # noqa: E402
from tagi_jax.run import compile_plan  # noqa: E402
from tagi_jax.run.defaults import tagi_config  # noqa: E402
from tagi_jax.run.stages import stage_init_for  # noqa: E402

GIB = 2.0**30
# (config module, size, chips): the slices issue 12 fits each size on.
SLICES = [("sni_t5_lm", "base", 8), ("sni_t5_lm", "xl", 32), ("sni_t5_lm", "xxl", 256),
          ("p3_t0", "xl", 32)]


def stage_param_bytes(config, stage: str, model_cfg, chips: int) -> tuple[float, float]:
    """(per-chip, whole-model) bytes of `stage`'s parameters under `config` (its backbone_weights), `chips`
    devices."""
    mesh = partitioning.abstract_mesh(int(config.mesh.data), int(config.mesh.model), chips)
    rules = partitioning.logical_axis_rules(bool(config.mesh.fsdp))
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype)
    abstract, _ = partitioning.abstract_with_shardings(stage_init_for(config, stage, model_cfg), mesh, rules, rng)
    return compile_plan.per_device_bytes(abstract), float(quantize.param_bytes(abstract))


def memory() -> None:
    print("## parameters per chip, float32 vs int8 frozen backbone kernels (GiB)\n")
    print("| config | chips | stage | per chip float32 | per chip int8 | int8 / float32 | whole model float32 | "
          "whole model int8 |")
    print("|---|---|---|---|---|---|---|---|")
    for module, size, chips in SLICES:
        config = importlib.import_module(f"configs.{module}").get_config(size)
        backbone = compile_plan.backbone_for_plan(config, t5_v1_1_config(size))
        rows, _ = compile_plan.teacher_rows(config, None)
        model_cfg = tagi_config(config, num_teachers=rows, t5=backbone)
        for stage in config.pipeline.stages:
            sizes = {}
            for weights in quantize.BACKBONE_WEIGHTS:
                with config.unlocked():
                    config.model.backbone_weights = weights
                sizes[weights] = stage_param_bytes(config, stage, model_cfg, chips)
            (f_chip, f_all), (q_chip, q_all) = sizes["float"], sizes["int8"]
            print(f"| {module}:{size} | {chips} | {stage} | {f_chip / GIB:.2f} | {q_chip / GIB:.2f} | "
                  f"{q_chip / f_chip:.2f} | {f_all / GIB:.2f} | {q_all / GIB:.2f} |", flush=True)
    print("\n(policy tagi.train_backbone of each config: the stages that train the backbone's kernels keep them "
          "in float32; so do the encoder-fusion blocks stage 2 trains)\n")


def logit_differences(workdir: str, batches: int) -> None:
    from tagi_jax.data import batches as batches_lib
    from tagi_jax.data.benchmarks import register_benchmark
    from tagi_jax.run.workdir import load_trained

    config, model, float_params = load_trained(workdir, "tagi", backbone_weights="float")
    _, _, int8_params = load_trained(workdir, "tagi", backbone_weights="int8")
    bench = register_benchmark(config.data, workdir, training=True)
    stream = batches_lib.train_batches(bench.train_mixture, batches_lib.task_lengths(config.data),
                                       int(config.eval.batch_size), bench.train_task_names, seed=1234, start_step=0)
    logits = jax.jit(lambda p, b: tagi_lib.student_logits(model, p, b))
    max_d, sum_d, count, flips, positions, max_logit = 0.0, 0.0, 0, 0, 0, 0.0
    for _ in range(batches):
        batch = {k: jnp.asarray(v) for k, v in next(stream).items()}
        a, b = np.asarray(logits(float_params, batch)), np.asarray(logits(int8_params, batch))
        mask = np.asarray(batch["decoder_target_tokens"]) > 0
        d = np.abs(a - b)[mask]
        max_d, sum_d, count = max(max_d, float(d.max())), sum_d + float(d.sum()), count + d.size
        max_logit = max(max_logit, float(np.abs(a[mask]).max()))
        flips += int((a.argmax(-1) != b.argmax(-1))[mask].sum())
        positions += int(mask.sum())
    print(f"## student logits on {batches} training batches of {int(config.eval.batch_size)} ({positions} target "
          "positions), int8 vs float32 backbone\n")
    print(f"max |Δ logit| {max_d:.4f}; mean |Δ| {sum_d / count:.5f}; largest |logit| {max_logit:.2f}; "
          f"argmax changed at {flips} of {positions} positions ({100.0 * flips / positions:.2f}%)\n", flush=True)


def evaluation(workdir: str) -> None:
    from tagi_jax.eval.runner import run_evaluation

    results = {w: run_evaluation(workdir, "tagi", backbone_weights=w, use_cache=False, print_fn=None)
               for w in quantize.BACKBONE_WEIGHTS}
    print("## TAGI evaluation, backbone quantised after training\n")
    print("| backbone | unseen ROUGE-L | unseen EM | seen ROUGE-L | seen EM | decode examples/s (unseen) |")
    print("|---|---|---|---|---|---|")
    for weights, r in results.items():
        u, s = r["unseen"], r["seen"]
        print(f"| {weights} | {u['rougeL']:.2f} | {u['exact_match']:.2f} | {s['rougeL']:.2f} | {s['exact_match']:.2f} "
              f"| {u['examples_per_second']:.0f} |")
    f, q = results["float"]["unseen"], results["int8"]["unseen"]
    print(f"\nΔ unseen ROUGE-L (int8 - float) {q['rougeL'] - f['rougeL']:+.2f}; speed ratio int8/float "
          f"{q['examples_per_second'] / f['examples_per_second']:.2f} (the CPU runs int8 kernels as float "
          "matmuls: the gain is memory, not speed)", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default="runs/demo", help="a trained pipeline work directory (accuracy part)")
    p.add_argument("--part", default="memory,accuracy", help="comma-separated: memory, accuracy")
    p.add_argument("--batches", type=int, default=8, help="training batches for the logit differences")
    args = p.parse_args(argv)
    parts = [x for x in args.part.split(",") if x]
    unknown = sorted(set(parts) - {"memory", "accuracy"})
    if unknown:
        print(f"error: --part: unknown part {unknown[0]!r} (known: memory, accuracy)", file=sys.stderr)
        return 2
    if "accuracy" in parts and not os.path.isfile(os.path.join(args.workdir, "config.json")):
        print(f"error: --workdir {args.workdir}: not a pipeline work directory (no config.json); run the demo "
              "first (README) or pass --part=memory", file=sys.stderr)
        return 2
    if "memory" in parts:
        memory()
    if "accuracy" in parts:
        logit_differences(args.workdir, args.batches)
        evaluation(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
