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
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

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
    return a[..., layer, :, :], b[..., layer, :, :], scale


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """scale·((x·A)·B) for x [batch, len, d_in]; A/B per example ([batch, ...]) or shared."""
    dtype = x.dtype
    a = a.astype(dtype)
    b = b.astype(dtype)
    if a.ndim == 3:
        h = jnp.einsum("bld,bdr->blr", x, a)
        out = jnp.einsum("blr,bro->blo", h, b)
    else:
        h = jnp.einsum("bld,dr->blr", x, a)
        out = jnp.einsum("blr,ro->blo", h, b)
    return out * scale.astype(dtype)


def expand_batch(adapters: Adapters | None, repeats: int) -> Adapters | None:
    """Repeat per-example factors along the batch axis (each example -> `repeats` beams)."""
    if adapters is None or repeats == 1:
        return adapters
    out = {}
    for target, entry in adapters.items():
        new = dict(entry)
        for key in ("A", "B"):
            if entry[key].ndim == 4:
                new[key] = jnp.repeat(entry[key], repeats, axis=0)
        out[target] = new
    return out


def delta_weight(entry: Mapping[str, Any]) -> jax.Array:
    """scale·A·B for every layer: [batch?, layers, d_in, d_out] (for merging and tests only)."""
    return jnp.asarray(entry.get("scale", 1.0)) * jnp.einsum("...dr,...ro->...do", entry["A"], entry["B"])
