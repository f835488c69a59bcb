"""A Flax linen T5 encoder-decoder, numerically the Hugging Face / T5X T5 (v1.0 and v1.1 / LM-adapt / T0).

Conventions follow T5X's ``EncoderDecoder`` (parameter names, logical axis names, the decode cache) so that
partitioning rules and checkpoints carry over; the numerics follow `transformers`' ``T5ForConditionalGeneration``
(checked by tests/test_t5_parity.py):

* RMS layer norm (no mean subtraction, no bias), pre-norm residual blocks, no 1/sqrt(d) attention scaling;
* relative position biases (buckets and max distance from the config), one table per stack
  (``encoder/relpos_bias``, ``decoder/relpos_bias``) computed once and shared by all layers of the stack;
* v1.0 (``feed_forward_proj="relu"``, tied output embedding, decoder output scaled by d_model**-0.5) and
  v1.1 (``"gated-gelu"`` with the tanh GELU, an untied ``logits_dense``, no scaling);
* ``num_heads * d_kv`` may differ from ``d_model``.

Masks come from the tokens (id 0 is padding). Attention masks only *keys*: padded query rows are computed
like real ones (their outputs are ignored downstream), which keeps every position equal to transformers'.
The decoder's self-attention is causal and, when ``decoder_target_tokens`` is given, also ignores keys whose
target is padding (T5X masks by target tokens because the first decoder input, the start token, is 0).

LoRA: every ``Dense`` projection takes optional factors ``(A, B, scale)`` and computes
``x·W + scale·((x·A)·B)`` (`lora.lora_delta`); the ``adapters`` pytree (see `tagi_jax.models.lora`) is
sliced per stack and layer here. Instruction fusion, two kinds:

* ``extra_encoder_states`` (decode) are prepended to the encoder output the decoder cross-attends to
  (cross-attention k/v adapters apply to them too);
* ``encoder_fusion_states`` (encode) are cross-attended by every encoder layer in a sub-block after its
  self-attention (``pre_instruction_attention_layer_norm`` + ``instruction_attention``, no LoRA). Those
  parameters exist only in trees initialised with fusion states; the output projection starts at zero, so
  a tree without them (a Hugging Face import) extended with fresh ones computes exactly the same function.

Incremental decoding (T5X convention), with the flax ``"cache"`` collection:

1. ``decode(..., decode=True, mutable=["cache"])`` with full-length ``decoder_input_tokens`` [b, L] (any
   values) and/or ``max_decode_length=L`` *initialises* the cache of every decoder self-attention layer:
   ``cached_key``/``cached_value`` zeros of shape [b, L, heads, d_kv] (batch-major) and a scalar int32
   ``cache_index`` = 0; its logits are those of a normal causal pass and can be discarded.
2. Each later call feeds one token per row, ``decoder_input_tokens`` [b, 1], with the cache passed in and
   mutable: the token's key/value are written at ``cache_index``, it attends to positions <= cache_index,
   its relative-position bias is the row of the current position, and ``cache_index`` increments.
   ``decoder_target_tokens`` is ignored in decode mode. Cross-attention is recomputed from ``encoded``
   each step (nothing encoder-side is cached, so the cache can be initialised with dummy inputs and
   only its batch-major leaves need repeating/gathering for beams).
Compute ``encoded = apply(..., method=T5.encode)`` once and pass it to every step.

Pure: no jit, no hidden state; parameters are created with logical axis names, activations are constrained.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax.models import lora
from tagi_jax.models.t5_config import T5Config

Array = jax.Array
# Per-projection LoRA factors of one layer: {"q": (A, B, scale), ...}.
LayerFactors = Mapping[str, tuple]

_NEG_INF = -1.0e10  # T5X's attention-mask bias: finite, so fully masked rows stay finite.


def _constrain(x: Array, names: tuple[str, ...]) -> Array:
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


class Dense(nn.Module):
    """x·W [+ scale·((x·A)·B)], W: [d_in, features] with logical names `kernel_axes`."""

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
        y = jnp.einsum("...d,df->...f", x, jnp.asarray(kernel, cfg.jnp_dtype))
        if factors is not None:
            a, b, scale = factors
            y = y + lora.lora_delta(x, a, b, scale)
        return y


class MultiHeadAttention(nn.Module):
    """T5 attention (no 1/sqrt(d_kv) scaling), optional relative bias, optional T5X decode cache."""

    config: T5Config
    zero_output: bool = False  # output projection initialised to zero (a new sub-block that starts as a no-op)

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array, mask: Optional[Array], bias: Optional[Array], *,
                 factors: LayerFactors, deterministic: bool, decode: bool = False,
                 cache_length: Optional[int] = None) -> Array:
        cfg = self.config
        h, dkv, inner = cfg.num_heads, cfg.d_kv, cfg.inner_dim
        # T5 folds 1/sqrt(d_kv) into the query initialisation instead of the attention logits.
        query_init = nn.initializers.variance_scaling(1.0 / dkv, "fan_in", "normal")
        dense = functools.partial(Dense, cfg, inner, ("embed", "joined_kv"))
        q = dense(kernel_init=query_init, name="query")(inputs_q, factors.get("q"))
        k = dense(name="key")(inputs_kv, factors.get("k"))
        v = dense(name="value")(inputs_kv, factors.get("v"))
        split = lambda x: _constrain(x.reshape(x.shape[:2] + (h, dkv)), ("batch", "length", "heads", "kv"))
        q, k, v = split(q), split(k), split(v)

        if decode:
            k, v, mask = self._update_cache(q, k, v, mask, cache_length)

        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            logits = logits + jnp.asarray(bias, jnp.float32)
        if mask is not None:
            logits = jnp.where(mask, logits, _NEG_INF)
        weights = jax.nn.softmax(logits, axis=-1).astype(cfg.jnp_dtype)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = _constrain(out, ("batch", "length", "heads", "kv")).reshape(out.shape[:2] + (inner,))
        out_init = {"kernel_init": nn.initializers.zeros_init()} if self.zero_output else {}
        return Dense(cfg, cfg.d_model, ("joined_kv", "embed"), name="out", **out_init)(out, factors.get("o"))

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
        hidden = _constrain(hidden, ("batch", "length", "mlp"))
        hidden = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(hidden, deterministic=deterministic)
        return Dense(cfg, cfg.d_model, ("mlp", "embed"), name="wo")(hidden, factors.get("wo"))


def _residual_dropout(cfg: T5Config, x: Array, deterministic: bool) -> Array:
    return nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))(x, deterministic=deterministic)


# Encoder fusion sub-block (parameter names inside `encoder/layers_<i>`).
FUSION_NORM, FUSION_ATTENTION = "pre_instruction_attention_layer_norm", "instruction_attention"


def is_encoder_fusion_param(path: tuple[str, ...]) -> bool:
    """Whether a parameter path (as in a T5 tree, or a TAGI tree's "t5" subtree) is an encoder-fusion one."""
    return any(a == "encoder" and b.startswith("layers_") and c in (FUSION_NORM, FUSION_ATTENTION)
               for a, b, c in zip(path, path[1:], path[2:]))


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, *, attn_factors, ffn_factors, deterministic, fusion_states=None,
                 fusion_mask=None):
        cfg = self.config
        h = LayerNorm(cfg, name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, name="attention")(h, h, mask, bias, factors=attn_factors,
                                                      deterministic=deterministic)
        x = x + _residual_dropout(cfg, h, deterministic)
        if fusion_states is not None:  # the instruction, read between self-attention and the MLP
            h = LayerNorm(cfg, name=FUSION_NORM)(x)
            h = MultiHeadAttention(cfg, zero_output=True, name=FUSION_ATTENTION)(
                h, fusion_states, fusion_mask, None, factors={}, deterministic=deterministic)
            x = x + _residual_dropout(cfg, h, deterministic)
        h = LayerNorm(cfg, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, factors=ffn_factors, deterministic=deterministic)
        x = x + _residual_dropout(cfg, h, deterministic)
        return _constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, encoded, bias, self_mask, cross_mask, *, self_factors, cross_factors, ffn_factors,
                 deterministic, decode, cache_length):
        cfg = self.config
        h = LayerNorm(cfg, name="pre_self_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, name="self_attention")(
            h, h, self_mask, bias, factors=self_factors, deterministic=deterministic, decode=decode,
            cache_length=cache_length)
        x = x + _residual_dropout(cfg, h, deterministic)
        h = LayerNorm(cfg, name="pre_cross_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, name="encoder_decoder_attention")(
            h, encoded, cross_mask, None, factors=cross_factors, deterministic=deterministic)
        x = x + _residual_dropout(cfg, h, deterministic)
        h = LayerNorm(cfg, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, factors=ffn_factors, deterministic=deterministic)
        x = x + _residual_dropout(cfg, h, deterministic)
        return _constrain(x, ("batch", "length", "embed"))


