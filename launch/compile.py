"""Compile every stage of a run ahead of time for a slice you do not have, and report whether it fits.

    python launch/compile.py --config=configs/sni_t5_lm.py:xl --topology=v5e-32 [--stage=finetune] [--config.…]

For each stage of `pipeline.stages` it builds the trainer's real train step (and each evaluated method's decoding
step, the finetune stage's log-step diagnostics) from abstract shapes only, with the config's mesh and logical
axis rules laid over the slice's devices, compiles it, and prints per chip: parameters, optimizer state, batch,
temporaries and the total against the chip's HBM (v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB), TFLOP per step
(the compiled cost analysis) and a roofline step time at the chip's peak. Exits 1 with one line naming the first
program that does not fit in `--headroom` (default 90%) of HBM.

Topologies: v4-N, v5p-N (N TensorCores, two a chip), v5e-N, v6e-N (N chips); with `libtpu` installed
(`pip install -e ".[tpu]"`) the TPU compiler's figures, without it the slice's chip count of fake CPU devices
and the CPU compiler's figures (said in the output); `cpu-N` asks for the latter. The backbone is the config's
`model.checkpoint` (its config.json only) or `--backbone` (a T5 v1.1 size or a checkpoint directory); paper
configs default to the size after ':' in `--config`. No data is read: teacher rows default to the paper's.
"""
import functools
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no oneDNN INFO line on stderr (see launch/train.py)
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata here: keep libtpu quiet
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: several plans may run at once


def _prepare_devices(argv) -> None:
    """Before jax starts: fake CPU devices for a CPU-compiled plan (`cpu-N`, or any slice without libtpu)."""
    import importlib.util
    topology = next((a.split("=", 1)[1] for a in argv if a.startswith("--topology=")), "v5e-8")
    m = re.fullmatch(r"(cpu|v4|v5e|v5p|v6e)-(\d+)", topology)
    if not m or (m.group(1) != "cpu" and importlib.util.find_spec("libtpu") is not None):
        return
    count = int(m.group(2)) // (2 if m.group(1) in ("v4", "v5p") else 1)
    flags_env = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={max(count, 1)}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


if __name__ == "__main__":
    _prepare_devices(sys.argv)

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tagi_jax import cli  # noqa: E402
from tagi_jax.models.t5_config import T5_V1_1_SIZES, t5_v1_1_config  # noqa: E402
from tagi_jax.run import compile_plan, topologies  # noqa: E402
from tagi_jax.run.stages import STAGES  # noqa: E402


def define_flags(argv) -> flags.FlagValues:
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file (optionally :size).",
                                    lock_config=True, flag_values=fv, sys_argv=list(argv))
    string = functools.partial(flags.DEFINE_string, flag_values=fv)
    string("topology", "v5e-8", "The slice: v4-N, v5p-N (TensorCores), v5e-N, v6e-N (chips), or cpu-N.")
    string("stage", "", "Comma-separated stages to compile (default: the config's pipeline.stages).")
    string("backbone", "", "A T5 v1.1 size (" + ", ".join(T5_V1_1_SIZES) + ") or a checkpoint directory; "
           "default: model.checkpoint, else the config's :size, else the config's model section.")
    flags.DEFINE_float("headroom", 0.9, "The fraction of HBM a program may use.", flag_values=fv)
    flags.DEFINE_float("hbm_gib", 0.0, "Per-chip memory to check against (default: the chip's HBM; cpu-N: 16).",
                       flag_values=fv)
    flags.DEFINE_integer("num_teachers", 0, "Teacher-table rows (default: the benchmark's, see compile_plan).",
                         flag_values=fv)
    flags.DEFINE_bool("diagnostics", True, "Also compile the finetune stage's log-step diagnostics.", flag_values=fv)
    return fv


def config_size(argv) -> str:
    """The ':size' suffix of --config, if any."""
    for i, arg in enumerate(argv):
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value and ":" in value:
            return value.rsplit(":", 1)[1]
    return ""


def resolve_backbone(config, flag: str, size: str):
    if flag:
        return t5_v1_1_config(flag) if flag in T5_V1_1_SIZES else compile_plan.read_backbone(flag)
    if config.model.checkpoint:
        return compile_plan.read_backbone(config.model.checkpoint)
    return t5_v1_1_config(size) if size in T5_V1_1_SIZES else None


def work(args: flags.FlagValues, argv) -> None:
    if not args.config:
        raise cli.UsageError("--config is required")
    config = args.config
    stages = tuple(s for s in args.stage.split(",") if s)
    for s in stages:
        if s not in STAGES:
            raise cli.UsageError(f"--stage: unknown stage {s!r} (known: {', '.join(STAGES)})")
    if not 0 < args.headroom <= 1:
        raise cli.UsageError(f"--headroom must be in (0, 1], got {args.headroom}")
    backbone = resolve_backbone(config, args.backbone, config_size(argv))
    cpu = re.fullmatch(r"cpu-(\d+)", args.topology)
    if cpu:
        topology, devices = None, topologies.cpu_devices(int(cpu.group(1)))
        hbm, note = (args.hbm_gib or 16.0) * topologies.GIB, "CPU compiler's figures"
    else:
        try:
            topology = topologies.parse_topology(args.topology)
        except ValueError as e:
            raise cli.UsageError(str(e)) from None
        hbm = (args.hbm_gib * topologies.GIB) if args.hbm_gib else topology.hbm_bytes
        if topologies.libtpu_available():
            devices, note = topologies.tpu_devices(topology), f"TPU compiler ({topology.topology_name}, libtpu)"
        else:
            devices = topologies.cpu_devices(topology.chips)
            note = ("no libtpu: CPU fake devices, so memory figures are the CPU compiler's "
                    "(pip install -e \".[tpu]\" for the TPU compiler's)")
    arch = (f"T5 d_model={backbone.d_model} layers={backbone.num_encoder_layers}" if backbone is not None
            else "the config's model section")
    print(f"{args.topology}: {len(devices)} devices, mesh data={config.mesh.data} model={config.mesh.model} "
          f"fsdp={bool(config.mesh.fsdp)}; backbone {arch}, dtype {config.model.dtype}, remat "
          f"{config.model.remat_policy}, weights {config.model.backbone_weights}; {note}", flush=True)
    print("GiB per chip" + " " * 38 + f"(fits: total <= {args.headroom:.0%} of HBM)\n" + compile_plan.HEADER,
          flush=True)
    reports = compile_plan.plan(
        config, devices, hbm, backbone=backbone, stages=stages or None, num_teachers=args.num_teachers or None,
        with_diagnostics=args.diagnostics,
        on_report=lambda r: print(compile_plan.format_report(r, topology, args.headroom), flush=True))
    for r in reports:
        if r.program == "train" and r.float_params != r.params:
            print(f"{r.stage}: int8 frozen backbone kernels: parameters {r.params / topologies.GIB:.2f} GiB per chip "
                  f"({r.float_params / topologies.GIB:.2f} GiB with them in float32)", flush=True)
    over = [r for r in reports if not r.fits(args.headroom)]
    if over:
        r = over[0]
        raise ValueError(f"stage {r.stage} ({r.program}) needs {r.total / topologies.GIB:.2f} GiB per chip on "
                         f"{args.topology}, over {args.headroom:.0%} of {r.hbm / topologies.GIB:.1f} GiB HBM"
                         + (f" ({len(over)} programs do not fit)" if len(over) > 1 else ""))


def main(argv) -> int:
    return cli.command(argv, define_flags, lambda args: work(args, list(argv)), __doc__)


if __name__ == "__main__":
    cli.exit_process(main(sys.argv))
