"""Accelerator slices to plan for: chip specifications (HBM, peak bfloat16 FLOP/s, HBM bandwidth) and the devices of
a named slice such as `v5e-64`, abstract TPU devices from libtpu (`jax.experimental.topologies`) or, without
libtpu, the host's fake CPU devices (`--xla_force_host_platform_device_count`)."""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import re

import jax

GIB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_gib: float  # per chip
    peak_flops: float  # bfloat16 FLOP/s per chip
    hbm_bandwidth: float  # bytes/s per chip
    grid_dims: int  # 2 (v5e, v6e: a 2D torus) or 3 (v4, v5p)
    cores_in_name: bool  # whether the slice's number counts TensorCores (2 a chip: v4, v5p) rather than chips
    megacore: bool  # two TensorCores seen as one device


# Public specifications (cloud.google.com/tpu/docs/system-architecture-tpu-vm).
CHIPS = {
    "v4": Chip("TPU v4", 32, 275e12, 1.2e12, 3, True, True),
    "v5e": Chip("TPU v5e", 16, 197e12, 8.19e11, 2, False, False),
    "v5p": Chip("TPU v5p", 95, 459e12, 2.765e12, 3, True, True),
    "v6e": Chip("TPU v6e", 32, 918e12, 1.64e12, 2, False, False),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    """A slice: `name` as users write it (`v5e-64`), its chip, chip count and libtpu topology name (`v5e:8x8`)."""
    name: str
    chip: Chip
    chips: int
    topology_name: str

    @property
    def hbm_bytes(self) -> float:
        return self.chip.hbm_gib * GIB


def _grid(chips: int, dims: int) -> list[int]:
    """The most even power-of-two grid of `chips` in `dims` dimensions, ascending (8 -> 2x4 or 2x2x2)."""
    grid = [1] * dims
    for i in range(int(math.log2(chips))):
        grid[i % dims] *= 2
    return sorted(grid)


def parse_topology(name: str) -> Topology:
    """`v5e-8`, `v4-16`, `v6e-256`, ... (the number counts chips on v5e / v6e, TensorCores on v4 / v5p)."""
    m = re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", name.strip())
    if not m:
        raise ValueError(f"--topology={name!r}: expected <chip>-<size> with chip one of {', '.join(CHIPS)} "
                         "(e.g. v5e-64, v4-16)")
    chip = CHIPS[m.group(1)]
    size = int(m.group(2))
    chips = size // 2 if chip.cores_in_name else size
    if chips < 1 or chips & (chips - 1):
        raise ValueError(f"--topology={name!r}: the slice must hold a power-of-two number of chips")
    grid = "x".join(str(g) for g in _grid(chips, chip.grid_dims))
    return Topology(name, chip, chips, f"{m.group(1)}:{grid}")


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_devices(topology: Topology) -> list:
    """Abstract TPU devices of the slice (nothing runs on them: they are only compiled for)."""
    from jax.experimental import topologies

    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topology.topology_name,
        chip_config_name="megacore" if topology.chip.megacore else "default")
    devices = list(desc.devices)
    if len(devices) != topology.chips:
        raise ValueError(f"{topology.name}: libtpu describes {len(devices)} devices, expected {topology.chips}")
    return devices


def cpu_devices(count: int) -> list:
    """`count` of the host's CPU devices (the process must start with that many fake ones)."""
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise ValueError(f"{count} devices are needed but the host has {len(devices)} CPU devices (start with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={count})")
    return devices[:count]
