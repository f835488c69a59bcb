"""The device mesh and the logical axis rules, and nothing else builds shardings.

Every parameter is created with logical axis names (`nn.with_logical_partitioning`) and every large
activation is constrained with `nn.with_logical_constraint`; this module maps those names onto a
(`data`, `model`) mesh. T5X conventions: the batch is split over `data`; vocabulary, MLP, heads and
joined key/value dimensions over `model`; with `fsdp=True` the `embed` dimension of parameters is
also split over `data` (T5X's 2D parameter partitioning).
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# Logical name -> mesh axis (None = replicated). Shared by parameters and activations.
_BASE_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DATA_AXIS),
    ("vocab", MODEL_AXIS),
    ("mlp", MODEL_AXIS),
    ("heads", MODEL_AXIS),
    ("joined_kv", MODEL_AXIS),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("layers", None),
    ("lora_rank", None),
    ("tasks", None),  # rows of the teacher-LoRA table (a task count rarely divides a mesh axis)
    ("teacher_factor", DATA_AXIS),  # the teacher table's d_in / d_out: the table is split, not replicated
    ("hyper_hidden", MODEL_AXIS),
    ("adapter_embed", None),
    ("head_factor", None),  # the generator heads' factorisation / bottleneck width
)


def logical_axis_rules(fsdp: bool = False) -> tuple[tuple[str, Any], ...]:
    """The rules for `nn.logical_axis_rules`; `fsdp` also splits parameters' `embed` over `data`."""
    embed = ("embed", DATA_AXIS) if fsdp else ("embed", None)
    return _BASE_RULES + (embed,)


def create_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all); -1 means 'all remaining devices'."""
    devices = list(jax.devices() if devices is None else devices)
    data, model = mesh_shape(data, model, len(devices))
    grid = np.asarray(devices).reshape(data, model)
    if devices[0].platform == "tpu":  # an order that follows the chips' interconnect (ICI) rings
        from jax.experimental import mesh_utils
        try:
            grid = mesh_utils.create_device_mesh((data, model), devices)
        except (ValueError, NotImplementedError, AssertionError):
            pass  # a shape mesh_utils cannot lay out physically: the plain order still runs
    return Mesh(grid, MESH_AXES)


def abstract_mesh(data: int, model: int, num_devices: int) -> jax.sharding.AbstractMesh:
    """`create_mesh`'s mesh for `num_devices` devices that need not exist (per-device sizes of sharded abstract
    trees, `NamedSharding.shard_shape`)."""
    return jax.sharding.AbstractMesh(mesh_shape(data, model, num_devices), MESH_AXES)


def mesh_shape(data: int, model: int, n: int) -> tuple[int, int]:
    """(data, model) sizes over `n` devices; -1 means 'all remaining devices'."""
    if data == -1 and model == -1:
        raise ValueError("mesh: at most one of mesh.data / mesh.model may be -1")
    if data == -1:
        data = n // model if model > 0 and n % model == 0 else -1
    if model == -1:
        model = n // data if data > 0 and n % data == 0 else -1
    if data <= 0 or model <= 0 or data * model != n:
        raise ValueError(
            f"mesh: mesh.data={data} x mesh.model={model} does not match the {n} available devices"
        )
    return data, model


def mesh_context(mesh: Mesh, rules) -> contextlib.AbstractContextManager:
    """The mesh and logical axis rules that `nn.with_logical_constraint` inside models resolves against
    (`jax.set_mesh` is the current spelling of the deprecated `with mesh:`)."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(rules))
    return stack


