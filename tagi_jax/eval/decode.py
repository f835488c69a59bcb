"""Batched, compiled T5 calls over an adapter table: tokenisation (host side), the cache of compiled functions
(one per function, static settings and argument shapes; compile time measured apart), and greedy/beam decoding
and teacher-forced scoring of example batches that may mix tasks (each row gathers its own adapter).

With "prepend" fusion the decoder cross-attends to the task's encoded instruction, whose keys/values are the
same for every instance of the task: they are projected once per task of the table (`_table_kv`, trimmed
to the table's longest instruction) and each row gathers its task's, instead of projecting them per instance."""
from __future__ import annotations

import functools
import time
from collections import OrderedDict
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from tagi_jax.features import PASSAGE_SEPARATOR
from tagi_jax.models import predict as predict_lib
from tagi_jax.models.fid import FiDT5, fid_layout
from tagi_jax.models.t5 import T5
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.tagi import fusion_kwargs


def tokenize(vocab, texts: Sequence[str], length: int, eos_id: int | None = None) -> tuple[np.ndarray, int]:
    """([len(texts), length] int32 tokens, number of texts that had to be truncated). A text holding
    `PASSAGE_SEPARATOR` is tokenised passage by passage, each ending with EOS, as the data pipeline does."""
    eos = int(vocab.eos_id if eos_id is None else eos_id)
    out = np.zeros((len(texts), length), np.int32)
    truncated = 0
    for i, text in enumerate(texts):
        ids = []
        for k, passage in enumerate(text.split(PASSAGE_SEPARATOR)):
            ids += ([eos] if k else []) + list(vocab.encode(passage))
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


def padded_rows(n: int) -> int:
    """The next power of two >= max(n, 8): the row count tables and batches are padded to (few shapes, so
    few compilations)."""
    return max(8, 1 << max(0, n - 1).bit_length())


def bucket(n: int, batch_size: int) -> int:
    """The batch shape for n rows: batch_size, or `padded_rows(n)` when n is smaller (without computing a full
    batch for a handful of rows)."""
    return min(batch_size, padded_rows(n))


def pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the last row (a real input: no all-padding rows)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _gather(table, rows, generator=None):
    """Per-example factors (and fusion states) from the stacked table: rows [b] -> [b, ...]; from an instance
    table (`adapters.InstanceAdapters`), generated here, inside the compiled step, by `generator` (the TAGI
    model) from the rows' own instructions."""
    if table is None:
        return None, None, None
    if "instance_tokens" in table:
        adapters, states, mask = tagi_lib.generate_adapters(generator, table["generator"],
                                                            table["instance_tokens"][rows])
        return (adapters, None, None) if model_fusion(generator) == "none" else (adapters, states, mask)
    adapters = {t: {"A": e["A"][rows], "B": e["B"][rows], "scale": e["scale"]} for t, e in table["adapters"].items()}
    states = table["states"][rows] if "states" in table else None
    mask = table["mask"][rows] if "mask" in table else None
    return adapters, states, mask


# Device memory the per-task instruction keys/values may take at once; a larger table is processed in groups
# of tasks (each group's keys/values computed once, its examples decoded, then released).
KV_TABLE_BYTES = 1 << 30


def _table_kv_fn(t5_params, table, *, t5_config):
    """Every decoder layer's cross-attention (k, v) of each task's instruction, [tasks, heads, n, d_kv]."""
    layers = predict_lib.project_cross_kv(T5(t5_config), t5_params, table["states"], table["adapters"])
    return {"layers": layers, "mask": table["mask"]}


