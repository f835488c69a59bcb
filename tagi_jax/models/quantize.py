"""Weight-only int8 storage of a frozen backbone (`model.backbone_weights = "int8"`): symmetric per-output-channel
absmax quantisation of the T5 matmul kernels, the int8 matmul `Dense` runs, and the parameter-tree functions
that turn a float tree into an int8 one (pure jnp: `jax.eval_shape` and boxed trees go through them).

A quantised `Dense` holds `kernel` int8 [d_in, d_out] and `kernel_scale` float32 [d_out] beside it, with
`kernel ≈ kernel_int8 · kernel_scale` column by column: scale_j = max_i |W_ij| / 127 and
q_ij = clip(round(W_ij / scale_j), -127, 127) (round half to even; a zero column has scale 0 and q 0). Because
the scale is per output channel, x·(q·s) = (x·q)·s: the matmul runs on the int8 values cast to the compute dtype
(exact: |q| <= 127 fits bfloat16's mantissa), accumulates in float32 and multiplies the output by the scales.
The error of one weight is at most scale_j / 2 = absmax_j / 254.

Only the backbone's kernels are eligible: `Dense` kernels inside a "t5" subtree (the hypernetwork and the
separate instruction encoder are trained by the TAGI stages); the token embedding and RMS-norm scales stay float
(2-3% of the parameters). Which of them a stage quantises (those it freezes, never the encoder-fusion blocks it
trains) is `tagi_jax.run.stages`' business (`int8_selector`).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

BACKBONE_WEIGHTS = ("float", "int8")  # the values of `model.backbone_weights`
KERNEL, SCALE = "kernel", "kernel_scale"
INT8_MAX = 127

Path = tuple[str, ...]


# --------------------------------------------------------------------------------------------------------
# The per-channel math.
# --------------------------------------------------------------------------------------------------------


def quantize_kernel(w) -> tuple[jax.Array, jax.Array]:
    """(int8 values, float32 scales [d_out]) of a kernel [..., d_out], one scale per output channel."""
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=tuple(range(w32.ndim - 1))) / INT8_MAX
    q = jnp.round(w32 / jnp.where(scale > 0, scale, 1.0))
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def dequantize_kernel(q, scale) -> jax.Array:
    """The float32 kernel int8 values and their per-output-channel scales stand for."""
    return jnp.asarray(q, jnp.float32) * jnp.asarray(scale, jnp.float32)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """x [..., d_in] · dequantised kernel [d_in, d_out], as (x·q)·scale: the int8 values cast to the compute
    dtype, float32 accumulation, the scales applied to the output, the result in the compute dtype."""
    y = jnp.einsum("...d,df->...f", jnp.asarray(x, dtype), jnp.asarray(q, dtype), preferred_element_type=jnp.float32)
    return (y * jnp.asarray(scale, jnp.float32)).astype(dtype)


# --------------------------------------------------------------------------------------------------------
# Which kernels are eligible.
# --------------------------------------------------------------------------------------------------------


def is_backbone_kernel(path: Sequence[str]) -> bool:
    """Whether a parameter path is a T5 backbone's Dense kernel (a "kernel" inside a "t5" subtree)."""
    path = tuple(map(str, path))
    return len(path) >= 2 and path[-1] == KERNEL and "t5" in path[:-1]


def matching(patterns: Sequence[str]) -> Callable[[Path], bool]:
    """Paths whose "a/b/kernel" string one of `patterns` matches (re.search, as the optimizer's `frozen`)."""
    compiled = [re.compile(p) for p in patterns]
    return lambda path: any(rx.search("/".join(map(str, path))) for rx in compiled)


# --------------------------------------------------------------------------------------------------------
# Parameter trees.
# --------------------------------------------------------------------------------------------------------


def _kernel_nodes(tree, path: Path = ()):
    """(path of the dict holding it, dict) for every dict of `tree` with a "kernel" entry."""
    if isinstance(tree, Mapping):
        if KERNEL in tree:
            yield path, tree
        for k, v in tree.items():
            if isinstance(v, Mapping):
                yield from _kernel_nodes(v, path + (str(k),))


def _map_nodes(tree, fn, path: Path = ()):
    """`tree` with every dict holding a "kernel" replaced by fn(path, dict) (fn returns the dict itself to keep it)."""
    if not isinstance(tree, Mapping):
        return tree
    node = {k: _map_nodes(v, fn, path + (str(k),)) if isinstance(v, Mapping) else v for k, v in tree.items()}
    return fn(path, node) if KERNEL in node else node