def logical_to_mesh_specs(logical_specs: Any, rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of mesh PartitionSpecs."""
    return nn.logical_to_mesh(logical_specs, rules)


def mesh_shardings(mesh: Mesh, mesh_specs: Any) -> Any:
    """Tree of mesh PartitionSpecs -> tree of NamedShardings on `mesh`."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def logical_shardings(mesh: Mesh, logical_specs: Any, rules) -> Any:
    """Tree of logical PartitionSpecs -> tree of NamedShardings."""
    return mesh_shardings(mesh, logical_to_mesh_specs(logical_specs, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) dimension split over `data`, the rest replicated (scalars replicated)."""
    if ndim == 0:
        return replicated(mesh)
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS, *([None] * (ndim - 1))))


def sharded_random_bits(rng: jax.Array, shape: Sequence[int], logical_axes: Sequence[str | None]) -> jax.Array:
    """uint32 random bits of `shape`, for an activation whose axes have `logical_axes`.

    A threefry key (jax's default), or no mesh in context: `jax.random.bits` (partitionable: each device computes
    its own block, the same bits on any mesh). An "rbg"/"unsafe_rbg" key: XLA's RngBitGenerator is not
    partitioned, so under jit every device would draw the whole global shape and keep its slice (3 GiB a layer for
    T5-Base's attention dropout at batch 64); here each shard draws only its block, from
    `fold_in(rng, shard index)`, inside `shard_map` (so these bits depend on the mesh, as rbg's do anyway)."""
    mesh = jax.sharding.get_abstract_mesh()
    if str(jax.random.key_impl(rng)) == "threefry2x32" or mesh.empty:
        return jax.random.bits(rng, tuple(shape))
    spec = nn.logical_to_mesh_axes(tuple(logical_axes))
    axes, local_shape = [], []
    for size, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
        parts = math.prod(mesh.shape[a] for a in names)
        if parts > 1 and size % parts == 0:
            axes.append(names)
            local_shape.append(size // parts)
        else:  # an axis the mesh does not split (or cannot split evenly) stays whole on every shard
            axes.append(())
            local_shape.append(size)
    if not any(axes):
        return jax.random.bits(rng, tuple(shape))

    def local_bits(key):
        index = 0
        for name in (a for names in axes for a in names):
            index = index * mesh.shape[name] + jax.lax.axis_index(name)
        return jax.random.bits(jax.random.fold_in(key, index), tuple(local_shape))
    out_spec = PartitionSpec(*(names or None for names in axes))  # () = whole on every shard
    return jax.shard_map(local_bits, in_specs=PartitionSpec(), out_specs=out_spec, check_vma=False)(rng)


def batch_shardings(mesh: Mesh, batch: Any) -> Any:
    """Shardings for a batch pytree: every array split over `data` on its first axis."""
    return jax.tree.map(lambda x: data_sharding(mesh, np.ndim(x)), batch)


def params_logical_specs(boxed_tree: Any) -> Any:
    """Logical PartitionSpecs of a tree of (possibly abstract) `nn.LogicallyPartitioned` leaves.

    Leaves without names get an empty spec (replicated); `check_all_named` finds them.
    """
    return nn.get_partition_spec(boxed_tree)


def unnamed_parameters(boxed_tree: Any) -> list[str]:
    """Paths of parameters created without logical axis names (should be empty)."""
    missing = []

    def visit(path, leaf):
        if not isinstance(leaf, nn.LogicallyPartitioned):
            missing.append(jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(
        visit, boxed_tree, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
    )
    return missing


def sharded_init(
    init_fn: Callable[..., Any],
    mesh: Mesh,
    rules,
    *args,
) -> tuple[Any, Any, Any]:
    """Initialise directly into sharded arrays, never materialising a full copy on one device.

    `init_fn(*args)` returns a tree of `nn.LogicallyPartitioned` boxes (a Flax `init`). We trace it
    abstractly (`jax.eval_shape`), turn its logical names into shardings, then run it under `jax.jit`
    with those `out_shardings`. Returns (unboxed params, mesh PartitionSpecs, logical PartitionSpecs).
    """
    abstract = jax.eval_shape(init_fn, *args)
    logical = params_logical_specs(abstract)
    mesh_specs = logical_to_mesh_specs(logical, rules)
    shardings = mesh_shardings(mesh, mesh_specs)
    with mesh_context(mesh, rules):
        boxed = jax.jit(init_fn, out_shardings=shardings)(*args)
    return nn.meta.unbox(boxed), mesh_specs, logical


def abstract_with_shardings(init_fn: Callable[..., Any], mesh: Mesh, rules, *args) -> tuple[Any, Any]:
    """(abstract unboxed params as ShapeDtypeStructs with shardings, mesh specs) — for restoring."""
    abstract = jax.eval_shape(init_fn, *args)
    mesh_specs = logical_to_mesh_specs(params_logical_specs(abstract), rules)
    shardings = mesh_shardings(mesh, mesh_specs)
    unboxed = nn.meta.unbox(abstract)
    structs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings
    )
    return structs, mesh_specs


def model_info_lines(params: Any, mesh_specs: Any, prefix: str = "params") -> list[str]:
    """One line per parameter: path, size, shape, dtype and partition spec (T5X's model-info)."""
    flat_params = jax.tree_util.tree_flatten_with_path(params)[0]
    flat_specs = jax.tree_util.tree_flatten(
        mesh_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )[0]
    if len(flat_params) != len(flat_specs):
        raise ValueError("model info: parameter tree and partition-spec tree differ")
    lines = []
    total = 0
    by_part: dict[str, int] = {}
    for (path, leaf), spec in zip(flat_params, flat_specs):
        keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
        name = prefix + "/" + "/".join(keys)
        size = math.prod(leaf.shape)
        total += size
        part = "/".join(keys[:2] if keys[0] in ("student", "teacher") and len(keys) > 2 else keys[:1])
        by_part[part] = by_part.get(part, 0) + size
        lines.append(
            f"Variable {name:<80} size {size:<12} shape {tuple(leaf.shape)!s:<24} "
            f"dtype {np.dtype(leaf.dtype).name:<9} partition spec {tuple(spec)}"
        )
    lines += [f"Parameters in {part}: {n}" for part, n in by_part.items()]
    lines.append(f"Total number of parameters: {total}")
    return lines


def write_model_info(workdir: str, params: Any, mesh_specs: Any, filename: str = "model-info.txt") -> str:
    """Write the model-info file into `workdir` (process 0 only) and return its path."""
    path = os.path.join(workdir, filename)
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(path, "w") as f:
            f.write("\n".join(model_info_lines(params, mesh_specs)) + "\n")
    return path