def instruction_length(mask: np.ndarray) -> int:
    """Positions to keep of the padded instructions: the longest one, rounded up to a multiple of 8 (the
    rest is padding for every task, masked: dropping it changes nothing but the work)."""
    real = np.asarray(mask).any(axis=0).nonzero()[0]
    keep = int(real[-1]) + 1 if len(real) else 1
    return min(mask.shape[1], -(-keep // 8) * 8)


def _kv_groups(table, t5_config, fusion: str, rows: np.ndarray) -> list[tuple[int, int]] | None:
    """(first, end) table rows per group whose instruction keys/values fit KV_TABLE_BYTES; None: no
    per-task keys/values (no "prepend" fusion, or no table)."""
    if fusion != "prepend" or table is None or "states" not in table:
        return None
    used = int(np.max(rows)) + 1 if len(rows) else 1
    n = instruction_length(table["mask"])
    per_task = (2 * t5_config.num_decoder_layers * t5_config.inner_dim * n
                * np.dtype(t5_config.jnp_dtype).itemsize)
    size = max(1, min(used, KV_TABLE_BYTES // per_task))
    return [(g, min(g + size, used)) for g in range(0, used, size)]


def _table_kv(t5_params, table, group: tuple[int, int], t5_config, length: int) -> tuple[dict, float, float]:
    """(the group's per-task keys/values on the device, seconds, compile seconds); rows padded to a power of
    two >= 8 (repeating the last), as `AdapterTable.device_tree` pads the table."""
    first, end = group
    size = padded_rows(end - first)
    take = lambda x: pad_rows(np.asarray(x)[first:end], size)
    sub = {"adapters": {t: {"A": take(e["A"]), "B": take(e["B"]), "scale": e["scale"]}
                        for t, e in table["adapters"].items()},
           "states": take(table["states"])[:, :length], "mask": take(table["mask"])[:, :length]}
    fn, compile_seconds = compiled(_table_kv_fn, {"t5_config": t5_config}, (t5_params, sub))
    t0 = time.perf_counter()
    kv = jax.block_until_ready(fn(t5_params, sub))
    return kv, time.perf_counter() - t0, compile_seconds


def _fusion_inputs(fusion, states, mask, kv, kv_rows) -> dict:
    """T5 fusion keyword arguments: each row's task keys/values when precomputed, else `fusion_kwargs`."""
    if kv is None:
        return fusion_kwargs(fusion, states, mask)
    return {"extra_encoder_kv": tuple((k[kv_rows], v[kv_rows]) for k, v in kv["layers"]),
            "extra_encoder_mask": kv["mask"][kv_rows]}


def _backbone(t5_config, fid_passages: int) -> T5:
    """The T5 a compiled step runs: the Fusion-in-Decoder view over `fid_passages` slots, or the plain one."""
    return FiDT5(t5_config, n_passages=fid_passages) if fid_passages else T5(t5_config)


def fid_inputs(model, encoder_tokens: np.ndarray, passages: bool) -> tuple[np.ndarray, int]:
    """(encoder tokens, FiD slots): for a model with `fid_passages` reading passages (full inputs), the tokens
    laid out in its fixed passage slots (`fid_layout`); else unchanged and 0."""
    n = int(getattr(model.config, "fid_passages", 0) or 0)
    if not (passages and n):
        return encoder_tokens, 0
    laid = fid_layout(encoder_tokens, n, int(model.config.fid_passage_length), int(model.config.t5.eos_token_id))
    return np.asarray(laid), n


def _predict_fn(t5_params, table, kv, rows, kv_rows, encoder_tokens, *, t5_config, fusion, max_decode_len,
                beam_size, alpha, length_penalty_style, eos_id, decoder_start_token_id, generator, fid_passages):
    adapters, states, mask = _gather(table, rows, generator)
    tokens, _ = predict_lib.predict(
        _backbone(t5_config, fid_passages), t5_params, encoder_tokens, adapters=adapters, max_decode_len=max_decode_len,
        beam_size=beam_size, alpha=alpha, eos_id=eos_id, decoder_start_token_id=decoder_start_token_id,
        length_penalty_style=length_penalty_style, **_fusion_inputs(fusion, states, mask, kv, kv_rows))
    return tokens


def _score_fn(t5_params, table, kv, rows, kv_rows, encoder_tokens, decoder_inputs, decoder_targets, *, t5_config,
              fusion, generator, fid_passages):
    adapters, states, mask = _gather(table, rows, generator)
    s = predict_lib.score_targets(_backbone(t5_config, fid_passages), t5_params, encoder_tokens, decoder_inputs, decoder_targets,
                                  adapters=adapters, **_fusion_inputs(fusion, states, mask, kv, kv_rows))
    return s.sum, s.mean


def _batches(table, t5_params, t5_config, fusion, rows: np.ndarray, bs: int):
    """(example indices, per-task keys/values or None, their rows, kv seconds, kv compile seconds) per batch:
    the examples in order, group by group of tasks when the keys/values are per task (`_kv_groups`)."""
    groups = _kv_groups(table, t5_config, fusion, rows)
    if groups is None:
        for start in range(0, len(rows), bs):
            idx = np.arange(start, min(start + bs, len(rows)))
            yield idx, None, rows[idx], 0.0, 0.0
        return
    length = instruction_length(table["mask"])
    for first, end in groups:
        members = np.nonzero((rows >= first) & (rows < end))[0]
        if not len(members):
            continue
        kv, seconds, compile_seconds = _table_kv(t5_params, table, (first, end), t5_config, length)
        for start in range(0, len(members), bs):
            idx = members[start:start + bs]
            yield idx, kv, rows[idx] - first, seconds if start == 0 else 0.0, compile_seconds if start == 0 else 0.0


def _generator(model, table_tree):
    """The model a compiled step generates adapters with (static): only for an instance table."""
    return model if table_tree is not None and "instance_tokens" in table_tree else None


def decode_tokens(model, params, table_tree, rows, encoder_tokens, *, vocab, batch_size: int,
                  max_decode_len: int = 128, beam_size: int = 1, alpha: float = 0.6,
                  length_penalty_style: str = "t5x", passages: bool = False) -> tuple[np.ndarray, float, float]:
    """Generated tokens [n, max_decode_len] for encoder tokens [n, len], example i using adapter row rows[i]
    of `table_tree` (`AdapterTable.device_tree()` or `InstanceAdapters.device_tree()`, or None for no adapters);
    batches padded to one shape. `passages`: the tokens are full inputs, read with Fusion-in-Decoder when the
    model sets `fid_passages` (`fid_inputs`).

    Returns (tokens, decoding seconds, compile seconds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder_tokens, fid_passages = fid_inputs(model, encoder_tokens, passages)
    n_total = len(encoder_tokens)
    rows = np.zeros(n_total, np.int32) if rows is None else np.asarray(rows, np.int32)
    t5_config = model.config.t5
    static = dict(t5_config=t5_config, fusion=model_fusion(model), max_decode_len=int(max_decode_len),
                  beam_size=int(beam_size), alpha=float(alpha), length_penalty_style=length_penalty_style,
                  eos_id=int(vocab.eos_id), decoder_start_token_id=int(t5_config.decoder_start_token_id),
                  generator=_generator(model, table_tree), fid_passages=fid_passages)
    t5_params = params["t5"]
    bs = bucket(n_total, batch_size)
    out = np.zeros((n_total, int(max_decode_len)), np.int32)
    seconds = compile_seconds = 0.0
    for idx, kv, kv_rows, kv_s, kv_c in _batches(table_tree, t5_params, t5_config, static["fusion"], rows, bs):
        n = len(idx)
        args = (t5_params, table_tree, kv, pad_rows(rows[idx], bs), pad_rows(kv_rows, bs),
                pad_rows(encoder_tokens[idx], bs))
        fn, c = compiled(_predict_fn, static, args)
        compile_seconds += c + kv_c
        t0 = time.perf_counter()
        tokens = np.asarray(jax.device_get(fn(*args)))
        seconds += time.perf_counter() - t0 + kv_s
        out[idx] = tokens[:n]
    return out, seconds, compile_seconds


def score_tokens(model, params, table_tree, rows, encoder_tokens, decoder_inputs, decoder_targets, *,
                 batch_size: int, passages: bool = False) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Teacher-forced log-likelihood of each row's targets (summed, token-averaged), row i using adapter
    rows[i] (`passages` as in `decode_tokens`). Returns (sum [n], mean [n], seconds, compile seconds)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    encoder_tokens, fid_passages = fid_inputs(model, encoder_tokens, passages)
    n_total = len(encoder_tokens)
    rows = np.zeros(n_total, np.int32) if rows is None else np.asarray(rows, np.int32)
    bs = bucket(n_total, batch_size)
    t5_params = params["t5"]
    total = np.zeros(n_total, np.float64)
    mean = np.zeros(n_total, np.float64)
    seconds = compile_seconds = 0.0
    static = {"t5_config": model.config.t5, "fusion": model_fusion(model), "generator": _generator(model, table_tree),
              "fid_passages": fid_passages}
    for idx, kv, kv_rows, kv_s, kv_c in _batches(table_tree, t5_params, model.config.t5, static["fusion"], rows, bs):
        n = len(idx)
        args = (t5_params, table_tree, kv, pad_rows(rows[idx], bs), pad_rows(kv_rows, bs),
                pad_rows(encoder_tokens[idx], bs), pad_rows(decoder_inputs[idx], bs),
                pad_rows(decoder_targets[idx], bs))
        fn, c = compiled(_score_fn, static, args)
        compile_seconds += c + kv_c
        t0 = time.perf_counter()
        s, m = jax.device_get(fn(*args))
        seconds += time.perf_counter() - t0 + kv_s
        total[idx] = np.asarray(s)[:n]
        mean[idx] = np.asarray(m)[:n]
    return total, mean, seconds, compile_seconds