# --------------------------------------------------------------------------------------------------------
# Stacks.
# --------------------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, *, adapters, deterministic: bool, fusion_states: Optional[Array] = None,
                 fusion_mask: Optional[Array] = None) -> Array:
        cfg = self.config
        if fusion_states is not None:
            fusion_states = _constrain(jnp.asarray(fusion_states, cfg.jnp_dtype), ("batch", "length", "embed"))
            fusion_mask = fusion_mask[:, None, None, :]
        x = _constrain(self.shared_embedding(tokens), ("batch", "length", "embed"))
        x = _residual_dropout(cfg, x, deterministic)
        length = tokens.shape[1]
        bias = RelativePositionBiases(cfg, bidirectional=True, name="relpos_bias")(length, length)
        mask = (tokens > 0)[:, None, None, :]
        for i in range(cfg.num_encoder_layers):
            x = EncoderLayer(cfg, name=f"layers_{i}")(
                x, bias, mask, attn_factors=lora.block_factors(adapters, "encoder_self", i),
                ffn_factors=lora.block_factors(adapters, "encoder_ffn", i), deterministic=deterministic,
                fusion_states=fusion_states, fusion_mask=fusion_mask)
        x = LayerNorm(cfg, name="encoder_norm")(x)
        return _residual_dropout(cfg, x, deterministic)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: Array, encoder_mask: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Optional[Array], *, adapters, deterministic: bool, decode: bool,
                 max_decode_length: Optional[int]) -> Array:
        cfg = self.config
        batch, length = decoder_input_tokens.shape
        relpos = RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
        step_cache = self._step_cache() if decode else None
        cross_mask = encoder_mask[:, None, None, :]
        cache_length = None
        if step_cache is not None:  # one-token decode step
            cache_length = step_cache["cached_key"].shape[1]
            if max_decode_length is not None and max_decode_length != cache_length:
                raise ValueError(f"decode: max_decode_length={max_decode_length} but the cache was initialised "
                                 f"for {cache_length} positions")
            bias = relpos(1, cache_length, query_position=step_cache["cache_index"])
            self_mask = None  # the attention layer masks positions > cache_index
        else:
            bias = relpos(length, length)
            self_mask = jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]
            if decoder_target_tokens is not None and not decode:
                self_mask = jnp.logical_and(self_mask, (decoder_target_tokens > 0)[:, None, None, :])
            if decode:
                cache_length = max(max_decode_length or length, length)

        x = _constrain(self.shared_embedding(decoder_input_tokens), ("batch", "length", "embed"))
        x = _residual_dropout(cfg, x, deterministic)
        for i in range(cfg.num_decoder_layers):
            x = DecoderLayer(cfg, name=f"layers_{i}")(
                x, encoded, bias, self_mask, cross_mask,
                self_factors=lora.block_factors(adapters, "decoder_self", i),
                cross_factors=lora.block_factors(adapters, "decoder_cross", i),
                ffn_factors=lora.block_factors(adapters, "decoder_ffn", i),
                deterministic=deterministic, decode=decode, cache_length=cache_length)
        x = LayerNorm(cfg, name="decoder_norm")(x)
        x = _residual_dropout(cfg, x, deterministic)

        if cfg.logits_scaled:  # T5 v1.0 (tied embeddings): rescale before the output projection
            x = x * (cfg.d_model ** -0.5)
        if cfg.tie_word_embeddings:
            logits = self.shared_embedding.attend(x)
        else:
            logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="logits_dense")(x)
        return _constrain(logits, ("batch", "length", "vocab"))

    def _step_cache(self) -> Optional[Mapping[str, Array]]:
        """The first layer's self-attention cache if it exists (i.e. this is a one-token decode step)."""
        cache = self.variables.get("cache", {})
        try:
            return cache["layers_0"]["self_attention"]
        except KeyError:
            return None


