"""The adapters contract: how generated (or trained) LoRA factors are named, shaped and applied.

An *adapters* pytree maps a target name to its factors::

    {"encoder_self.q": {"A": A, "B": B, "scale": s}, "decoder_cross.v": {...}, ...}

* target names are ``<block>.<proj>``; blocks: ``encoder_self``, ``decoder_self``, ``decoder_cross``
  (projections ``q k v o``) and ``encoder_ffn``, ``decoder_ffn`` (``wi`` for ReLU FFNs, ``wi_0``/``wi_1``
  for gated ones, and ``wo``);
* ``A: [batch, layers, d_in, r]`` and ``B: [batch, layers, r, d_out]`` are per-example factors for every
  layer of the stack (a leading batch axis of a *shared* adapter may be dropped: ``[layers, d_in, r]``);
* ``scale`` is a float scalar (PEFT's ``lora_alpha / r``).

A projection with weight ``W: [d_in, d_out]`` computes ``x·W + scale·((x·A)·B)`` with batched einsums:
the rank-r path never materialises ``W + A·B`` per example. `merge_adapter` folds one shared adapter into
the weights for the single-task fast path.

Helpers for the T5 (tagi_jax.models.t5): `adapter_dims` (layers, d_in, d_out of a target), `check_adapters`
(trace-time validation with errors naming the target), `block_factors` (one layer's factors),
`target_param_path` (the kernel a target modifies), `init_adapters` (PEFT-style initial factors).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax.models import quantize
from tagi_jax.models.t5_config import T5Config

ATTENTION_BLOCKS = ("encoder_self", "decoder_self", "decoder_cross")
FFN_BLOCKS = ("encoder_ffn", "decoder_ffn")
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
FFN_PROJECTIONS = ("wi", "wi_0", "wi_1", "wo")

DEFAULT_TARGETS = (
    "encoder_self.q",
    "encoder_self.v",
    "decoder_self.q",
    "decoder_self.v",
    "decoder_cross.q",
    "decoder_cross.v",
)

Adapters = Mapping[str, Mapping[str, Any]]


def split_target(target: str) -> tuple[str, str]:
    """'decoder_cross.v' -> ('decoder_cross', 'v'), with a clear error for anything else."""
    block, _, proj = target.partition(".")
    valid = (block in ATTENTION_BLOCKS and proj in ATTENTION_PROJECTIONS) or (
        block in FFN_BLOCKS and proj in FFN_PROJECTIONS
    )
    if not valid:
        raise ValueError(
            f"adapter_targets: unknown target {target!r}; expected '<block>.<proj>' with block in "
            f"{ATTENTION_BLOCKS} (proj in {ATTENTION_PROJECTIONS}) or {FFN_BLOCKS} (proj in {FFN_PROJECTIONS})"
        )
    return block, proj


def layer_factors(entry: Mapping[str, Any], layer: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(A, B, scale) of one layer: A [batch?, d_in, r], B [batch?, r, d_out]."""
    a, b = entry["A"], entry["B"]
    scale = jnp.asarray(entry.get("scale", 1.0))
    if isinstance(a, (tuple, list)):  # layer-split (see `split_layers`)
        return a[layer], b[layer], scale
    return a[..., layer, :, :], b[..., layer, :, :], scale


def split_layers(adapters: Adapters | None) -> Adapters | None:
    """Per-example factors held as one array per layer: ``A: ([batch, d_in, r],) * layers``.

    Why: inside a decoding loop, slicing layer ``i`` out of ``[batch, layers, d_in, r]`` is a strided copy that
    XLA repeats at every step (measured in bench/mixed_batch.py: about half of the per-example adapter cost).
    Splitting once, before the loop, leaves nothing to copy. `layer_factors` and `check_adapters` accept both
    forms; shared factors are left as they are.
    """
    if adapters is None:
        return None
    out = {}
    for target, entry in adapters.items():
        new = dict(entry)
        for key in ("A", "B"):
            x = entry[key]
            if not isinstance(x, (tuple, list)) and np.ndim(x) == 4:
                new[key] = tuple(x[:, i] for i in range(x.shape[1]))
        out[target] = new
    return out


def _factor_shape(x) -> tuple[int, ...]:
    """Shape of a factor in either form (a layer-split tuple reads as [batch, layers, ...])."""
    if isinstance(x, (tuple, list)):
        first = np.shape(x[0])
        return (first[0], len(x)) + tuple(first[1:])
    return tuple(np.shape(x))


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """scale·((x·A)·B) for x [batch, len, d_in]; A/B per example ([batch, ...]), batch 1, or shared."""
    dtype = x.dtype
    a = a.astype(dtype)
    b = b.astype(dtype)
    if a.ndim == 3 and a.shape[0] == 1 and x.shape[0] != 1:  # one adapter for the whole batch
        a, b = a[0], b[0]
    if a.ndim == 3:
        h = jnp.einsum("bld,bdr->blr", x, a)
        out = jnp.einsum("blr,bro->blo", h, b)
    else:
        h = jnp.einsum("bld,dr->blr", x, a)
        out = jnp.einsum("blr,ro->blo", h, b)
    return out * jnp.asarray(scale).astype(dtype)


