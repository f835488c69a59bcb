"""The trainer's config sections (seed, prng_impl, train, optimizer, mesh, distributed): defaults and load-time
checks.

Every check raises a one-line `ConfigError` naming the key; `section_names` renames sections in the message when
the trainer's sections live deeper in a run config (`stages.finetune.train.steps` rather than `train.steps`).
"""
from __future__ import annotations

import re
from typing import Mapping

from ml_collections import config_dict

from tagi_jax.config import ConfigError, get_key, rename_sections, require_int
from tagi_jax.trainer import optim


def default_config() -> config_dict.ConfigDict:
    """seed, train, optimizer, mesh and distributed sections with their defaults, one commented field a line."""
    c = config_dict.ConfigDict()
    c.seed = 0  # parameter init and the per-step RNG (fold_in(base, step))
    # The per-step (dropout) RNG's implementation: "threefry2x32" (jax's default: the same bits on any device
    # count), "rbg" or "unsafe_rbg" (the accelerator's bit generator). Dropout on T5's attention weights draws
    # [batch, heads, q, k] bits a layer: with threefry's dozens of elementwise ops over that shape they were most
    # of T5-Base's training memory on TPU (12.4 of 12.6 GiB/chip, launch/compile.py) and doubled compile time.
    # Parameter init always uses threefry, so the impl changes no initial value.
    c.prng_impl = "threefry2x32"
    c.train = config_dict.ConfigDict()
    c.train.steps = 1000  # total optimizer updates; the schedule decays over these
    c.train.batch_size = 32  # GLOBAL batch (all hosts, all microbatches)
    # Gradient accumulation inside the step: must divide batch_size, and batch_size / num_microbatches must be
    # divisible by the mesh's data axis.
    c.train.num_microbatches = 1
    c.train.log_every = 50  # steps between metric writes (averaged over the interval)
    c.train.checkpoint_every = 500  # steps between checkpoints (0: only at the end)
    c.train.keep_checkpoints = 2  # keep the last N (0: keep all)
    c.train.eval_every = 0  # steps between calls of `fit(eval_fn=...)` (0: only at the end)
    c.train.progress_bar = True
    c.optimizer = optim.default_config()  # see tagi_jax/trainer/optim.py
    c.mesh = config_dict.ConfigDict()
    c.mesh.data = -1  # -1 = all remaining devices
    c.mesh.model = 1
    c.mesh.fsdp = False  # also split parameters' embed dimension over data
    c.distributed = config_dict.ConfigDict()
    c.distributed.initialize = False  # call jax.distributed.initialize() before touching devices
    c.distributed.coordinator_address = ""  # "" = auto
    c.distributed.num_processes = 0  # 0 = auto
    c.distributed.process_id = -1  # -1 = auto
    # Cross-process collectives of the CPU backend, which a CPU-only multi-process run needs (jax 0.10's default,
    # set explicitly so that another version's default cannot turn them off): "gloo" | "mpi" | "" (leave jax's
    # setting). TPU and GPU collectives don't use it.
    c.distributed.cpu_collectives = "gloo"
    return c


def validate_trainer_config(
    config: config_dict.ConfigDict, data_parallel_size: int | None = None,
    section_names: Mapping[str, str] | None = None,
) -> None:
    """Check the `train`, `optimizer`, `mesh` and `distributed` sections.

    `data_parallel_size` is the mesh's `data` axis size when known (the Trainer passes it); without it
    `mesh.data` is used when positive. `section_names` renames sections in error messages (see
    `tagi_jax.config.rename_sections`).
    """
    try:
        _validate(config, data_parallel_size)
    except ConfigError as e:
        raise ConfigError(rename_sections(str(e), section_names)) from None


PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def _validate(config: config_dict.ConfigDict, data_parallel_size: int | None) -> None:
    impl = get_key(config, "prng_impl", PRNG_IMPLS[0])
    if impl not in PRNG_IMPLS:
        raise ConfigError(f"config key 'prng_impl' must be one of {', '.join(PRNG_IMPLS)}, got {impl!r}")
    steps = require_int(config, "train.steps", 1)
    batch_size = require_int(config, "train.batch_size", 1)
    micro = require_int(config, "train.num_microbatches", 1)
    require_int(config, "train.log_every", 1)
    require_int(config, "train.checkpoint_every", 0)
    require_int(config, "train.keep_checkpoints", 0)
    require_int(config, "train.eval_every", 0)
    if batch_size % micro:
        raise ConfigError(
            f"config key 'train.num_microbatches'={micro} does not divide 'train.batch_size'={batch_size}"
        )
    if data_parallel_size is None:
        data = get_key(config, "mesh.data", -1)
        data_parallel_size = data if isinstance(data, int) and data > 0 else None
    if data_parallel_size is not None and (batch_size // micro) % data_parallel_size:
        raise ConfigError(
            f"config key 'train.batch_size'={batch_size}: the microbatch of {batch_size // micro} examples "
            f"(batch_size / train.num_microbatches={micro}) is not divisible by the mesh's data axis "
            f"(mesh.data={data_parallel_size})"
        )
    for key in ("mesh.data", "mesh.model"):
        value = require_int(config, key, -1)
        if value == 0:
            raise ConfigError(f"config key '{key}' must be -1 (all remaining devices) or > 0, got 0")
    optim.validate_config(get_key(config, "optimizer"), total_steps=steps, prefix="optimizer")
    if get_key(config, "distributed", None) is not None:
        validate_distributed(config)


CPU_COLLECTIVES = ("gloo", "mpi", "")


def validate_distributed(config: config_dict.ConfigDict) -> None:
    """Check the `distributed` section (before `jax.distributed.initialize` sees it)."""
    initialize = get_key(config, "distributed.initialize", False)
    if not isinstance(initialize, bool):
        raise ConfigError(f"config key 'distributed.initialize' must be a bool, got {initialize!r}")
    for key in ("coordinator_address", "cpu_collectives"):
        value = get_key(config, f"distributed.{key}", "")
        if not isinstance(value, str):
            raise ConfigError(f"config key 'distributed.{key}' must be a string, got {value!r}")
    address = get_key(config, "distributed.coordinator_address", "")
    if address and not re.fullmatch(r"\S+:\d+", address):
        raise ConfigError(f"config key 'distributed.coordinator_address' must be host:port, got {address!r}")
    collectives = get_key(config, "distributed.cpu_collectives", "")
    if collectives not in CPU_COLLECTIVES:
        raise ConfigError(f"config key 'distributed.cpu_collectives' must be one of 'gloo', 'mpi' or '' (jax's "
                          f"setting), got {collectives!r}")
    # Absent keys (a config written before they existed) keep their defaults.
    count = require_int(config, "distributed.num_processes", 0) if "num_processes" in config.distributed else 0
    index = require_int(config, "distributed.process_id", -1) if "process_id" in config.distributed else -1
    if count and index >= count:
        raise ConfigError(f"config key 'distributed.process_id'={index} must be below "
                          f"'distributed.num_processes'={count}")
