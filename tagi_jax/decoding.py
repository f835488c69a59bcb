"""Model-agnostic incremental decoding (T5X's ``t5x/decoding.py`` design): greedy and beam search driving a
``tokens_to_logits(state: DecodingState) -> (logits [batch, vocab], new_cache)`` callback inside a
``jax.lax.while_loop``, so each compiles once for a given ``max_decode_len`` and beam size.

Layout convention (as T5X): a flat batch of ``batch * beams`` rows is example-major, i.e. rows
``i*beams .. i*beams+beams-1`` are the beams of example ``i`` (what ``jnp.repeat(x, beams, axis=0)`` gives).
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp

PyTree = Any

# "Effective negative infinity" for masking scores (as T5X): finite so that sums and divisions stay finite.
NEG_INF = -1.0e7

LENGTH_PENALTY_STYLES = ("t5x", "hf")


@flax.struct.dataclass
class DecodingState:
    """What `tokens_to_logits` sees at each step (flat batch: ``batch * beams`` rows).

    cur_index: scalar int32, position of `cur_token` in `sequences` (0 = the decoder start token).
    sequences: [rows, max_decode_len + 1] prefixes decoded so far; column 0 holds the start token.
    cur_token: [rows, 1] the token to feed now.
    cache: the model's autoregressive cache (e.g. flax's "cache" collection).
    extras: per-example inputs that follow each row unchanged (encoder output, adapters, ...).

    Extras are the inputs every step needs but that never change during decoding (the encoder output, the
    decoder's fusion states, the generated adapters): computed once before the loop and, for beam search,
    repeated per beam once. Reordering beams never touches them: all beams of one example share the same
    extras, so only the cache is gathered per step.
    """

    cur_index: jax.Array
    sequences: jax.Array
    cur_token: jax.Array
    cache: PyTree
    extras: PyTree


TokensToLogits = Callable[[DecodingState], tuple[jax.Array, PyTree]]


# ----------------------------------------------------------------------------------------------------------
# Batch/beam reshaping. Scalars (e.g. a flax cache's `cache_index`) are shared by all rows and left alone.
# ----------------------------------------------------------------------------------------------------------


def _map_batched(fn: Callable[[jax.Array], jax.Array], tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: fn(x) if jnp.ndim(x) > 0 else x, tree)


def expand_to_beams(tree: PyTree, beam_size: int) -> PyTree:
    """Repeat every array with a leading batch axis `beam_size` times: [batch, ...] -> [batch * beams, ...].

    Rows stay example-major (each example's beams are adjacent). Scalars and None are left alone. Not for
    adapters whose factors may be shared (no batch axis): use `lora.expand_batch` for those.
    """
    if beam_size == 1:
        return tree
    return _map_batched(lambda x: jnp.repeat(x, beam_size, axis=0), tree)


def _add_beam_dim(tree: PyTree, beam_size: int) -> PyTree:
    """[batch, ...] -> [batch, beams, ...] (copies)."""
    return _map_batched(lambda x: jnp.broadcast_to(x[:, None], (x.shape[0], beam_size) + x.shape[1:]), tree)


def _flatten_beam_dim(tree: PyTree) -> PyTree:
    """[batch, beams, ...] -> [batch * beams, ...]."""
    return _map_batched(lambda x: x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]), tree)


def _unflatten_beam_dim(tree: PyTree, batch_size: int, beam_size: int) -> PyTree:
    """[batch * beams, ...] -> [batch, beams, ...]."""
    return _map_batched(lambda x: x.reshape((batch_size, beam_size) + x.shape[1:]), tree)


def _gather_beams(tree: PyTree, beam_indices: jax.Array) -> PyTree:
    """Select beams per example: x [batch, old_beams, ...], indices [batch, new_beams] -> [batch, new_beams, ...]."""
    rows = jnp.arange(beam_indices.shape[0])[:, None]
    return _map_batched(lambda x: x[rows, beam_indices], tree)


# ----------------------------------------------------------------------------------------------------------
# Greedy search.
# ----------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class _GreedyState:
    cur_index: jax.Array  # scalar int32
    sequences: jax.Array  # [batch, max_decode_len + 1]
    ended: jax.Array  # [batch] bool
    log_probs: jax.Array  # [batch] float32
    cache: PyTree


def greedy_search(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    max_decode_len: int,
    eos_id: int,
    extras: PyTree = None,
    start_token_id: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """Argmax decoding (temperature 0) until every row produced `eos_id` or `max_decode_len` tokens.

    Returns ``(tokens [batch, max_decode_len], log_probs [batch])``: tokens after the first EOS are 0, and
    `log_probs` is the sum of the chosen tokens' log-probabilities up to and including EOS.
    """
    sequences = jnp.zeros((batch_size, max_decode_len + 1), jnp.int32).at[:, 0].set(start_token_id)
    init = _GreedyState(
        cur_index=jnp.array(0, jnp.int32),
        sequences=sequences,
        ended=jnp.zeros((batch_size,), jnp.bool_),
        log_probs=jnp.zeros((batch_size,), jnp.float32),
        cache=cache,
    )

    def cond(state: _GreedyState) -> jax.Array:
        return (state.cur_index < max_decode_len) & ~jnp.all(state.ended)

    def body(state: _GreedyState) -> _GreedyState:
        i = state.cur_index
        cur_token = jax.lax.dynamic_slice_in_dim(state.sequences, i, 1, axis=1)
        logits, new_cache = tokens_to_logits(
            DecodingState(cur_index=i, sequences=state.sequences, cur_token=cur_token, cache=state.cache,
                          extras=extras))
        log_softmax = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        next_token = jnp.argmax(log_softmax, axis=-1).astype(jnp.int32)
        token_log_prob = jnp.take_along_axis(log_softmax, next_token[:, None], axis=-1)[:, 0]
        next_token = jnp.where(state.ended, 0, next_token)
        log_probs = state.log_probs + jnp.where(state.ended, 0.0, token_log_prob)
        sequences = jax.lax.dynamic_update_slice_in_dim(state.sequences, next_token[:, None], i + 1, axis=1)
        return _GreedyState(cur_index=i + 1, sequences=sequences, ended=state.ended | (next_token == eos_id),
                            log_probs=log_probs, cache=new_cache)

    final = jax.lax.while_loop(cond, body, init)
    return final.sequences[:, 1:], final.log_probs


# ----------------------------------------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------------------------------------


def brevity_penalty(alpha, length, style: str = "t5x"):
    """The length normalisation a finished hypothesis' log-probability is divided by.

    "t5x": ((5 + length) / 6) ** alpha (GNMT, Wu et al. 2016; T5X and Mesh TF);
    "hf":  length ** alpha (transformers' `length_penalty`). `length` counts generated tokens incl. EOS.
    """
    length = jnp.asarray(length, jnp.float32)
    if style == "t5x":
        return ((5.0 + length) / 6.0) ** alpha
    if style == "hf":
        return length ** alpha
    raise ValueError(f"length_penalty_style: unknown {style!r}; expected one of {LENGTH_PENALTY_STYLES}")


@flax.struct.dataclass
class _BeamState:
    cur_index: jax.Array  # scalar int32: tokens decoded so far
    live_log_probs: jax.Array  # [batch, beams], best first
    finished_scores: jax.Array  # [batch, beams], best first (length-normalised)
    live_seqs: jax.Array  # [batch, beams, max_decode_len + 1]
    finished_seqs: jax.Array  # [batch, beams, max_decode_len + 1]
    finished_flags: jax.Array  # [batch, beams] bool: slot holds a real finished hypothesis
    cache: PyTree  # leaves [batch, beams, ...] (scalars shared)


def beam_search(
    tokens_to_logits: TokensToLogits,
    cache: PyTree,
    *,
    batch_size: int,
    beam_size: int,
    max_decode_len: int,
    eos_id: int,
    alpha: float = 0.6,
    extras: PyTree = None,
    expand_extras: Callable[[PyTree, int], PyTree] = expand_to_beams,
    start_token_id: int = 0,
    length_penalty_style: str = "t5x",
) -> tuple[jax.Array, jax.Array]:
    """Beam search with length normalisation, in T5X's formulation (exact stopping criterion).

    `cache` and `extras` are per example ([batch, ...]); they are repeated per beam once, the extras with
    `expand_extras(extras, beam_size)`. Each step keeps the top ``2 * beams`` continuations so that ``beams``
    live (non-EOS) hypotheses always remain; hypotheses ending in EOS enter the finished set with score
    ``log_prob / brevity_penalty(alpha, length)``. The loop stops at `max_decode_len` or once no live
    hypothesis can still beat the worst finished one.

    `length_penalty_style`:
      * "t5x": T5X exactly: ((5+len)/6)**alpha; every EOS continuation among the top 2*beams is a finished
        candidate; an example with no finished hypothesis at the end returns its live beams (scores =
        unnormalised log-probs).
      * "hf": transformers' beam search with ``length_penalty=alpha, early_stopping="never"``: len**alpha;
        only EOS continuations ranked in the top `beams` are finished candidates, and at the last step the top
        `beams` continuations are finished whether or not they end in EOS.

    Returns ``(tokens [batch, beams, max_decode_len], scores [batch, beams])`` sorted best first; tokens after
    EOS are 0.
    """
    if length_penalty_style not in LENGTH_PENALTY_STYLES:
        raise ValueError(
            f"length_penalty_style: unknown {length_penalty_style!r}; expected one of {LENGTH_PENALTY_STYLES}")
    hf_style = length_penalty_style == "hf"
    seq_len = max_decode_len + 1  # column 0 holds the start token
    extras = expand_extras(extras, beam_size)

    live_seqs = jnp.zeros((batch_size, beam_size, seq_len), jnp.int32).at[:, :, 0].set(start_token_id)
    init = _BeamState(
        cur_index=jnp.array(0, jnp.int32),
        # Only beam 0 is live at first, so that the first step does not pick the same token `beams` times.
        live_log_probs=jnp.tile(jnp.array([0.0] + [NEG_INF] * (beam_size - 1), jnp.float32), (batch_size, 1)),
        finished_scores=jnp.full((batch_size, beam_size), NEG_INF, jnp.float32),
        live_seqs=live_seqs,
        finished_seqs=jnp.zeros_like(live_seqs),
        finished_flags=jnp.zeros((batch_size, beam_size), jnp.bool_),
        cache=_add_beam_dim(cache, beam_size),
    )

    def cond(state: _BeamState) -> jax.Array:
        # The best score a live hypothesis could still reach: log-probs only decrease, so for alpha >= 0 it is
        # the best live log-prob normalised at the longest length, for alpha < 0 at the shortest.
        best_length = jnp.where(alpha >= 0, max_decode_len, state.cur_index + 1)
        best_live = state.live_log_probs[:, :1] / brevity_penalty(alpha, best_length, length_penalty_style)
        worst_finished = jnp.min(state.finished_scores, axis=1, keepdims=True)
        worst_finished = jnp.where(state.finished_flags, worst_finished, NEG_INF)
        search_terminated = jnp.all(worst_finished > best_live)
        return (state.cur_index < max_decode_len) & ~search_terminated

    def body(state: _BeamState) -> _BeamState:
        i = state.cur_index
        cur_token = jax.lax.dynamic_slice_in_dim(state.live_seqs, i, 1, axis=2)  # [batch, beams, 1]
        logits, new_cache = tokens_to_logits(DecodingState(
            cur_index=i,
            sequences=_flatten_beam_dim(state.live_seqs),
            cur_token=_flatten_beam_dim(cur_token),
            cache=_flatten_beam_dim(state.cache),
            extras=extras,
        ))
        vocab_size = logits.shape[-1]
        logits = logits.reshape(batch_size, beam_size, vocab_size).astype(jnp.float32)
        new_cache = _unflatten_beam_dim(new_cache, batch_size, beam_size)

        # Top 2*beams continuations over all beams x vocab (sorted, best first).
        log_probs = jax.nn.log_softmax(logits, axis=-1) + state.live_log_probs[:, :, None]
        candidates = 2 * beam_size
        topk_log_probs, topk_indices = jax.lax.top_k(
            log_probs.reshape(batch_size, beam_size * vocab_size), candidates)
        topk_beams = topk_indices // vocab_size
        topk_ids = (topk_indices % vocab_size).astype(jnp.int32)
        topk_seqs = _gather_beams(state.live_seqs, topk_beams)
        topk_seqs = jax.lax.dynamic_update_slice_in_dim(topk_seqs, topk_ids[:, :, None], i + 1, axis=2)
        newly_finished = topk_ids == eos_id

        # Live set: the best `beams` continuations that did not just end.
        live_candidate_log_probs = jnp.where(newly_finished, NEG_INF, topk_log_probs)
        live_log_probs, live_pick = jax.lax.top_k(live_candidate_log_probs, beam_size)
        live_seqs = _gather_beams(topk_seqs, live_pick)
        live_cache = _gather_beams(new_cache, jnp.take_along_axis(topk_beams, live_pick, axis=1))

        # Finished set: merge the new finished candidates with the old ones, keep the best `beams`.
        # Continuations of the dummy initial beams (log-prob ~ NEG_INF) never count as finished.
        finishing = newly_finished & (topk_log_probs > NEG_INF / 2)
        if hf_style:
            in_top_beams = jnp.arange(candidates) < beam_size
            finishing = (finishing | (i + 1 == max_decode_len)) & in_top_beams[None, :]
        new_scores = topk_log_probs / brevity_penalty(alpha, i + 1, length_penalty_style)
        new_scores = jnp.where(finishing, new_scores, NEG_INF)
        all_scores = jnp.concatenate([state.finished_scores, new_scores], axis=1)
        finished_scores, finished_pick = jax.lax.top_k(all_scores, beam_size)
        finished_seqs = _gather_beams(jnp.concatenate([state.finished_seqs, topk_seqs], axis=1), finished_pick)
        finished_flags = jnp.take_along_axis(
            jnp.concatenate([state.finished_flags, finishing], axis=1), finished_pick, axis=1)

        return _BeamState(cur_index=i + 1, live_log_probs=live_log_probs, finished_scores=finished_scores,
                          live_seqs=live_seqs, finished_seqs=finished_seqs, finished_flags=finished_flags,
                          cache=live_cache)

    final = jax.lax.while_loop(cond, body, init)
    # An example with no finished hypothesis (no EOS within max_decode_len) returns its live beams.
    any_finished = jnp.any(final.finished_flags, axis=1)
    seqs = jnp.where(any_finished[:, None, None], final.finished_seqs, final.live_seqs)
    scores = jnp.where(any_finished[:, None], final.finished_scores, final.live_log_probs)
    return seqs[:, :, 1:], scores