# --------------------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------------------


class T5(nn.Module):
    """T5 encoder-decoder with LoRA entry points and instruction fusion (see the module docstring)."""

    config: T5Config

    def setup(self):
        cfg = self.config
        self.token_embedder = Embed(cfg)
        self.encoder = Encoder(cfg, shared_embedding=self.token_embedder)
        self.decoder = Decoder(cfg, shared_embedding=self.token_embedder)

    def encode(self, encoder_input_tokens: Array, *, adapters: lora.Adapters | None = None,
               encoder_fusion_states: Optional[Array] = None, encoder_fusion_mask: Optional[Array] = None,
               enable_dropout: bool = False) -> Array:
        """Final-normed encoder states [batch, len, d_model] (every layer reading the fusion states if given)."""
        lora.check_adapters(self.config, adapters, batch=encoder_input_tokens.shape[0])
        encoder_fusion_mask = _check_states("encoder_fusion", self.config, encoder_fusion_states,
                                            encoder_fusion_mask, encoder_input_tokens.shape[0])
        return self.encoder(encoder_input_tokens, adapters=adapters, deterministic=not enable_dropout,
                            fusion_states=encoder_fusion_states, fusion_mask=encoder_fusion_mask)

    def decode(self, encoded: Array, encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, *, adapters: lora.Adapters | None = None,
               extra_encoder_states: Optional[Array] = None, extra_encoder_mask: Optional[Array] = None,
               enable_dropout: bool = False, decode: bool = False,
               max_decode_length: Optional[int] = None) -> Array:
        """Logits [batch, tlen, vocab] given the encoder output (and optional fused states in front of it)."""
        cfg = self.config
        lora.check_adapters(cfg, adapters, batch=decoder_input_tokens.shape[0])
        memory = jnp.asarray(encoded, cfg.jnp_dtype)
        memory_mask = encoder_input_tokens > 0
        extra_encoder_mask = _check_states("extra_encoder", cfg, extra_encoder_states, extra_encoder_mask,
                                           memory.shape[0])
        if extra_encoder_states is not None:
            memory = jnp.concatenate([jnp.asarray(extra_encoder_states, cfg.jnp_dtype), memory], axis=1)
            memory_mask = jnp.concatenate([extra_encoder_mask, memory_mask], axis=1)
        memory = _constrain(memory, ("batch", "length", "embed"))
        return self.decoder(memory, memory_mask, decoder_input_tokens, decoder_target_tokens, adapters=adapters,
                            deterministic=not enable_dropout or decode, decode=decode,
                            max_decode_length=max_decode_length)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 decoder_target_tokens: Optional[Array] = None, *, enable_dropout: bool = False,
                 adapters: lora.Adapters | None = None, extra_encoder_states: Optional[Array] = None,
                 extra_encoder_mask: Optional[Array] = None, encoder_fusion_states: Optional[Array] = None,
                 encoder_fusion_mask: Optional[Array] = None, decode: bool = False,
                 max_decode_length: Optional[int] = None) -> Array:
        """Teacher-forced logits [batch, tlen, vocab] (encode + decode)."""
        encoded = self.encode(encoder_input_tokens, adapters=adapters, encoder_fusion_states=encoder_fusion_states,
                              encoder_fusion_mask=encoder_fusion_mask, enable_dropout=enable_dropout)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                           adapters=adapters, extra_encoder_states=extra_encoder_states,
                           extra_encoder_mask=extra_encoder_mask, enable_dropout=enable_dropout, decode=decode,
                           max_decode_length=max_decode_length)


