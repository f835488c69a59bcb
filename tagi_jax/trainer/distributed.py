"""Multi-host helpers: starting `jax.distributed`, which rows of the global batch this host loads, and making
global arrays of the host-local slices."""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from ml_collections import config_dict

from tagi_jax import partitioning
from tagi_jax.config import ConfigError, get_key


def initialize_distributed(config: config_dict.ConfigDict) -> bool:
    """`jax.distributed.initialize()` when `config.distributed.initialize`; call before touching devices."""
    dist = get_key(config, "distributed", None)
    if dist is None or not dist.get("initialize", False):
        return False
    kwargs: dict[str, Any] = {}
    if dist.get("coordinator_address"):
        kwargs["coordinator_address"] = dist.coordinator_address
    if dist.get("num_processes", 0) > 0:
        kwargs["num_processes"] = dist.num_processes
    if dist.get("process_id", -1) >= 0:
        kwargs["process_id"] = dist.process_id
    jax.distributed.initialize(**kwargs)
    return True


def host_batch_slice(global_batch_size: int) -> slice:
    """The rows of the global batch this host loads (`process_index`-th of `process_count` equal slices)."""
    count, index = jax.process_count(), jax.process_index()
    if global_batch_size % count:
        raise ConfigError(
            f"config key 'train.batch_size'={global_batch_size} is not divisible by the {count} processes"
        )
    per_host = global_batch_size // count
    return slice(index * per_host, (index + 1) * per_host)


def make_global_batch(local_batch: Mapping[str, Any], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local numpy slices -> global arrays split over the mesh's `data` axis on the batch dimension."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            partitioning.data_sharding(mesh, np.ndim(x)), np.asarray(x)
        ),
        dict(local_batch),
    )
