"""Batched, compiled T5 calls over an adapter table: tokenisation (host side), the cache of compiled functions
(one per function, static settings and argument shapes; compile time measured apart), and greedy/beam decoding
and teacher-forced scoring of example batches that may mix tasks (each row gathers its own adapter)."""
from __future__ import annotations

import functools
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from tagi_jax.models import predict as predict_lib
from tagi_jax.models.t5 import T5
from tagi_jax.models.tagi import fusion_kwargs


def tokenize(vocab, texts: Sequence[str], length: int, eos_id: int | None = None) -> tuple[np.ndarray, int]:
    """([len(texts), length] int32 tokens, number of texts that had to be truncated)."""
    eos = int(vocab.eos_id if eos_id is None else eos_id)
    out = np.zeros((len(texts), length), np.int32)
    truncated = 0
    for i, text in enumerate(texts):
        ids = list(vocab.encode(text))
        if len(ids) + 1 > length:
            truncated += 1
            ids = ids[: length - 1]
        ids.append(eos)
        out[i, : len(ids)] = ids
    return out, truncated


def detokenize(vocab, tokens: np.ndarray, eos_id: int | None = None) -> list[str]:
    """Token rows -> strings: cut at the first EOS, padding dropped."""
    eos = int(vocab.eos_id if eos_id is None else eos_id)
    texts = []
    for row in np.asarray(tokens):
        ids = []
        for t in row.tolist():
            if t == eos:
                break
            if t != 0:
                ids.append(int(t))
        texts.append(vocab.decode(ids))
    return texts


def shift_right(targets: np.ndarray, start_id: int = 0) -> np.ndarray:
    """Decoder inputs from targets: shifted right one position, `start_id` first."""
    dec = np.zeros_like(targets)
    dec[:, 1:] = targets[:, :-1]
    dec[:, 0] = start_id
    return dec


_COMPILED: "OrderedDict[Any, Any]" = OrderedDict()
_MAX_COMPILED = 32


def _arg_signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    sig = []
    for x in leaves:
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        sig.append((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))), sharding))
    return treedef, tuple(sig)


def compiled(fn: Callable, static: Mapping[str, Any], args: tuple) -> tuple[Callable, float]:
    """(compiled executable of `jax.jit(fn)` for these argument shapes, seconds spent compiling now)."""
    key = (fn, tuple(sorted(static.items())), _arg_signature(args))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    jitted = jax.jit(functools.partial(fn, **static))
    executable = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    _COMPILED[key] = executable
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return executable, seconds


def model_fusion(model) -> str:
    """The model's instruction fusion ("none" for a plain T5 or a model without one)."""
    return getattr(model.config, "fusion", "none")


def bucket(n: int, batch_size: int) -> int:
    """The batch shape for n rows: batch_size, or the next power of two >= 8 when n is smaller (few shapes,
    so few compilations, without computing a full batch for a handful of rows)."""
    return min(batch_size, max(8, 1 << max(0, n - 1).bit_length()))


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the last row (a real input: no all-padding rows)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _gather(table, rows):
    """Per-example factors (and fusion states) from the stacked table: rows [b] -> [b, ...]."""
    if table is None:
        return None, None, None
    adapters = {t: {"A": e["A"][rows], "B": e["B"][rows], "scale": e["scale"]} for t, e in table["adapters"].items()}
    states = table["states"][rows] if "states" in table else None
    mask = table["mask"][rows] if "mask" in table else None
    return adapters, states, mask


def _predict_fn(t5_params, table, rows, encoder_tokens, *, t5_config, fusion, max_decode_len, beam_size, alpha,
                length_penalty_style, eos_id, decoder_start_token_id):
    adapters, states, mask = _gather(table, rows)
    tokens, _ = predict_lib.predict(
        T5(t5_config), t5_params, encoder_tokens, adapters=adapters, max_decode_len=max_decode_len,
        beam_size=beam_size, alpha=alpha, eos_id=eos_id, decoder_start_token_id=decoder_start_token_id,
        length_penalty_style=length_penalty_style, **fusion_kwargs(fusion, states, mask))
    return tokens


def _score_fn(t5_params, table, rows, encoder_tokens, decoder_inputs, decoder_targets, *, t5_config, fusion):
    adapters, states, mask = _gather(table, rows)
    s = predict_lib.score_targets(T5(t5_config), t5_params, encoder_tokens, decoder_inputs, decoder_targets,
                                  adapters=adapters, **fusion_kwargs(fusion, states, mask))
    return s.sum, s.mean


def decode_tokens(model, params, table_tree, rows, encoder_tokens, *, vocab, batch_size: int,
                  max_decode_len: int = 128, beam_size: int = 1, alpha: float = 0.6,
                  length_penalty_style: str = "t5x") -> tuple[np.ndarray, float, float]:
    """Generated tokens [n, max_decode_len] for encoder tokens [n, len], example i using adapter row rows[i]
    of `table_tree` (`AdapterTable.device_tree()`, or None for no adapters); batches padded to one shape.

    Returns (tokens, decoding seconds, compile seconds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_total = len(encoder_tokens)
    rows = np.zeros(n_total, np.int32) if rows is None else np.asarray(rows, np.int32)
    t5_config = model.config.t5
    static = dict(t5_config=t5_config, fusion=model_fusion(model), max_decode_len=int(max_decode_len),
                  beam_size=int(beam_size), alpha=float(alpha), length_penalty_style=length_penalty_style,
                  eos_id=int(vocab.eos_id), decoder_start_token_id=int(t5_config.decoder_start_token_id))
    t5_params = params["t5"]
    bs = bucket(n_total, batch_size)
    out, seconds, compile_seconds = [], 0.0, 0.0
    for start in range(0, n_total, bs):
        n = min(bs, n_total - start)
        args = (t5_params, table_tree, pad_rows(rows[start:start + n], bs),
                pad_rows(encoder_tokens[start:start + n], bs))
        fn, c = compiled(_predict_fn, static, args)
        compile_seconds += c
        t0 = time.perf_counter()
        tokens = np.asarray(jax.device_get(fn(*args)))
        seconds += time.perf_counter() - t0
        out.append(tokens[:n])
    return np.concatenate(out), seconds, compile_seconds


def score_tokens(model, params, table_tree, rows, encoder_tokens, decoder_inputs, decoder_targets, *,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Teacher-forced log-likelihood of each row's targets (summed, token-averaged), row i using adapter
    rows[i]. Returns (sum [n], mean [n], seconds, compile seconds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_total = len(encoder_tokens)
    rows = np.zeros(n_total, np.int32) if rows is None else np.asarray(rows, np.int32)
    bs = bucket(n_total, batch_size)
    t5_params = params["t5"]
    total = np.zeros(n_total, np.float64)
    mean = np.zeros(n_total, np.float64)
    seconds = compile_seconds = 0.0
    for start in range(0, n_total, bs):
        n = min(bs, n_total - start)
        sl = slice(start, start + n)
        args = (t5_params, table_tree, pad_rows(rows[sl], bs), pad_rows(encoder_tokens[sl], bs),
                pad_rows(decoder_inputs[sl], bs), pad_rows(decoder_targets[sl], bs))
        fn, c = compiled(_score_fn, {"t5_config": model.config.t5, "fusion": model_fusion(model)}, args)
        compile_seconds += c
        t0 = time.perf_counter()
        s, m = jax.device_get(fn(*args))
        seconds += time.perf_counter() - t0
        total[sl] = np.asarray(s)[:n]
        mean[sl] = np.asarray(m)[:n]
    return total, mean, seconds, compile_seconds
