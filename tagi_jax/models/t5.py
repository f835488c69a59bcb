"""The T5 encoder-decoder assembled from `tagi_jax.models.layers`: the stacks, the model and its initialisation
(v1.0 and v1.1 / LM-adapt / T0 families), with LoRA entry points and instruction fusion.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models import lora
from tagi_jax.models.layers import (Array, Dense, Embed, LayerNorm, MlpBlock, MultiHeadAttention,
                                    RelativePositionBiases, constrain, residual_dropout)
from tagi_jax.models.t5_config import T5Config

# Encoder fusion sub-block (parameter names inside `encoder/layers_<i>`).
FUSION_NORM, FUSION_ATTENTION = "pre_instruction_attention_layer_norm", "instruction_attention"


def is_encoder_fusion_param(path: tuple[str, ...]) -> bool:
    """Whether a parameter path (as in a T5 tree, or a TAGI tree's "t5" subtree) is an encoder-fusion one."""
    return any(a == "encoder" and b.startswith("layers_") and c in (FUSION_NORM, FUSION_ATTENTION)
               for a, b, c in zip(path, path[1:], path[2:]))


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, bias, mask, attn_factors, ffn_factors, deterministic, fusion_states=None,
                 fusion_mask=None):
        cfg = self.config
        h = LayerNorm(cfg, name="pre_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, name="attention")(h, h, mask, bias, factors=attn_factors,
                                                      deterministic=deterministic)
        x = x + residual_dropout(cfg, h, deterministic)
        if fusion_states is not None:  # the instruction, read between self-attention and the MLP
            h = LayerNorm(cfg, name=FUSION_NORM)(x)
            h = MultiHeadAttention(cfg, zero_output=True, name=FUSION_ATTENTION)(
                h, fusion_states, fusion_mask, None, factors={}, deterministic=deterministic)
            x = x + residual_dropout(cfg, h, deterministic)
        h = LayerNorm(cfg, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, factors=ffn_factors, deterministic=deterministic)
        x = x + residual_dropout(cfg, h, deterministic)
        return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x, encoded, bias, self_mask, cross_mask, self_factors, cross_factors, ffn_factors,
                 deterministic, decode, cache_length, cross_kv_parts=(), project_cross_kv_only=False):
        cfg = self.config
        cross = MultiHeadAttention(cfg, name="encoder_decoder_attention")
        if project_cross_kv_only:  # only this layer's cross-attention keys/values of `encoded`
            return cross(None, encoded, None, None, factors=cross_factors, deterministic=True,
                         project_kv_only=True)
        h = LayerNorm(cfg, name="pre_self_attention_layer_norm")(x)
        h = MultiHeadAttention(cfg, name="self_attention")(
            h, h, self_mask, bias, factors=self_factors, deterministic=deterministic, decode=decode,
            cache_length=cache_length)
        x = x + residual_dropout(cfg, h, deterministic)
        h = LayerNorm(cfg, name="pre_cross_attention_layer_norm")(x)
        h = cross(h, encoded, cross_mask, None, factors=cross_factors, deterministic=deterministic,
                  kv_parts=cross_kv_parts)
        x = x + residual_dropout(cfg, h, deterministic)
        h = LayerNorm(cfg, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, factors=ffn_factors, deterministic=deterministic)
        x = x + residual_dropout(cfg, h, deterministic)
        return constrain(x, ("batch", "length", "embed"))


# What each `model.remat_policy` keeps for the backward pass (everything else is recomputed), by the names of
# `jax.checkpoint_policies`: "full" keeps only the layer inputs; "dots" also every matmul output (less recompute,
# more memory); "dots_with_no_batch_dims" keeps the weight matmuls but not attention's batched dot products.
REMAT_POLICIES = {
    "full": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_with_no_batch_dims": "dots_with_no_batch_dims_saveable",
}


def rematerialised(layer_cls, cfg: T5Config, static_argnums: tuple[int, ...]):
    """`layer_cls`, or its `nn.remat` under `cfg.remat_policy` ("none": no rematerialisation). Parameter
    names are unchanged. `static_argnums` count `self` as argument 0 (Flax's convention)."""
    if cfg.remat_policy == "none":
        return layer_cls
    policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[cfg.remat_policy])
    return nn.remat(layer_cls, policy=policy, static_argnums=static_argnums, prevent_cse=True)