def expand_batch(adapters: Adapters | None, repeats: int) -> Adapters | None:
    """Repeat per-example factors along the batch axis (each example -> `repeats` beams).

    Shared factors (no batch axis, or batch 1) broadcast over any batch and are left alone.
    """
    if adapters is None or repeats == 1:
        return adapters
    out = {}
    for target, entry in adapters.items():
        new = dict(entry)
        for key in ("A", "B"):
            if entry[key].ndim == 4 and entry[key].shape[0] != 1:
                new[key] = jnp.repeat(entry[key], repeats, axis=0)
        out[target] = new
    return out


def delta_weight(entry: Mapping[str, Any]) -> jax.Array:
    """scale·A·B for every layer: [batch?, layers, d_in, d_out] (for merging and tests only)."""
    return jnp.asarray(entry.get("scale", 1.0)) * jnp.einsum("...dr,...ro->...do", entry["A"], entry["B"])


# ----------------------------------------------------------------------------------------------------------
# Where targets live in a T5 (tagi_jax.models.t5), their shapes, validation and merging.
# ----------------------------------------------------------------------------------------------------------

# block -> (stack, attention/mlp module name inside a layer of that stack)
_BLOCK_MODULES = {
    "encoder_self": ("encoder", "attention"),
    "decoder_self": ("decoder", "self_attention"),
    "decoder_cross": ("decoder", "encoder_decoder_attention"),
    "encoder_ffn": ("encoder", "mlp"),
    "decoder_ffn": ("decoder", "mlp"),
}
_PROJ_MODULES = {"q": "query", "k": "key", "v": "value", "o": "out", "wi": "wi", "wi_0": "wi_0",
                 "wi_1": "wi_1", "wo": "wo"}


def target_param_path(target: str, layer: int) -> tuple[str, ...]:
    """Path of the kernel an adapter target modifies, e.g. ('encoder', 'layers_0', 'attention', 'query', 'kernel')."""
    block, proj = split_target(target)
    stack, module = _BLOCK_MODULES[block]
    return (stack, f"layers_{layer}", module, _PROJ_MODULES[proj], "kernel")


def adapter_dims(config, target: str) -> tuple[int, int, int]:
    """(layers, d_in, d_out) of `target` in a T5 with `config` (a T5Config); rejects wi on gated FFNs etc."""
    block, proj = split_target(target)
    layers = config.num_encoder_layers if block.startswith("encoder") else config.num_decoder_layers
    if proj in ("q", "k", "v"):
        return layers, config.d_model, config.inner_dim
    if proj == "o":
        return layers, config.inner_dim, config.d_model
    if proj == "wo":
        return layers, config.d_ff, config.d_model
    if config.is_gated != (proj != "wi"):
        expected = f"'{block}.wi_0' / '{block}.wi_1'" if config.is_gated else f"'{block}.wi'"
        raise ValueError(f"adapters: target {target!r} does not exist in a {config.feed_forward_proj!r} T5 "
                         f"FFN; use {expected}")
    return layers, config.d_model, config.d_ff


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """Shape and logical axis names of one adapter target."""
    name: str
    num_layers: int
    d_in: int
    d_out: int
    in_axis: str   # logical name of d_in ('embed', 'joined_kv' or 'mlp')
    out_axis: str  # logical name of d_out


_AXES = {"q": ("embed", "joined_kv"), "k": ("embed", "joined_kv"), "v": ("embed", "joined_kv"),
         "o": ("joined_kv", "embed"), "wi": ("embed", "mlp"), "wi_0": ("embed", "mlp"),
         "wi_1": ("embed", "mlp"), "wo": ("mlp", "embed")}


def target_spec(config: T5Config, target: str) -> TargetSpec:
    """Layers, d_in/d_out (`adapter_dims`: q/k/v d_model->inner, o inner->d_model, wi* d_model->d_ff,
    wo d_ff->d_model) and the logical names of d_in/d_out of `target` in a T5 with `config`."""
    layers, d_in, d_out = adapter_dims(config, target)
    _, proj = split_target(target)
    return TargetSpec(target, layers, d_in, d_out, *_AXES[proj])