def _quantize_entry(kernel):
    """(int8 kernel, scale) of a raw or `nn.LogicallyPartitioned` kernel; boxes keep the kernel's names and give
    the scale the output axis's."""
    if isinstance(kernel, nn.LogicallyPartitioned):
        q, scale = quantize_kernel(kernel.value)
        scale_box = nn.LogicallyPartitioned(scale, names=(kernel.names[-1],), mesh=kernel.mesh, rules=kernel.rules)
        return kernel.replace_boxed(q), scale_box
    return quantize_kernel(kernel)


def _quantized_node(node: Mapping) -> dict:
    q, scale = _quantize_entry(node[KERNEL])
    return {**node, KERNEL: q, SCALE: scale}


def _dequantized_node(node: Mapping) -> dict:
    out = {k: v for k, v in node.items() if k != SCALE}
    out[KERNEL] = dequantize_kernel(node[KERNEL], node[SCALE])
    return out


def is_kernel(path: Sequence[str]) -> bool:
    """Every Dense kernel (of a plain T5 tree, say)."""
    return tuple(path)[-1:] == (KERNEL,)


def quantize_params(params, select: Callable[[Path], bool] = is_kernel):
    """`params` with every selected ("a", ..., "kernel") float kernel stored as int8 plus a `kernel_scale` beside
    it (kernels already int8 are kept). Pure jnp on the leaves: works on placed arrays, under `jax.eval_shape`/`jit`, and on trees of
    `nn.LogicallyPartitioned` boxes (init functions)."""

    return _map_nodes(params, lambda path, node: node if SCALE in node or not select(path + (KERNEL,))
                      else _quantized_node(node))


def dequantize_params(params):
    """`params` with every int8 kernel back in float32 and its scale removed (the tree a float model reads)."""

    return _map_nodes(params, lambda path, node: _dequantized_node(node) if SCALE in node else node)


def quantized_kernel_paths(params) -> set[Path]:
    """The paths ("a", ..., "kernel") of the int8 kernels of a tree (arrays or ShapeDtypeStructs)."""
    return {path + (KERNEL,) for path, node in _kernel_nodes(params) if SCALE in node}


def float_abstract(abstract):
    """The float tree an int8 abstract tree is quantised from: each int8 kernel a float32 ShapeDtypeStruct (same
    sharding) and no scale."""

    def fn(path, node):
        if SCALE not in node:
            return node
        k = node[KERNEL]
        out = {key: v for key, v in node.items() if key != SCALE}
        out[KERNEL] = jax.ShapeDtypeStruct(k.shape, jnp.float32, sharding=getattr(k, "sharding", None))
        return out

    return _map_nodes(abstract, fn)


def match_quantization(params, abstract):
    """`params` quantised where `abstract` holds int8 kernels and `params` float ones, and dequantised where
    `abstract` is float and `params` int8 (a float checkpoint starting an int8 stage, and back)."""
    wanted = quantized_kernel_paths(abstract)

    def fn(path, node):
        want, have = path + (KERNEL,) in wanted, SCALE in node
        if want and not have:
            return _quantized_node(node)
        if have and not want:
            return _dequantized_node(node)
        return node

    return _map_nodes(params, fn)


def param_bytes(tree) -> int:
    """Bytes of a tree's leaves (arrays or ShapeDtypeStructs; boxes are unboxed)."""
    leaves = jax.tree.leaves(nn.meta.unbox(tree))
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in leaves))


def _replicated(sharding):
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return sharding  # a single device's (or None)


def as_stored(wanted: Mapping[Path, Any], saved: set, prefix: Path = ()) -> dict[Path, Any]:
    """The flat abstract tree `wanted` in the storage a checkpoint (its parameter paths `saved`) has at `prefix`:
    a kernel wanted as int8 that was saved in float32 is read as float32, and one saved as int8 (with its scale)
    that is wanted in float is read as int8 and its scale; `match_quantization` then converts the result."""
    out = {}
    for path, a in wanted.items():
        if path[-1] == SCALE and prefix + path not in saved:
            continue  # the checkpoint holds this kernel in float32
        node = path[:-1]
        if path[-1] == KERNEL:
            saved_int8 = prefix + node + (SCALE,) in saved
            sharding = getattr(a, "sharding", None)
            if saved_int8 and node + (SCALE,) not in wanted:
                out[path] = jax.ShapeDtypeStruct(a.shape, jnp.int8, sharding=sharding)
                out[node + (SCALE,)] = jax.ShapeDtypeStruct(a.shape[-1:], jnp.float32, sharding=_replicated(sharding))
                continue
            if not saved_int8 and a.dtype == jnp.int8:
                a = jax.ShapeDtypeStruct(a.shape, jnp.float32, sharding=sharding)
        out[path] = a
    return out
