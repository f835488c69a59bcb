"""T5's building blocks: RMS layer norm, embedding, Dense with optional LoRA factors, attention (with the T5X
decode cache), the FFN and relative position biases -- numerically those of Hugging Face / T5X T5.

Parameters are created with logical axis names, activations are constrained (`nn.with_logical_constraint`).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax import partitioning
from tagi_jax.models import lora, quantize
from tagi_jax.models.t5_config import T5Config

Array = jax.Array
# Per-projection LoRA factors of one layer: {"q": (A, B, scale), ...}.
LayerFactors = Mapping[str, tuple]

_NEG_INF = -1.0e10  # T5X's attention-mask bias: finite, so fully masked rows stay finite.


def constrain(x: Array, names: tuple[str, ...]) -> Array:
    return nn.with_logical_constraint(x, names)


# --------------------------------------------------------------------------------------------------------
# Relative position buckets (static: computed in numpy at trace time).
# --------------------------------------------------------------------------------------------------------


def relative_position_bucket(relative_position: np.ndarray, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> np.ndarray:
    """Mesh-TF / transformers' bucketing of ``memory_position - query_position`` (float32 logs, as torch)."""
    rp = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rp > 0).astype(np.int64) * num_buckets
        rp = np.abs(rp)
    else:
        rp = -np.minimum(rp, 0)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    safe = np.maximum(rp, 1).astype(np.float32)
    scaled = (np.log(safe / np.float32(max_exact)) / np.float32(math.log(max_distance / max_exact))
              * np.float32(num_buckets - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return buckets + np.where(is_small, rp, large)


@functools.lru_cache(maxsize=64)
def _bucket_matrix(qlen: int, klen: int, bidirectional: bool, num_buckets: int, max_distance: int) -> np.ndarray:
    context = np.arange(qlen)[:, None]
    memory = np.arange(klen)[None, :]
    return relative_position_bucket(memory - context, bidirectional, num_buckets, max_distance).astype(np.int32)


class RelativePositionBiases(nn.Module):
    """One [heads, buckets] table per stack; returns the attention bias [1, heads, qlen, klen]."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, qlen: int, klen: int, query_position: Optional[Array] = None) -> Array:
        cfg = self.config
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                                         ("heads", "relpos_buckets")),
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            cfg.jnp_param_dtype,
        )
        table = jnp.asarray(table, cfg.jnp_dtype)
        if query_position is None:
            buckets = _bucket_matrix(qlen, klen, self.bidirectional, cfg.relative_attention_num_buckets,
                                     cfg.relative_attention_max_distance)
            return table[:, buckets][None]  # [1, h, q, k]
        # Decode step: the row of the (dynamic) current position in the static [klen, klen] bucket matrix.
        buckets = jnp.asarray(_bucket_matrix(klen, klen, self.bidirectional, cfg.relative_attention_num_buckets,
                                             cfg.relative_attention_max_distance))
        row = jax.lax.dynamic_slice_in_dim(buckets, query_position, 1, axis=0)  # [1, k]
        return table[:, row][None]  # [1, h, 1, k]


# --------------------------------------------------------------------------------------------------------
# Building blocks.
# --------------------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """T5's RMS norm: x / sqrt(mean(x²) + eps) · scale, accumulated in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                           (x.shape[-1],), cfg.jnp_param_dtype)
        x32 = jnp.asarray(x, jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = jnp.asarray(x32 * jax.lax.rsqrt(var + cfg.layer_norm_epsilon), cfg.jnp_dtype)
        return y * jnp.asarray(scale, cfg.jnp_dtype)


class Embed(nn.Module):
    """Token embedding [vocab, d_model]; `attend` is the tied output projection."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.embedding = self.param(
            "embedding", nn.with_logical_partitioning(nn.initializers.normal(stddev=1.0), ("vocab", "embed")),
            (cfg.vocab_size, cfg.d_model), cfg.jnp_param_dtype)

    def __call__(self, tokens: Array) -> Array:
        return jnp.take(jnp.asarray(self.embedding, self.config.jnp_dtype), tokens.astype(jnp.int32), axis=0)

    def attend(self, query: Array) -> Array:
        return jnp.einsum("...d,vd->...v", query, jnp.asarray(self.embedding, self.config.jnp_dtype))


ATTENTION_WEIGHT_AXES = ("batch", "heads", "length", None)  # [b, h, q, k] attention weights


class Dropout(nn.Module):
    """`nn.Dropout` (same name, so the same rng: `Dropout_<i>` under its parent) whose bits come from
    `partitioning.sharded_random_bits` for an activation with `logical_axes`: with a threefry key exactly
    `nn.Dropout`'s mask; with an rbg key each shard draws only its block instead of the global shape."""

    rate: float
    logical_axes: tuple

    @nn.compact
    def __call__(self, x: Array, deterministic: bool) -> Array:
        if self.rate == 0.0 or deterministic:
            return x
        if self.rate == 1.0:
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        bits = partitioning.sharded_random_bits(self.make_rng("dropout"), x.shape, self.logical_axes)
        # jax.random.uniform's float from 32 bits (23 mantissa bits in [1, 2), minus 1): bernoulli(p) = u < p.
        uniform = jax.lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
        return jax.lax.select(uniform < keep_prob, x / keep_prob, jnp.zeros_like(x))


class Dense(nn.Module):
    """x·W [+ scale·((x·A)·B)], W: [d_in, features] with logical names `kernel_axes`; a tree holding a
    `kernel_scale` beside the kernel stores W as int8 with per-output-channel scales (`quantize.int8_matmul`)."""

    config: T5Config
    features: int
    kernel_axes: tuple[str, str]
    kernel_init: Any = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

    @nn.compact
    def __call__(self, x: Array, factors: Optional[tuple] = None) -> Array:
        cfg = self.config
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
                            (x.shape[-1], self.features), cfg.jnp_param_dtype)
        x = jnp.asarray(x, cfg.jnp_dtype)
        if self.has_variable("params", quantize.SCALE):  # an int8 kernel (a frozen backbone, models/quantize.py)
            y = quantize.int8_matmul(x, kernel, self.get_variable("params", quantize.SCALE), cfg.jnp_dtype)
        else:
            y = jnp.einsum("...d,df->...f", x, jnp.asarray(kernel, cfg.jnp_dtype))
        if factors is not None:
            a, b, scale = factors
            y = y + lora.lora_delta(x, a, b, scale)
        return y


class MultiHeadAttention(nn.Module):
    """T5 attention (no 1/sqrt(d_kv) scaling), optional relative bias, optional T5X decode cache.

    Keys/values may also come precomputed (cross-attention): `kv_parts` is a sequence of ``(k, v, mask)``
    with k, v ``[b or 1, heads, n, d_kv]`` (heads-major, the layout the attention products read; batch 1 is
    shared by every row) and mask ``[b or 1, 1, 1, n]``; they are attended to first, then the projection of
    `inputs_kv` (omitted when `inputs_kv` is None). Because the projections are row-wise, attending to parts
    computes exactly what attending to their concatenation does (one softmax over all keys).
    `project_kv_only=True` returns ``(k, v)`` of `inputs_kv` in that layout instead (what a part is made of).
    """

    config: T5Config
    zero_output: bool = False  # output projection initialised to zero (a new sub-block that starts as a no-op)

    @nn.compact
    def __call__(self, inputs_q: Optional[Array], inputs_kv: Optional[Array], mask: Optional[Array],
                 bias: Optional[Array], *, factors: LayerFactors, deterministic: bool, decode: bool = False,
                 cache_length: Optional[int] = None, kv_parts: tuple = (),
                 project_kv_only: bool = False):
        cfg = self.config
        h, dkv, inner = cfg.num_heads, cfg.d_kv, cfg.inner_dim
        # T5 folds 1/sqrt(d_kv) into the query initialisation instead of the attention logits.
        query_init = nn.initializers.variance_scaling(1.0 / dkv, "fan_in", "normal")
        dense = functools.partial(Dense, cfg, inner, ("embed", "joined_kv"))
        split = lambda x: constrain(x.reshape(x.shape[:2] + (h, dkv)), ("batch", "length", "heads", "kv"))
        if project_kv_only:
            k = split(dense(name="key")(inputs_kv, factors.get("k")))
            v = split(dense(name="value")(inputs_kv, factors.get("v")))
            heads_major = lambda x: constrain(jnp.swapaxes(x, 1, 2), ("batch", "heads", "length", "kv"))
            return heads_major(k), heads_major(v)
        q = split(dense(kernel_init=query_init, name="query")(inputs_q, factors.get("q")))
        if kv_parts:
            parts = list(kv_parts)
            if inputs_kv is not None:
                k = split(dense(name="key")(inputs_kv, factors.get("k")))
                v = split(dense(name="value")(inputs_kv, factors.get("v")))
                parts.append((jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), mask))
            out = self._attend_parts(q, parts, bias, deterministic)
        else:
            k = split(dense(name="key")(inputs_kv, factors.get("k")))
            v = split(dense(name="value")(inputs_kv, factors.get("v")))
            if decode:
                k, v, mask = self._update_cache(q, k, v, mask, cache_length)

            out = self._attend(q, k, v, mask, bias, deterministic)
        out = constrain(out, ("batch", "length", "heads", "kv")).reshape(out.shape[:2] + (inner,))
        out_init = {"kernel_init": nn.initializers.zeros_init()} if self.zero_output else {}
        return Dense(cfg, cfg.d_model, ("joined_kv", "embed"), name="out", **out_init)(out, factors.get("o"))

    def _attend(self, q, k, v, mask, bias, deterministic):
        """softmax(q·kᵀ + bias) v over [b, length, heads, d_kv] inputs, as `config.attention` says: our einsums
        (with dropout on the weights) or `jax.nn.dot_product_attention` ("xla", or cuDNN's fused kernel on GPU:
        the same function, without dropout, which `tagi_jax.run.defaults.validate` enforces)."""
        cfg = self.config
        if cfg.attention != "einsum":
            bias = None if bias is None else jnp.asarray(bias, q.dtype)
            return jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), bias=bias, mask=mask,
                                                scale=1.0, implementation=cfg.attention)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + jnp.asarray(bias, jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, _NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.jnp_dtype)
        weights = Dropout(cfg.dropout_rate, ATTENTION_WEIGHT_AXES)(weights, deterministic=deterministic)
        return jnp.einsum("bhqk,bkhd->bqhd", weights, v)

    def _attend_parts(self, q, parts, bias, deterministic):
        """One softmax over the keys of every part (shared parts broadcast over the batch); [b, q, h, d]."""
        cfg = self.config
        batch = q.shape[0]
        shared = lambda x: x.shape[0] == 1 and batch != 1
        logits, masks = [], []
        for k, v, m in parts:
            k = jnp.asarray(k, cfg.jnp_dtype)
            if shared(k):
                logits.append(jnp.einsum("bqhd,hkd->bhqk", q, k[0], preferred_element_type=jnp.float32))
            else:
                logits.append(jnp.einsum("bqhd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32))
            n = k.shape[2]
            m = jnp.ones((batch, 1, 1, n), jnp.bool_) if m is None else m
            masks.append(jnp.broadcast_to(m, (batch, 1, 1, n)))
        logits = jnp.concatenate(logits, axis=-1)
        if bias is not None:
            logits = logits + jnp.asarray(bias, jnp.float32)
        logits = jnp.where(jnp.concatenate(masks, axis=-1), logits, _NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.jnp_dtype)
        weights = Dropout(cfg.dropout_rate, ATTENTION_WEIGHT_AXES)(weights, deterministic=deterministic)
        out, start = None, 0
        for k, v, _ in parts:
            n = k.shape[2]
            w = weights[..., start:start + n]
            v = jnp.asarray(v, cfg.jnp_dtype)
            part = (jnp.einsum("bhqk,hkd->bqhd", w, v[0]) if shared(v)
                    else jnp.einsum("bhqk,bhkd->bqhd", w, v))
            out = part if out is None else out + part
            start += n
        return out

    def _update_cache(self, q, k, v, mask, cache_length):
        """T5X decode cache: allocate on the first (full-length) call, then write one position per call."""
        is_initialized = self.has_variable("cache", "cached_key")
        batch, length = k.shape[0], (cache_length or k.shape[1])
        shape = (batch, length) + k.shape[2:]
        cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if not is_initialized:
            return k, v, mask
        batch, length = cached_key.value.shape[:2]
        if q.shape[:2] != (batch, 1):
            raise ValueError(f"decode step: expected decoder_input_tokens of shape ({batch}, 1) with the cache "
                             f"initialised for batch {batch}, got {q.shape[:2]}")
        cur = cache_index.value
        k = jax.lax.dynamic_update_slice_in_dim(cached_key.value, k.astype(cached_key.value.dtype), cur, axis=1)
        v = jax.lax.dynamic_update_slice_in_dim(cached_value.value, v.astype(cached_value.value.dtype), cur, axis=1)
        cached_key.value, cached_value.value = k, v
        cache_index.value = cur + 1
        step_mask = (jnp.arange(length) <= cur)[None, None, None, :]
        mask = step_mask if mask is None else jnp.logical_and(mask, step_mask)
        return k, v, mask


class MlpBlock(nn.Module):
    """ReLU FFN (`wi`, `wo`) or gated GELU (`wi_0`, `wi_1`, `wo`; tanh GELU = transformers' gelu_new)."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, *, factors: LayerFactors, deterministic: bool) -> Array:
        cfg = self.config
        dense_in = functools.partial(Dense, cfg, cfg.d_ff, ("embed", "mlp"))
        if cfg.is_gated:
            hidden = (jax.nn.gelu(dense_in(name="wi_0")(x, factors.get("wi_0")), approximate=True)
                      * dense_in(name="wi_1")(x, factors.get("wi_1")))
        else:
            hidden = jax.nn.relu(dense_in(name="wi")(x, factors.get("wi")))
        hidden = constrain(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
        return Dense(cfg, cfg.d_model, ("mlp", "embed"), name="wo")(hidden, factors.get("wo"))


def residual_dropout(cfg: T5Config, x: Array, deterministic: bool) -> Array:
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)
