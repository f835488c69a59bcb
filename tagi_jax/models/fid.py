"""Fusion-in-Decoder (Izacard & Grave, 2021) on `tagi_jax.models.t5.T5`: each passage of an example is
encoded on its own, and the decoder cross-attends to all encoded passages at once.

Pure functions of (model, params, arrays), like `tagi_jax.models.tagi`; jit them at the call site. Dropout is
on iff an `rng` is given.

Passages are ``passage_tokens`` int ``[batch, n_passages, length]``: every row one tokenised
"question: ... context: ..." text, right-padded with 0 (an all-padding row is allowed: it is fully masked).
The encoder reads them as ``[batch * n_passages, length]`` in one call; its outputs are laid end to end,
``[batch, n_passages * length, d_model]``, and the decoder's cross-attention mask is the flattened tokens
``> 0``, exactly the mask `T5.decode` derives from the encoder tokens it is given. So the decoder runs
unchanged: one softmax over every passage's positions. (The decoder's cross-attention has no position bias,
so the passages' order does not matter to it.)

`FiDT5` is the same T5 (the same parameter tree) whose ``encode`` takes those flattened tokens
``[batch, n_passages * length]``: with it `tagi_jax.models.predict.predict`, which encodes its input
itself, generates from FiD inputs unchanged (greedy and beam search).
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from tagi_jax.models import lora
from tagi_jax.models.predict import predict
from tagi_jax.models.t5 import T5

PyTree = Any


def _rngs(rng: Optional[jax.Array]):
    return None if rng is None else {"dropout": rng}


def check_passage_tokens(passage_tokens: jax.Array) -> tuple[int, int, int]:
    """(batch, n_passages, length) of `passage_tokens`, or a ValueError saying what was expected."""
    shape = tuple(passage_tokens.shape)
    if len(shape) != 3:
        raise ValueError(f"fid: passage_tokens must have shape [batch, n_passages, length], got shape {shape}")
    if min(shape) < 1:
        raise ValueError(f"fid: passage_tokens [batch, n_passages, length] has an empty axis: shape {shape}")
    if not jnp.issubdtype(passage_tokens.dtype, jnp.integer):
        raise ValueError(f"fid: passage_tokens must be integer token ids, got dtype {passage_tokens.dtype}")
    return shape


def _check_decoder_tokens(name: str, tokens: Optional[jax.Array], batch: int,
                          length: Optional[int] = None) -> None:
    if tokens is None:
        return
    shape = tuple(tokens.shape)
    want_length = "dec_len" if length is None else str(length)
    if len(shape) != 2 or shape[0] != batch or (length is not None and shape[1] != length):
        raise ValueError(f"fid: {name} must have shape [batch={batch}, {want_length}] (batch of "
                         f"passage_tokens), got shape {shape}")


def passage_adapters(config, adapters: Optional[lora.Adapters], batch: int,
                     n_passages: int) -> Optional[lora.Adapters]:
    """The encoder's adapters for the ``[batch * n_passages, length]`` passage rows: per-example factors
    repeated so that every passage of example i reads example i's adapter (rows are example-major, as the
    reshape lays them out); shared factors (no batch axis, or batch 1) are left as they are."""
    # Checked against the example batch first: after repeating, a wrong batch would be reported against
    # batch * n_passages, a number the caller never wrote.
    lora.check_adapters(config, adapters, batch=batch)
    return lora.expand_batch(adapters, n_passages)


class FiDT5(T5):
    """`T5` whose encoder input is ``n_passages`` passages laid end to end, ``[batch, n_passages * length]``
    (`fid_encode`'s ``flat_tokens``); decoding, parameters and every other method are T5's."""

    n_passages: int = 1

    def encode(self, encoder_input_tokens, *, adapters: lora.Adapters | None = None,
               encoder_fusion_states=None, encoder_fusion_mask=None, enable_dropout: bool = False):
        """Each passage encoded on its own; outputs laid end to end: [batch, n_passages * length, d_model]."""
        if encoder_fusion_states is not None or encoder_fusion_mask is not None:
            raise ValueError("fid: encoder_fusion_states are not supported with Fusion-in-Decoder")
        batch, total = encoder_input_tokens.shape
        n = self.n_passages
        if n < 1 or total % n:
            raise ValueError(f"fid: encoder input length {total} is not n_passages={n} passages of equal length")
        rows = encoder_input_tokens.reshape(batch * n, total // n)
        encoded = super().encode(rows, adapters=passage_adapters(self.config, adapters, batch, n),
                                 enable_dropout=enable_dropout)
        return encoded.reshape(batch, total, encoded.shape[-1])


def fid_model(model: T5, n_passages: int) -> FiDT5:
    """The FiD view of `model` (same config, same parameter tree) for `n_passages` passages per example."""
    return FiDT5(model.config, n_passages=n_passages)


def fid_encode(model: T5, params: PyTree, passage_tokens: jax.Array, adapters: PyTree = None,
               rng: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """(encoded [batch, n_passages * length, d_model], flat_tokens [batch, n_passages * length]).

    One encoder call over all ``batch * n_passages`` passages. `adapters`: per-example (leading axis `batch`)
    or shared; the decoder's mask is ``flat_tokens > 0`` (pass `flat_tokens` where T5 wants encoder tokens).
    """
    batch, n, length = check_passage_tokens(passage_tokens)
    flat_tokens = passage_tokens.reshape(batch, n * length)
    encoded = fid_model(model, n).apply({"params": params}, flat_tokens, adapters=adapters,
                                        enable_dropout=rng is not None, rngs=_rngs(rng), method="encode")
    return encoded, flat_tokens


def fid_logits(model: T5, params: PyTree, passage_tokens: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: Optional[jax.Array] = None, adapters: PyTree = None,
               rng: Optional[jax.Array] = None) -> jax.Array:
    """Teacher-forced logits [batch, dec_len, vocab], the decoder attending to every passage at once.

    `decoder_target_tokens` (optional, shape of `decoder_input_tokens`) masks padded targets in the decoder's
    self-attention, as in `T5.__call__`; `adapters` apply to the encoder (per passage) and the decoder.
    """
    batch, n, length = check_passage_tokens(passage_tokens)
    _check_decoder_tokens("decoder_input_tokens", decoder_input_tokens, batch)
    _check_decoder_tokens("decoder_target_tokens", decoder_target_tokens, batch, decoder_input_tokens.shape[1])
    # T5.__call__ = encode (FiDT5's, per passage) + decode on the flat tokens: one apply, one dropout stream.
    return fid_model(model, n).apply(
        {"params": params}, passage_tokens.reshape(batch, n * length), decoder_input_tokens, decoder_target_tokens,
        adapters=adapters, enable_dropout=rng is not None, rngs=_rngs(rng))


def fid_predict(model: T5, params: PyTree, passage_tokens: jax.Array, *, adapters: PyTree = None,
                max_decode_len: int, beam_size: int = 1, **search_options) -> tuple[jax.Array, jax.Array]:
    """Generate from FiD inputs: `tagi_jax.models.predict.predict` on `FiDT5` (encode once, then greedy or
    beam search over the decode cache). Returns ``(tokens [batch, max_decode_len], scores [batch])``.

    `search_options`: `predict`'s other keyword arguments (alpha, eos_id, decoder_start_token_id,
    length_penalty_style, the "prepend" extra_encoder_*). Jit with static max_decode_len and beam_size.
    """
    batch, n, length = check_passage_tokens(passage_tokens)
    return predict(fid_model(model, n), params, passage_tokens.reshape(batch, n * length), adapters=adapters,
                   max_decode_len=max_decode_len, beam_size=beam_size, **search_options)


def fid_layout(tokens: jax.Array, n_passages: int, passage_length: int, eos_id: int = 1) -> jax.Array:
    """Passages laid end to end as EOS-terminated segments, ``[batch, len]`` (how the data pipeline tokenises a
    text holding `tagi_jax.features.PASSAGE_SEPARATOR`), into `FiDT5`'s fixed slots ``[batch, n_passages *
    passage_length]``: segment k goes to slot k, right-padded with 0. A segment longer than a slot keeps its
    first ``passage_length - 1`` tokens and EOS; segments past ``n_passages`` are dropped (a row with fewer
    passages leaves all-padding slots, which FiD masks out)."""
    if n_passages < 1 or passage_length < 2:
        raise ValueError(f"fid_layout: need n_passages >= 1 and passage_length >= 2, got {n_passages}, "
                         f"{passage_length}")
    tokens = jnp.asarray(tokens)
    batch, length = tokens.shape
    is_eos = tokens == eos_id
    segment = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS tokens before each position
    position = jnp.arange(length)
    # Start of each position's segment: one past the last EOS strictly before it.
    last_eos = jax.lax.cummax(jnp.where(is_eos, position, -1), axis=1)
    start = jnp.concatenate([jnp.zeros((batch, 1), last_eos.dtype), last_eos[:, :-1] + 1], axis=1)
    offset = position - start
    keep = (tokens != 0) & (segment < n_passages) & (offset < passage_length)
    width = n_passages * passage_length
    slot = jnp.where(keep, segment * passage_length + offset, width)  # `width`: out of range, dropped
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], (batch, length))
    out = jnp.zeros((batch, width), tokens.dtype).at[rows, slot].set(tokens, mode="drop")
    out = out.reshape(batch, n_passages, passage_length)
    # A cut segment lost its EOS: a full slot ends with EOS, as the feature converter truncates.
    last = out[:, :, -1]
    out = out.at[:, :, -1].set(jnp.where(last != 0, eos_id, 0).astype(tokens.dtype))
    return out.reshape(batch, width)