def check_adapters(config, adapters: Adapters | None, batch: int | None = None) -> None:
    """Raise a clear error naming the target if `adapters` does not fit a T5 with `config` (trace-time check)."""
    if adapters is None:
        return
    for target, entry in adapters.items():
        layers, d_in, d_out = adapter_dims(config, target)
        if "A" not in entry or "B" not in entry:
            raise ValueError(f"adapters[{target!r}]: needs 'A' and 'B' (and optionally 'scale'), got {sorted(entry)}")
        a, b = _factor_shape(entry["A"]), _factor_shape(entry["B"])
        ok = (len(a) in (3, 4) and len(b) == len(a) and a[-3:-1] == (layers, d_in) and b[-3] == layers
              and b[-1] == d_out and a[-1] == b[-2] and a[:-3] == b[:-3])
        if not ok:
            raise ValueError(f"adapters[{target!r}]: A {a} / B {b} do not match A [batch?, {layers}, {d_in}, r], "
                             f"B [batch?, {layers}, r, {d_out}]")
        if len(a) == 4 and batch is not None and a[0] not in (1, batch):
            raise ValueError(f"adapters[{target!r}]: batch axis {a[0]} does not match the input batch {batch}")
        if np.ndim(entry.get("scale", 1.0)) != 0:
            raise ValueError(f"adapters[{target!r}]['scale'] must be a scalar, got shape {np.shape(entry['scale'])}")


def block_factors(adapters: Adapters | None, block: str, layer: int) -> dict[str, tuple]:
    """{proj: (A, B, scale)} of one layer of one block (what the T5 layers consume)."""
    if not adapters:
        return {}
    out = {}
    for target, entry in adapters.items():
        b, proj = split_target(target)
        if b == block:
            out[proj] = layer_factors(entry, layer)
    return out


def merge_adapter(params: Any, adapters: Adapters) -> Any:
    """W + scale·A·B for one *shared* adapter (A/B without a batch axis, or batch 1): the single-task fast path.

    Returns a new parameter tree (the input is not modified); the sum is computed in float32 and cast back to
    the kernel's dtype (an int8 kernel with its `kernel_scale` becomes a float32 kernel).
    """
    import flax  # local: keep this module importable without flax in light-weight tools

    merged = flax.core.unfreeze(params)
    for target, entry in adapters.items():
        a, b = jnp.asarray(entry["A"]), jnp.asarray(entry["B"])
        if a.ndim == 4:
            if a.shape[0] != 1:
                raise ValueError(f"merge_adapter: adapters[{target!r}] has a batch of {a.shape[0]} adapters; "
                                 "only one shared adapter (no batch axis, or batch 1) can be merged")
            a, b = a[0], b[0]
        delta = delta_weight({"A": a.astype(jnp.float32), "B": b.astype(jnp.float32),
                              "scale": entry.get("scale", 1.0)})
        for layer in range(a.shape[0]):
            path = target_param_path(target, layer)
            node = merged
            try:
                for key in path[:-1]:
                    node = node[key]
                kernel = node[path[-1]]
            except KeyError as e:
                raise ValueError(f"merge_adapter: adapters[{target!r}] layer {layer}: no parameter "
                                 f"{'/'.join(path)}") from e
            if kernel.shape != delta.shape[1:]:
                raise ValueError(f"merge_adapter: adapters[{target!r}]: A·B has shape {delta.shape[1:]} but "
                                 f"{'/'.join(path)} has {kernel.shape}")
            if quantize.SCALE in node:  # an int8 kernel: the merged one is float32
                kernel = quantize.dequantize_kernel(kernel, node.pop(quantize.SCALE))
            node[path[-1]] = (jnp.asarray(kernel, jnp.float32) + delta[layer]).astype(kernel.dtype)
    return merged


def init_adapters(rng: jax.Array, config, targets: Sequence[str], rank: int, *, alpha: float | None = None,
                  batch: int | None = None, b_stddev: float = 0.0, dtype=jnp.float32) -> dict:
    """Fresh LoRA factors as PEFT initialises them: A ~ kaiming-uniform(a=sqrt 5), i.e. U(±1/sqrt(d_in)),
    B = 0 (or N(0, b_stddev) for tests); scale = alpha / rank (alpha defaults to rank)."""
    out = {}
    alpha = float(rank if alpha is None else alpha)
    lead = () if batch is None else (batch,)
    for target, key in zip(targets, jax.random.split(rng, len(targets))):
        layers, d_in, d_out = adapter_dims(config, target)
        ka, kb = jax.random.split(key)
        bound = 1.0 / np.sqrt(d_in)
        a = jax.random.uniform(ka, lead + (layers, d_in, rank), dtype, -bound, bound)
        b = b_stddev * jax.random.normal(kb, lead + (layers, rank, d_out), dtype)
        out[target] = {"A": a, "B": b, "scale": jnp.asarray(alpha / rank, jnp.float32)}
    return out