def _check_states(name: str, cfg: T5Config, states: Optional[Array], mask: Optional[Array],
                  batch: int) -> Optional[Array]:
    """Shape-check fusion states [batch, n, d_model]; returns their bool mask [batch, n] (all ones if None)."""
    if states is None:
        return None
    if states.ndim != 3 or states.shape[0] != batch or states.shape[-1] != cfg.d_model:
        raise ValueError(f"{name}_states: shape {states.shape}, expected [{batch}, n, {cfg.d_model}]")
    if mask is None:
        return jnp.ones(states.shape[:2], jnp.bool_)
    if mask.shape != states.shape[:2]:
        raise ValueError(f"{name}_mask: shape {mask.shape}, expected {states.shape[:2]}")
    return mask.astype(jnp.bool_)


def init_params(config: T5Config, rng: Array, *, batch: int = 1, enc_len: int = 1, dec_len: int = 1,
                fusion_len: int = 0, boxed: bool = False):
    """Initial parameters from dummy inputs (``boxed=True`` keeps the `nn.LogicallyPartitioned` boxes);
    ``fusion_len > 0`` adds the encoder-fusion sub-blocks (zero output projection)."""
    model = T5(config)
    enc = jnp.ones((batch, enc_len), jnp.int32)
    dec = jnp.ones((batch, dec_len), jnp.int32)
    fusion = jnp.zeros((batch, fusion_len, config.d_model), config.jnp_dtype) if fusion_len > 0 else None
    params = model.init(rng, enc, dec, dec, encoder_fusion_states=fusion)["params"]
    return params if boxed else nn.meta.unbox(params)