class CrossKV(NamedTuple):
    """Precomputed cross-attention keys/values (`T5.project_cross_kv`), one ``(k, v)`` per decoder layer, each
    ``[b or 1, heads, n, d_kv]`` (heads-major; batch 1 is shared by every row).

    * ``prefix`` (+ ``prefix_mask`` [b or 1, n]): the prepended instruction states' ("prepend" fusion). The
      same for every instance of a task, so computed once per task instead of once per instance;
    * ``memory``: the encoder output's (computed once before a decoding loop; `encoded` is then not read).
    """

    prefix: Optional[tuple] = None
    prefix_mask: Optional[Array] = None
    memory: Optional[tuple] = None

    def parts(self, layer: int, memory_mask: Optional[Array]) -> tuple:
        """`MultiHeadAttention` kv_parts of one layer (prefix first, then the memory)."""
        out = []
        if self.prefix is not None:
            mask = self.prefix_mask
            mask = None if mask is None else jnp.asarray(mask, jnp.bool_)[:, None, None, :]
            out.append((*self.prefix[layer], mask))
        if self.memory is not None:
            out.append((*self.memory[layer], memory_mask))
        return tuple(out)


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
            fusion_states = constrain(jnp.asarray(fusion_states, cfg.jnp_dtype), ("batch", "length", "embed"))
            fusion_mask = fusion_mask[:, None, None, :]
        x = constrain(self.shared_embedding(tokens), ("batch", "length", "embed"))
        x = residual_dropout(cfg, x, deterministic)
        length = tokens.shape[1]
        bias = RelativePositionBiases(cfg, bidirectional=True, name="relpos_bias")(length, length)
        mask = (tokens > 0)[:, None, None, :]
        layer = rematerialised(EncoderLayer, cfg, static_argnums=(6,))  # `deterministic` is static
        for i in range(cfg.num_encoder_layers):
            x = layer(cfg, name=f"layers_{i}")(
                x, bias, mask, lora.block_factors(adapters, "encoder_self", i),
                lora.block_factors(adapters, "encoder_ffn", i), deterministic, fusion_states, fusion_mask)
        x = LayerNorm(cfg, name="encoder_norm")(x)
        return residual_dropout(cfg, x, deterministic)


class Decoder(nn.Module):
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: Optional[Array], encoder_mask: Optional[Array], decoder_input_tokens: Optional[Array],
                 decoder_target_tokens: Optional[Array], *, adapters, deterministic: bool, decode: bool,
                 max_decode_length: Optional[int], cross_kv: Optional[CrossKV] = None,
                 project_cross_kv_only: bool = False) -> Array:
        """Logits; `cross_kv` (`CrossKV`) are precomputed cross-attention keys/values attended to before (or,
        with `encoded` None, instead of) those of `encoded`. `project_cross_kv_only`: per layer ``(k, v)`` of
        `encoded` instead (`CrossKV.layers`)."""
        cfg = self.config
        if project_cross_kv_only:
            return tuple(DecoderLayer(cfg, name=f"layers_{i}")(
                None, encoded, None, None, None, {}, lora.block_factors(adapters, "decoder_cross", i), {}, True,
                False, None, project_cross_kv_only=True) for i in range(cfg.num_decoder_layers))
        batch, length = decoder_input_tokens.shape
        relpos = RelativePositionBiases(cfg, bidirectional=False, name="relpos_bias")
        step_cache = self._step_cache() if decode else None
        cross_mask = None if encoder_mask is None else encoder_mask[:, None, None, :]
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

        x = constrain(self.shared_embedding(decoder_input_tokens), ("batch", "length", "embed"))
        x = residual_dropout(cfg, x, deterministic)
        # The one-token decode step keeps no activations for a backward pass: nothing to rematerialise.
        layer = DecoderLayer if decode else rematerialised(DecoderLayer, cfg, static_argnums=(9, 10, 11))
        for i in range(cfg.num_decoder_layers):
            parts = () if cross_kv is None else cross_kv.parts(i, cross_mask)
            x = layer(cfg, name=f"layers_{i}")(
                x, encoded, bias, self_mask, cross_mask, lora.block_factors(adapters, "decoder_self", i),
                lora.block_factors(adapters, "decoder_cross", i), lora.block_factors(adapters, "decoder_ffn", i),
                deterministic, decode, cache_length, *((parts,) if parts else ()))
        x = LayerNorm(cfg, name="decoder_norm")(x)
        x = residual_dropout(cfg, x, deterministic)

        if cfg.logits_scaled:  # T5 v1.0 (tied embeddings): rescale before the output projection
            x = x * (cfg.d_model ** -0.5)
        if cfg.tie_word_embeddings:
            logits = self.shared_embedding.attend(x)
        else:
            logits = Dense(cfg, cfg.vocab_size, ("embed", "vocab"), name="logits_dense")(x)
        return constrain(logits, ("batch", "length", "vocab"))

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
    """T5 encoder-decoder with LoRA entry points and instruction fusion.

    Conventions follow T5X's ``EncoderDecoder`` (parameter names, logical axis names, the decode cache) so that
    partitioning rules and checkpoints carry over; the numerics follow `transformers`'
    ``T5ForConditionalGeneration`` (checked by tests/test_t5_parity.py):

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
       ``decoder_target_tokens`` is ignored in decode mode. Nothing encoder-side is in the cache (it can be
       initialised with dummy inputs and only its batch-major leaves need repeating/gathering for beams).
    Compute ``encoded = apply(..., method=T5.encode)`` once, and its cross-attention keys/values
    ``apply(..., method=T5.project_cross_kv)`` once (heads-major, as the attention products read them), and
    pass them to every step as ``cross_kv=CrossKV(memory=...)`` (`tagi_jax.models.predict` does). The
    "prepend" instruction's keys/values, the same for every instance of a task, go in ``CrossKV.prefix``:
    computed once per task, not once per instance.

    Pure: no jit, no hidden state.
    """

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

    def decode(self, encoded: Optional[Array], encoder_input_tokens: Array, decoder_input_tokens: Array,
               decoder_target_tokens: Optional[Array] = None, *, adapters: lora.Adapters | None = None,
               extra_encoder_states: Optional[Array] = None, extra_encoder_mask: Optional[Array] = None,
               cross_kv: Optional[CrossKV] = None, enable_dropout: bool = False, decode: bool = False,
               max_decode_length: Optional[int] = None) -> Array:
        """Logits [batch, tlen, vocab] given the encoder output (and optional fused states in front of it).

        `cross_kv` replaces projections by precomputed keys/values: ``prefix`` those of `extra_encoder_states`
        (which must then be None), ``memory`` those of `encoded` (which may then be None)."""
        cfg = self.config
        batch = encoder_input_tokens.shape[0]
        lora.check_adapters(cfg, adapters, batch=decoder_input_tokens.shape[0])
        memory_mask = encoder_input_tokens > 0
        if cross_kv is not None:
            cross_kv = _check_cross_kv(cfg, cross_kv, extra_encoder_states, batch)
        extra_encoder_mask = _check_states("extra_encoder", cfg, extra_encoder_states, extra_encoder_mask, batch)
        memory = None
        if cross_kv is None or cross_kv.memory is None:
            memory = jnp.asarray(encoded, cfg.jnp_dtype)
            if extra_encoder_states is not None:
                memory = jnp.concatenate([jnp.asarray(extra_encoder_states, cfg.jnp_dtype), memory], axis=1)
                memory_mask = jnp.concatenate([extra_encoder_mask, memory_mask], axis=1)
            memory = constrain(memory, ("batch", "length", "embed"))
        return self.decoder(memory, memory_mask, decoder_input_tokens, decoder_target_tokens, adapters=adapters,
                            deterministic=not enable_dropout or decode, decode=decode,
                            max_decode_length=max_decode_length, cross_kv=cross_kv)

    def project_cross_kv(self, states: Array, *, adapters: lora.Adapters | None = None) -> tuple:
        """Every decoder layer's cross-attention ``(k, v)`` of `states` [b, n, d_model] (with the adapters'
        decoder_cross k/v factors, if any): ``[b, heads, n, d_kv]`` each, for a `CrossKV`."""
        lora.check_adapters(self.config, adapters, batch=states.shape[0])
        states = constrain(jnp.asarray(states, self.config.jnp_dtype), ("batch", "length", "embed"))
        return self.decoder(states, None, None, None, adapters=adapters, deterministic=True, decode=False,
                            max_decode_length=None, project_cross_kv_only=True)

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


