"""Multi-host helpers: starting `jax.distributed`, which rows of the global batch this host loads, and making
global arrays of the host-local slices.

A multi-host run is one process per host (TPU VM, GPU node; or several on one machine for testing), each running
the same program: every process loads only its `host_batch_slice` of each global batch and all of them call
every compiled step and every checkpoint save; process 0 alone writes the logs and the run files.
"""
from __future__ import annotations

import functools
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from tagi_jax import partitioning
from tagi_jax.config import ConfigError, get_key
from tagi_jax.trainer.config import validate_distributed


def initialize_distributed(config: config_dict.ConfigDict) -> bool:
    """`jax.distributed.initialize()` when `config.distributed.initialize`; call before touching devices.

    Unset fields are left to jax, which reads them from the cluster (TPU pod metadata, SLURM, Open MPI); a
    plain set of processes (e.g. several on one machine) gives coordinator_address, num_processes and
    process_id. Returns whether it initialized."""
    dist = get_key(config, "distributed", None)
    if dist is None:
        return False
    validate_distributed(config)
    if not dist.initialize:
        return False
    if dist.get("cpu_collectives"):
        # Before initialize, which creates the CPU client and its cross-process collectives.
        jax.config.update("jax_cpu_collectives_implementation", dist.cpu_collectives)
    kwargs: dict[str, Any] = {}
    if dist.get("coordinator_address"):
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.get("num_processes", 0) > 0:
        kwargs["num_processes"] = dist.num_processes
    if dist.get("process_id", -1) >= 0:
        kwargs["process_id"] = dist.process_id
    jax.distributed.initialize(**kwargs)
    return True


def describe_processes() -> str:
    """This process's place in the run, for its log: 'process 1 of 2, devices 4 of 8 (cpu)'."""
    return (f"process {jax.process_index()} of {jax.process_count()}, devices {jax.local_device_count()} of "
            f"{jax.device_count()} ({jax.default_backend()})")


def host_batch_slice(global_batch_size: int) -> slice:
    """The rows of the global batch this host loads (`process_index`-th of `process_count` equal slices)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ConfigError(
            f"config key 'train.batch_size'={global_batch_size} is not divisible by the {count} processes"
        )
    per_host = global_batch_size // count
    rows = slice(index * per_host, (index + 1) * per_host)
    if count > 1:  # said in each process's log: which rows this host reads is checkable after the fact
        logging.info("host %d of %d loads rows %d:%d of each global batch of %d", index, count, rows.start,
                     rows.stop, global_batch_size)
    return rows


def put_replicated(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """`jax.device_put(x, sharding)` for a value every process holds alike (a PRNG key, a step counter) and a
    sharding whose devices may belong to other processes too: device_put only accepts a host (numpy) value
    there, so the value goes through numpy (a typed key as its raw key data)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = jax.device_put(np.asarray(jax.random.key_data(x)), sharding)
        return jax.jit(functools.partial(jax.random.wrap_key_data, impl=jax.random.key_impl(x)),
                       out_shardings=sharding)(data)
    return jax.device_put(np.asarray(x), sharding)


def make_global_batch(local_batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local numpy slices -> global arrays split over the mesh's `data` axis on the batch dimension."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            partitioning.data_sharding(mesh, np.ndim(x)), np.asarray(x)
        ),
        dict(local_batch),
    )
