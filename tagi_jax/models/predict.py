"""T5 generation and scoring: encode once, then greedy or beam search over the decode cache
(`tagi_jax.decoding`), and the teacher-forced log-likelihood of given targets (rank classification).

Pure functions of (model, params, arrays); jit them at the call site::

    predict_fn = jax.jit(functools.partial(predict, model),
                         static_argnames=("max_decode_len", "beam_size", "length_penalty_style"))
    tokens, scores = predict_fn(params, batch["encoder_input_tokens"], adapters=adapters, max_decode_len=128)

Before the loop, the cross-attention keys/values of the encoder output and of the "prepend" fusion states are
projected once (`T5.project_cross_kv`), heads-major as the attention products read them, so the loop neither
re-projects nor re-lays them out; with them the encoder tokens (the mask) and the generated adapters travel in
the search's extras (repeated per beam; shared adapters and keys/values with batch 1 are left alone).
The instruction's keys/values are the same for every instance of a task: callers that hold one task's (or a
table of tasks') states compute them once with `project_cross_kv` and pass them as `extra_encoder_kv`
(tagi_jax.eval.decode does, per task of its adapter table). Encoder-side fusion states are read once, by the
encoder pass before the loop, and are not extras.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tagi_jax.decoding import DecodingState, PyTree, TokensToLogits, beam_search, expand_to_beams, greedy_search
from tagi_jax.models import lora
from tagi_jax.models.t5 import CrossKV


def _expand_rows(x, beam_size: int):
    """Per-beam copies of a [batch, ...] array; batch 1 (shared by every row) is left alone."""
    return x if x is None or x.shape[0] == 1 else jnp.repeat(x, beam_size, axis=0)


def _expand_model_extras(extras: PyTree, beam_size: int) -> PyTree:
    """Per-beam copies of the T5 decoding extras; adapters and the instruction's keys/values may be shared."""
    extras = dict(extras)
    adapters, kv = extras.pop("adapters"), extras.pop("cross_kv")
    out = expand_to_beams(extras, beam_size)
    out["adapters"] = lora.split_layers(lora.expand_batch(adapters, beam_size))
    out["cross_kv"] = jax.tree_util.tree_map(lambda x: _expand_rows(x, beam_size), kv)
    return out


def project_cross_kv(model, params, states: jax.Array, adapters: PyTree = None) -> tuple:
    """Every decoder layer's cross-attention (k, v) of `states` [b, n, d_model], [b, heads, n, d_kv] each
    (`T5.project_cross_kv`): e.g. one task's instruction states (b = 1) for `predict`'s `extra_encoder_kv`."""
    return model.apply({"params": params}, states, adapters=adapters, method="project_cross_kv")


def _cross_kv(model, params, encoded, adapters, extra_encoder_states, extra_encoder_mask,
              extra_encoder_kv) -> CrossKV:
    """Keys/values of the encoder output, and of the fusion states unless given precomputed."""
    if extra_encoder_kv is None and extra_encoder_states is not None:
        extra_encoder_kv = project_cross_kv(model, params, extra_encoder_states, adapters)
    return CrossKV(extra_encoder_kv, extra_encoder_mask if extra_encoder_kv is not None else None,
                   project_cross_kv(model, params, encoded, adapters))


def init_decode_cache(model, params, encoder_input_tokens, *, max_decode_len: int, adapters=None,
                      cross_kv: CrossKV) -> PyTree:
    """The T5 "cache" collection for `max_decode_len` steps (T5X style: one decode=True call at full length).

    The call's logits are discarded (and removed by XLA under jit); only the zero-initialised cache is kept.
    `model` is a `tagi_jax.models.t5.T5` (or any module with its `decode` API).
    """
    batch_size = encoder_input_tokens.shape[0]
    dummy = jnp.ones((batch_size, max_decode_len), jnp.int32)
    _, variables = model.apply(
        {"params": params}, None, encoder_input_tokens, dummy, dummy, adapters=adapters, cross_kv=cross_kv,
        enable_dropout=False, decode=True, max_decode_length=max_decode_len, mutable=["cache"], method="decode")
    return variables["cache"]


def t5_tokens_to_logits(model, params, max_decode_len: int) -> TokensToLogits:
    """The per-step callback for T5: one decoder token per row, extras from the decoding state."""

    def tokens_to_logits(state: DecodingState) -> tuple[jax.Array, PyTree]:
        ex = state.extras
        logits, variables = model.apply(
            {"params": params, "cache": state.cache}, None, ex["encoder_input_tokens"],
            state.cur_token, state.cur_token, adapters=ex["adapters"], cross_kv=ex["cross_kv"],
            enable_dropout=False, decode=True, max_decode_length=max_decode_len, mutable=["cache"],
            method="decode")
        return logits[:, -1, :], variables["cache"]

    return tokens_to_logits