def _check_cross_kv(cfg: T5Config, kv: CrossKV, extra_states: Optional[Array], batch: int) -> CrossKV:
    """Shape-check a `CrossKV` against the config and the batch; returns it with a bool prefix mask."""
    if kv.prefix is not None and extra_states is not None:
        raise ValueError("decode: give the instruction either as extra_encoder_states or as cross_kv.prefix, "
                         "not both")
    if kv.memory is not None and extra_states is not None:
        raise ValueError("decode: with cross_kv.memory (the encoder output's keys/values) the fused states must "
                         "come as cross_kv.prefix too, not as extra_encoder_states")
    mask = kv.prefix_mask
    for name, layers in (("prefix", kv.prefix), ("memory", kv.memory)):
        if layers is None:
            continue
        if len(layers) != cfg.num_decoder_layers:
            raise ValueError(f"cross_kv.{name}: {len(layers)} layers, expected {cfg.num_decoder_layers}")
        for k, v in layers:
            want = (cfg.num_heads, k.shape[2], cfg.d_kv)
            if k.ndim != 4 or k.shape != v.shape or k.shape[1:] != want or k.shape[0] not in (1, batch):
                raise ValueError(f"cross_kv.{name}: k {k.shape} / v {v.shape}, expected [{batch} or 1, "
                                 f"{cfg.num_heads}, n, {cfg.d_kv}]")
        if name == "prefix":
            n, rows = layers[0][0].shape[2], layers[0][0].shape[0]
            if mask is None:
                mask = jnp.ones((rows, n), jnp.bool_)
            if mask.ndim != 2 or mask.shape[1] != n or mask.shape[0] not in (1, batch):
                raise ValueError(f"cross_kv.prefix_mask: shape {mask.shape}, expected [{batch} or 1, {n}]")
            mask = mask.astype(jnp.bool_)
    return kv._replace(prefix_mask=mask)


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