def predict(
    model,
    params: PyTree,
    encoder_input_tokens: jax.Array,
    *,
    adapters: PyTree = None,
    extra_encoder_states: jax.Array | None = None,
    extra_encoder_mask: jax.Array | None = None,
    extra_encoder_kv: tuple | None = None,
    encoder_fusion_states: jax.Array | None = None,
    encoder_fusion_mask: jax.Array | None = None,
    max_decode_len: int,
    beam_size: int = 1,
    alpha: float = 0.6,
    eos_id: int = 1,
    decoder_start_token_id: int = 0,
    length_penalty_style: str = "t5x",
) -> tuple[jax.Array, jax.Array]:
    """Generate with a T5: encode once, then greedy (beam_size=1) or beam search with a key/value cache.

    `adapters` (tagi_jax.models.lora pytree, per-example or shared) apply to the encoder and the decoder;
    `extra_encoder_states` [batch, n, d_model] (+ mask [batch, n]) are the instruction-fusion states the
    decoder also attends to ("prepend" fusion), or instead `extra_encoder_kv`, their keys/values from
    `project_cross_kv` (e.g. batch 1: one task's, shared by every row; with the mask [1 or batch, n]);
    `encoder_fusion_states` (+ mask) those every encoder layer
    attends to ("encoder_cross_attention" fusion), used once by the encoder pass. Returns
    ``(tokens [batch, max_decode_len], scores [batch])``: the best sequence per example (tokens after EOS
    are 0) and its score (greedy: summed log-prob; beam: `beam_search` score).
    Pure; jit it with static `max_decode_len`, `beam_size` and `length_penalty_style` (module docstring).
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if max_decode_len < 1:
        raise ValueError(f"max_decode_len must be >= 1, got {max_decode_len}")
    batch_size = encoder_input_tokens.shape[0]
    encoded = model.apply({"params": params}, encoder_input_tokens, adapters=adapters,
                          encoder_fusion_states=encoder_fusion_states, encoder_fusion_mask=encoder_fusion_mask,
                          enable_dropout=False, method="encode")
    cross_kv = _cross_kv(model, params, encoded, adapters, extra_encoder_states, extra_encoder_mask,
                         extra_encoder_kv)
    cache = init_decode_cache(model, params, encoder_input_tokens, max_decode_len=max_decode_len,
                              adapters=adapters, cross_kv=cross_kv)
    extras = {"encoder_input_tokens": encoder_input_tokens, "adapters": adapters, "cross_kv": cross_kv}
    tokens_to_logits = t5_tokens_to_logits(model, params, max_decode_len)
    if beam_size == 1:
        extras["adapters"] = lora.split_layers(adapters)  # once, outside the loop (see lora.split_layers)
        return greedy_search(tokens_to_logits, cache, batch_size=batch_size, max_decode_len=max_decode_len,
                             eos_id=eos_id, extras=extras, start_token_id=decoder_start_token_id)
    tokens, scores = beam_search(
        tokens_to_logits, cache, batch_size=batch_size, beam_size=beam_size, max_decode_len=max_decode_len,
        eos_id=eos_id, alpha=alpha, extras=extras, expand_extras=_expand_model_extras,
        start_token_id=decoder_start_token_id, length_penalty_style=length_penalty_style)
    return tokens[:, 0], scores[:, 0]


class TargetScores(NamedTuple):
    """Per-example teacher-forced log-likelihood of the targets (padding excluded)."""

    sum: jax.Array  # [batch] summed token log-probs
    mean: jax.Array  # [batch] sum / num_tokens (0 where there are no target tokens)
    num_tokens: jax.Array  # [batch] number (or total weight) of scored target tokens


def score_targets(
    model,
    params: PyTree,
    encoder_input_tokens: jax.Array,
    decoder_input_tokens: jax.Array,
    decoder_target_tokens: jax.Array,
    *,
    decoder_loss_weights: jax.Array | None = None,
    adapters: PyTree = None,
    extra_encoder_states: jax.Array | None = None,
    extra_encoder_mask: jax.Array | None = None,
    extra_encoder_kv: tuple | None = None,
    encoder_fusion_states: jax.Array | None = None,
    encoder_fusion_mask: jax.Array | None = None,
) -> TargetScores:
    """log p(targets | inputs) per example, for rank classification (pick the option with the best score).

    Teacher-forced; a target position counts with weight `decoder_loss_weights` (default: target != 0).
    `extra_encoder_kv` (+ `extra_encoder_mask`): the fusion states' keys/values precomputed, as in `predict`.
    """
    if extra_encoder_kv is None:
        logits = model.apply({"params": params}, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                             enable_dropout=False, adapters=adapters, extra_encoder_states=extra_encoder_states,
                             extra_encoder_mask=extra_encoder_mask, encoder_fusion_states=encoder_fusion_states,
                             encoder_fusion_mask=encoder_fusion_mask)
    else:  # the instruction's keys/values precomputed (e.g. once per task): only the instance is projected
        encoded = model.apply({"params": params}, encoder_input_tokens, adapters=adapters,
                              encoder_fusion_states=encoder_fusion_states, encoder_fusion_mask=encoder_fusion_mask,
                              enable_dropout=False, method="encode")
        logits = model.apply({"params": params}, encoded, encoder_input_tokens, decoder_input_tokens,
                             decoder_target_tokens, adapters=adapters, extra_encoder_states=extra_encoder_states,
                             cross_kv=CrossKV(extra_encoder_kv, extra_encoder_mask), enable_dropout=False,
                             method="decode")
    log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_log_probs = jnp.take_along_axis(log_softmax, decoder_target_tokens[..., None].astype(jnp.int32),
                                          axis=-1)[..., 0]
    if decoder_loss_weights is None:
        weights = (decoder_target_tokens != 0).astype(jnp.float32)
    else:
        weights = decoder_loss_weights.astype(jnp.float32)
    total = jnp.sum(token_log_probs * weights, axis=-1)
    count = jnp.sum(weights, axis=-1)
    return TargetScores(sum=total, mean=jnp.where(count > 0, total / jnp.maximum(count, 1e-9), 0.0),
                        num_tokens=count)
