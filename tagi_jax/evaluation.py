"""Evaluation of a trained model (TAGI or a baseline): adapters generated once per task, mixed-task decoding,
SNI metrics, P3 rank classification, timing.

Why it is organised this way (the point of TAGI is the inference cost):

* `generate_task_adapters` reads every *distinct* instruction once, in batches of instructions (one compiled
  call per batch shape), and stacks the results into an `AdapterTable` (row = instruction). An `AdapterCache`
  keeps generated adapters in memory for the run and, given a directory, on disk keyed by a hash of the
  instruction text and of the checkpoint (`params_fingerprint`: the parameters adapters depend on + the model
  config), so a second run generates none and a changed checkpoint invalidates them.
* `evaluate` decodes batches that may mix tasks: each example carries the row of its adapter, and the
  compiled step gathers per-example factors from the table (`lora` applies them factorised, batched). No
  per-task batching, no merged weights. Greedy (the SNI protocol, up to 128 tokens) or beam search.
* `evaluate_rank_classification` scores every answer choice with the task's adapter (token-averaged
  log-likelihood), then accuracy per template and the P3 averages (`metrics.p3_summary`).

Methods (`METHODS`): "tagi"/"hint" generate adapters from `hyper_inputs` and read `inputs` (+ the encoded
instruction when the model fuses it, in the decoder or in every encoder layer); "concat" runs the backbone on `full_inputs`; "no_instruction" on
`inputs`. Compiled functions are cached per (model, shapes, static settings); compile time is measured and
reported apart from generation and decoding time.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax import decoding
from tagi_jax import features as F
from tagi_jax import metrics as metrics_lib

METHODS = ("tagi", "hint", "concat", "no_instruction")
ADAPTER_METHODS = ("tagi", "hint")
# The encoder input each method reads.
METHOD_INPUT = {"tagi": F.INPUTS, "hint": F.INPUTS, "concat": F.FULL_INPUTS, "no_instruction": F.INPUTS}
CATEGORY = "category"
ANSWER_CHOICES, LABEL = "answer_choices", "label"


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return method


# ---------------------------------------------------------------------------------------------------------------
# Tokenisation (host side, numpy): EOS appended, truncated keeping EOS last, right-padded with 0.
# ---------------------------------------------------------------------------------------------------------------


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
    dec = np.zeros_like(targets)
    dec[:, 1:] = targets[:, :-1]
    dec[:, 0] = start_id
    return dec


# ---------------------------------------------------------------------------------------------------------------
# Compiled functions, cached per (function, static settings, argument shapes).
# ---------------------------------------------------------------------------------------------------------------

_COMPILED: "OrderedDict[Any, Any]" = OrderedDict()
_MAX_COMPILED = 32


def _arg_signature(args) -> tuple:
    leaves, treedef = jax.tree.flatten(args)
    sig = []
    for x in leaves:
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        sig.append((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))), sharding))
    return treedef, tuple(sig)


def _compiled(fn: Callable, static: Mapping[str, Any], args: tuple) -> tuple[Callable, float]:
    """(compiled executable of `jax.jit(fn)` for these argument shapes, seconds spent compiling now)."""
    key = (fn, tuple(sorted(static.items())), _arg_signature(args))
    if key in _COMPILED:
        _COMPILED.move_to_end(key)
        return _COMPILED[key], 0.0
    start = time.perf_counter()
    jitted = jax.jit(functools.partial(fn, **static))
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    _COMPILED[key] = compiled
    while len(_COMPILED) > _MAX_COMPILED:
        _COMPILED.popitem(last=False)
    return compiled, seconds


def _t5(t5_config):
    from tagi_jax.models.t5 import T5

    return T5(t5_config)


def _generator_params(params) -> dict:
    """The subtrees adapter generation reads (so compiled generators do not depend on e.g. the teachers)."""
    return {k: params[k] for k in ("t5", "hypernet", "hyper_encoder") if k in params}


def _fusion(model) -> str:
    return getattr(model.config, "fusion", "none")


def _uses_fusion(model) -> bool:
    """Whether the model reads the encoded instruction besides the adapters (so the table keeps its states)."""
    return _fusion(model) != "none"


def _fusion_kwargs(fusion: str, states, mask) -> dict:
    from tagi_jax.models.tagi import fusion_kwargs

    return fusion_kwargs(fusion, states, mask)


def _generate_fn(params, hyper_tokens, *, model):
    """Instructions [b, n] -> (adapters [b, ...], states [b, n, d] | None, mask [b, n] | None)."""
    from tagi_jax.models import tagi as tagi_lib

    adapters, states, mask = tagi_lib.generate_adapters(model, params, hyper_tokens)
    if not _uses_fusion(model):
        states = mask = None
    return adapters, states, mask


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
    tokens, _ = decoding.predict(
        _t5(t5_config), t5_params, encoder_tokens, adapters=adapters, max_decode_len=max_decode_len,
        beam_size=beam_size, alpha=alpha, eos_id=eos_id, decoder_start_token_id=decoder_start_token_id,
        length_penalty_style=length_penalty_style, **_fusion_kwargs(fusion, states, mask))
    return tokens


def _score_fn(t5_params, table, rows, encoder_tokens, decoder_inputs, decoder_targets, *, t5_config, fusion):
    adapters, states, mask = _gather(table, rows)
    s = decoding.score_targets(_t5(t5_config), t5_params, encoder_tokens, decoder_inputs, decoder_targets,
                               adapters=adapters, **_fusion_kwargs(fusion, states, mask))
    return s.sum, s.mean


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint fingerprint and the adapter cache.
# ---------------------------------------------------------------------------------------------------------------


def _adapter_relevant(path: tuple[str, ...], has_hypernet: bool) -> bool:
    """Parameters a generated adapter (and the fused instruction states) can depend on."""
    if not has_hypernet:
        return True
    return path[0] in ("hypernet", "hyper_encoder") or path[:2] in (("t5", "token_embedder"), ("t5", "encoder"))


def _leaf_digest(x) -> bytes:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        # Multi-host arrays cannot be fetched to one host: hash statistics computed on the devices instead.
        v = jnp.ravel(x).astype(jnp.float32)
        stats = jax.jit(lambda v: jnp.stack([jnp.sum(v), jnp.sum(v * v),
                                             jnp.sum(v * jnp.cos(jnp.arange(v.size, dtype=jnp.float32)))]))(v)
        return np.asarray(jax.device_get(stats)).tobytes()
    return np.ascontiguousarray(np.asarray(jax.device_get(x))).tobytes()


def params_fingerprint(params, model=None) -> str:
    """sha256 over the model config and every parameter adapters depend on (encoder, embeddings, hypernetwork):
    the checkpoint identity the adapter cache is keyed by. A changed checkpoint changes it."""
    from flax import traverse_util
    import flax

    h = hashlib.sha256()
    if model is not None:
        h.update(repr(model.config).encode())
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    has_hypernet = any(p[0] == "hypernet" for p in flat)
    for path in sorted(flat):
        if not _adapter_relevant(path, has_hypernet):
            continue
        x = flat[path]
        h.update(("/".join(map(str, path)) + f":{tuple(np.shape(x))}:{getattr(x, 'dtype', '')}").encode())
        h.update(_leaf_digest(x))
    return h.hexdigest()


Entry = dict  # {"A/<target>": [L, d_in, r], "B/<target>": [L, r, d_out], "scale/<target>": (), "states", "mask"}


def _entry_key(instruction: str, hyper_len: int) -> str:
    return hashlib.sha256(f"{hyper_len}\0{instruction}".encode("utf-8")).hexdigest()[:40]


class AdapterCache:
    """Generated adapters by (checkpoint fingerprint, instruction, instruction length).

    In memory for the run; with `directory`, also on disk as
    `<directory>/<fingerprint[:24]>/<sha256(hyper_len, instruction)[:40]>.npz`, so a second run over the same
    checkpoint generates nothing, and a changed checkpoint (new fingerprint) never sees stale adapters. Only
    process 0 writes; every process may read. `fingerprint` pins the checkpoint identity instead of hashing
    the parameters (e.g. for very large models whose identity is known).
    """

    def __init__(self, directory: str | None = None, fingerprint: str | None = None):
        self.directory = directory
        self.fixed_fingerprint = fingerprint
        self._memory: dict[tuple[str, str], Entry] = {}
        self._fingerprints: list[tuple[Any, Any, str]] = []  # (params, model, fingerprint), params kept alive
        self.memory_hits = self.disk_hits = self.stored = 0

    def fingerprint(self, params, model=None) -> str:
        if self.fixed_fingerprint is not None:
            return self.fixed_fingerprint
        for p, m, fp in self._fingerprints:
            if p is params and m == model:
                return fp
        fp = params_fingerprint(params, model)
        self._fingerprints = (self._fingerprints + [(params, model, fp)])[-4:]
        return fp

    def _path(self, fingerprint: str, key: str) -> str:
        return os.path.join(self.directory, fingerprint[:24], key + ".npz")

    def get(self, fingerprint: str, instruction: str, hyper_len: int) -> Entry | None:
        key = _entry_key(instruction, hyper_len)
        entry = self._memory.get((fingerprint, key))
        if entry is not None:
            self.memory_hits += 1
            return entry
        if self.directory is None:
            return None
        path = self._path(fingerprint, key)
        if not os.path.isfile(path):
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                entry = {k: data[k] for k in data.files}
        except (OSError, ValueError):  # a torn or foreign file: regenerate
            return None
        if str(entry.pop("__instruction__", "")) != instruction:
            return None  # hash collision (or a foreign file): never use it
        self._memory[(fingerprint, key)] = entry
        self.disk_hits += 1
        return entry

    def put(self, fingerprint: str, instruction: str, hyper_len: int, entry: Entry) -> None:
        key = _entry_key(instruction, hyper_len)
        self._memory[(fingerprint, key)] = entry
        self.stored += 1
        if self.directory is None or jax.process_index() != 0:
            return
        path = self._path(fingerprint, key)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".tmp{os.getpid()}.npz"
        np.savez(tmp, __instruction__=np.asarray(instruction), **entry)
        os.replace(tmp, path)


@dataclasses.dataclass
class AdapterTable:
    """Stacked generated adapters, one row per distinct instruction.

    adapters: {target: {"A": [n, layers, d_in, r], "B": [n, layers, r, d_out], "scale": ()}}
    states/mask: [n, hyper_len, d_model] / [n, hyper_len] encoded instructions (fusion models only).
    index: instruction text -> row.
    """

    adapters: dict
    states: np.ndarray | None
    mask: np.ndarray | None
    index: dict[str, int]
    generated: int = 0          # instructions that went through the hypernetwork in this call
    reused: int = 0             # instructions served by the cache
    generator_calls: int = 0    # compiled calls (batches of instructions)
    seconds: float = 0.0        # generation time (excluding compilation)
    compile_seconds: float = 0.0
    fingerprint: str = ""

    def __len__(self) -> int:
        return len(self.index)

    def rows(self, instructions: Sequence[str]) -> np.ndarray:
        try:
            return np.asarray([self.index[i] for i in instructions], np.int32)
        except KeyError as e:
            raise KeyError(f"AdapterTable: no adapter for instruction {str(e.args[0])[:80]!r}") from None

    def device_tree(self) -> dict:
        """The table as the compiled functions take it: rows padded (repeating the last) to a power of two
        >= 8, so tables of similar size share one compiled function."""
        n = len(self.index)
        size = max(8, 1 << max(0, n - 1).bit_length())
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], size - n, axis=0)]) if size > n else x
        tree = {"adapters": {t: {"A": pad(e["A"]), "B": pad(e["B"]), "scale": e["scale"]}
                             for t, e in self.adapters.items()}}
        if self.states is not None:
            tree["states"] = pad(self.states)
            tree["mask"] = pad(self.mask)
        return tree

    def adapter(self, instruction: str) -> dict:
        """One instruction's adapter (factors without a batch axis)."""
        row = self.index[instruction]
        return {t: {"A": e["A"][row], "B": e["B"][row], "scale": e["scale"]} for t, e in self.adapters.items()}


def _check_instructions(instructions: Sequence[str], names: Sequence[str] | None = None) -> None:
    for i, text in enumerate(instructions):
        if not isinstance(text, str) or not text.strip():
            where = f" (task {names[i]!r})" if names is not None else ""
            raise ValueError(f"instruction {i}{where} is empty: TAGI generates the adapter from the instruction "
                             "text (hyper_inputs); give the task definition")


def _split_entries(adapters, states, mask, n: int) -> list[Entry]:
    adapters = jax.device_get(adapters)
    states = None if states is None else np.asarray(jax.device_get(states))
    mask = None if mask is None else np.asarray(jax.device_get(mask))
    out = []
    for i in range(n):
        entry = {}
        for target, e in adapters.items():
            entry[f"A/{target}"] = np.asarray(e["A"][i])
            entry[f"B/{target}"] = np.asarray(e["B"][i])
            entry[f"scale/{target}"] = np.asarray(e["scale"], np.float32)
        if states is not None:
            entry["states"] = states[i]
            entry["mask"] = mask[i]
        out.append(entry)
    return out


def _stack_entries(entries: Sequence[Entry], fusion: bool) -> tuple[dict, np.ndarray | None, np.ndarray | None]:
    targets = sorted(k[2:] for k in entries[0] if k.startswith("A/"))
    adapters = {}
    for t in targets:
        scales = {float(e[f"scale/{t}"]) for e in entries}
        if len(scales) != 1:
            raise ValueError(f"AdapterTable: target {t!r} has different scales {sorted(scales)} across adapters")
        adapters[t] = {"A": np.stack([e[f"A/{t}"] for e in entries]), "B": np.stack([e[f"B/{t}"] for e in entries]),
                       "scale": np.float32(scales.pop())}
    if not fusion:
        return adapters, None, None
    return adapters, np.stack([e["states"] for e in entries]), np.stack([e["mask"] for e in entries])


def generate_task_adapters(
    model,
    params,
    instructions: Sequence[str],
    vocab,
    hyper_len: int,
    batch_size: int,
    cache: AdapterCache | None = None,
    *,
    task_names: Sequence[str] | None = None,
) -> AdapterTable:
    """Adapters for every distinct instruction, generated once each, in batches of `batch_size` instructions.

    Instructions already in `cache` (memory or disk, same checkpoint) are reused; the rest go through one
    compiled hypernetwork call per batch (the last batch is padded to the same shape). Returns the stacked
    `AdapterTable` (row order = first occurrence in `instructions`).
    """
    _check_instructions(instructions, task_names)
    if batch_size < 1:
        raise ValueError(f"generate_task_adapters: batch_size must be >= 1, got {batch_size}")
    distinct = list(dict.fromkeys(instructions))
    cache = cache if cache is not None else AdapterCache()
    fingerprint = cache.fingerprint(params, model)
    fusion = _uses_fusion(model)
    entries: dict[str, Entry] = {}
    for text in distinct:
        entry = cache.get(fingerprint, text, hyper_len)
        if entry is not None and (not fusion or "states" in entry):
            entries[text] = entry
    missing = [t for t in distinct if t not in entries]
    table = AdapterTable({}, None, None, {}, reused=len(distinct) - len(missing), fingerprint=fingerprint)
    if missing:
        bs = _bucket(len(missing), batch_size)
        tokens, truncated = tokenize(vocab, missing, hyper_len)
        if truncated:
            import warnings

            warnings.warn(f"generate_task_adapters: {truncated} of {len(missing)} instructions were truncated to "
                          f"hyper_inputs length {hyper_len}", stacklevel=2)
        for start in range(0, len(missing), bs):
            chunk = tokens[start:start + bs]
            n = len(chunk)
            if n < bs:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
            gen_params = _generator_params(params)
            fn, compile_s = _compiled(_generate_fn, {"model": model}, (gen_params, chunk))
            table.compile_seconds += compile_s
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(gen_params, chunk))
            table.seconds += time.perf_counter() - t0
            table.generator_calls += 1
            for text, entry in zip(missing[start:start + n], _split_entries(*out, n)):
                entries[text] = entry
                cache.put(fingerprint, text, hyper_len, entry)
        table.generated = len(missing)
    table.adapters, table.states, table.mask = _stack_entries([entries[t] for t in distinct], fusion)
    table.index = {t: i for i, t in enumerate(distinct)}
    return table


# ---------------------------------------------------------------------------------------------------------------
# Examples.
# ---------------------------------------------------------------------------------------------------------------


def _check_examples(examples: Sequence[Mapping], method: str, extra: Sequence[str] = ()) -> None:
    if not examples:
        raise ValueError("evaluate: no examples")
    needed = [METHOD_INPUT[method], F.TASK_NAME, *extra]
    if method in ADAPTER_METHODS:
        needed.append(F.HYPER_INPUTS)
    for i, ex in enumerate(examples):
        for key in needed:
            if key not in ex:
                raise KeyError(f"evaluate: example {i} (task {ex.get(F.TASK_NAME, '?')!r}) has no {key!r} feature "
                               f"(method {method!r} needs {needed})")


def _references(ex: Mapping) -> list[str]:
    refs = ex.get(F.REFERENCES)
    if refs is None:
        refs = [ex[F.TARGETS]]
    elif isinstance(refs, str):
        refs = [refs]
    return [str(r) for r in refs]


def _example_id(ex: Mapping, i: int) -> str:
    return str(ex["id"]) if "id" in ex else f"{ex[F.TASK_NAME]}-{i}"


def _bucket(n: int, batch_size: int) -> int:
    """The batch shape for n rows: batch_size, or the next power of two >= 8 when n is smaller (few shapes,
    so few compilations, without computing a full batch for a handful of rows)."""
    return min(batch_size, max(8, 1 << max(0, n - 1).bit_length()))


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    """Pad the leading axis to `size` by repeating the last row (a real input: no all-padding rows)."""
    if len(x) == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - len(x), axis=0)])


def _adapter_setup(method, model, params, examples, vocab, lengths, batch_size, cache):
    """(table or None, rows [n] or zeros): the generated adapters the examples use."""
    if method not in ADAPTER_METHODS:
        return None, np.zeros(len(examples), np.int32)
    if not hasattr(model.config, "hypernet"):
        raise ValueError(f"evaluate: method {method!r} needs a TAGI model (with a hypernetwork), got "
                         f"{type(model).__name__}")
    instructions = [ex[F.HYPER_INPUTS] for ex in examples]
    table = generate_task_adapters(model, params, instructions, vocab, int(lengths[F.HYPER_INPUTS]), batch_size,
                                   cache, task_names=[ex[F.TASK_NAME] for ex in examples])
    return table, table.rows(instructions)


def _timing(n: int, table: AdapterTable | None, seconds: float, compile_seconds: float) -> dict:
    gen = table.seconds if table is not None else 0.0
    out = {
        "num_examples": n,
        "adapter_generation_seconds": round(gen, 4),
        "adapter_compile_seconds": round(table.compile_seconds, 4) if table is not None else 0.0,
        "adapters_generated": table.generated if table is not None else 0,
        "adapters_reused": table.reused if table is not None else 0,
        "generator_calls": table.generator_calls if table is not None else 0,
        "decoding_seconds": round(seconds, 4),
        "decoding_compile_seconds": round(compile_seconds, 4),
        "examples_per_second": round(n / seconds, 3) if seconds > 0 else None,
        "end_to_end_examples_per_second": round(n / (seconds + gen), 3) if seconds + gen > 0 else None,
    }
    return out


# ---------------------------------------------------------------------------------------------------------------
# Generation (SNI protocol) and rank classification (P3).
# ---------------------------------------------------------------------------------------------------------------


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
    static = dict(t5_config=t5_config, fusion=_fusion(model), max_decode_len=int(max_decode_len),
                  beam_size=int(beam_size), alpha=float(alpha), length_penalty_style=length_penalty_style,
                  eos_id=int(vocab.eos_id), decoder_start_token_id=int(t5_config.decoder_start_token_id))
    t5_params = params["t5"]
    bs = _bucket(n_total, batch_size)
    out, seconds, compile_seconds = [], 0.0, 0.0
    for start in range(0, n_total, bs):
        n = min(bs, n_total - start)
        args = (t5_params, table_tree, _pad_rows(rows[start:start + n], bs),
                _pad_rows(encoder_tokens[start:start + n], bs))
        fn, c = _compiled(_predict_fn, static, args)
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
    bs = _bucket(n_total, batch_size)
    t5_params = params["t5"]
    total = np.zeros(n_total, np.float64)
    mean = np.zeros(n_total, np.float64)
    seconds = compile_seconds = 0.0
    for start in range(0, n_total, bs):
        n = min(bs, n_total - start)
        sl = slice(start, start + n)
        args = (t5_params, table_tree, _pad_rows(rows[sl], bs), _pad_rows(encoder_tokens[sl], bs),
                _pad_rows(decoder_inputs[sl], bs), _pad_rows(decoder_targets[sl], bs))
        fn, c = _compiled(_score_fn, {"t5_config": model.config.t5, "fusion": _fusion(model)}, args)
        compile_seconds += c
        t0 = time.perf_counter()
        s, m = jax.device_get(fn(*args))
        seconds += time.perf_counter() - t0
        total[sl] = np.asarray(s)[:n]
        mean[sl] = np.asarray(m)[:n]
    return total, mean, seconds, compile_seconds


def evaluate(
    method: str,
    model,
    params,
    examples: Sequence[Mapping[str, Any]],
    vocab,
    *,
    lengths: Mapping[str, int],
    batch_size: int,
    max_decode_len: int = 128,
    beam_size: int = 1,
    cache: AdapterCache | None = None,
    categories: Mapping[str, str] | None = None,
    alpha: float = 0.6,
    length_penalty_style: str = "t5x",
) -> tuple[list[dict], dict]:
    """Decode every example and score it with the official SNI metrics.

    Args:
      method: one of METHODS (see the module docstring for what each reads).
      model, params: a `tagi_jax.models.tagi.TAGI` and its parameter tree (baselines use `params["t5"]`).
      examples: dicts with the string features, `task_name`, `references` (or `targets`), optionally `id` and
        `category`. Batches mix tasks freely.
      lengths: token lengths per text feature (`inputs`, `hyper_inputs`, `full_inputs`).
      batch_size: examples per decoding batch, and instructions per generation batch.
      max_decode_len, beam_size: greedy when beam_size == 1 (SNI: 128 tokens), else beam search.
      categories: task name -> category, for examples without a `category` field.
    Returns:
      (records [{"id", "task_name", "prediction", "references"}], metrics): `sni_metrics` overall, `per_task`,
      `per_category` (when every example has a category), plus timing and truncation counts.
    """
    check_method(method)
    _check_examples(examples, method)
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    table, rows = _adapter_setup(method, model, params, examples, vocab, lengths, batch_size, cache)
    input_key = METHOD_INPUT[method]
    enc, truncated = tokenize(vocab, [ex[input_key] for ex in examples], int(lengths[input_key]))
    tree = table.device_tree() if table is not None else None
    tokens, seconds, compile_seconds = decode_tokens(
        model, params, tree, rows, enc, vocab=vocab, batch_size=batch_size, max_decode_len=max_decode_len,
        beam_size=beam_size, alpha=alpha, length_penalty_style=length_penalty_style)
    predictions = detokenize(vocab, tokens)

    references = [_references(ex) for ex in examples]
    task_names = [str(ex[F.TASK_NAME]) for ex in examples]
    cats = _categories(examples, categories)
    result = metrics_lib.sni_metrics(predictions, references, task_names, cats)
    result.update(_timing(len(examples), table, seconds, compile_seconds))
    result.update({"method": method, "num_tasks": len(set(task_names)), "beam_size": int(beam_size),
                   "max_decode_len": int(max_decode_len), "truncated_inputs": truncated})
    records = [{"id": _example_id(ex, i), "task_name": task_names[i], "prediction": predictions[i],
                "references": references[i]} for i, ex in enumerate(examples)]
    return records, result


def _categories(examples, categories: Mapping[str, str] | None) -> list[str] | None:
    out = []
    for ex in examples:
        c = ex.get(CATEGORY)
        if c is None and categories is not None:
            c = categories.get(str(ex[F.TASK_NAME]))
        if c is None:
            return None
        out.append(str(c))
    return out


def evaluate_rank_classification(
    method: str,
    model,
    params,
    examples: Sequence[Mapping[str, Any]],
    vocab,
    *,
    lengths: Mapping[str, int],
    batch_size: int,
    cache: AdapterCache | None = None,
    length_normalize: bool = True,
) -> tuple[list[dict], dict]:
    """T0-style rank classification: every answer choice scored with the example's adapter, best one wins.

    Examples carry `answer_choices` (strings) and `label` (index of the correct one). The score of a choice is
    its token-averaged log-likelihood (`length_normalize=False`: the summed one). Accuracy per task (a P3
    task is one template), overall, and, for `p3_<dataset>_<template>` task names, `metrics.p3_summary`
    (per-dataset means over templates, MTest11 and HyperT5 averages).
    """
    check_method(method)
    _check_examples(examples, method, extra=(ANSWER_CHOICES, LABEL))
    table, rows = _adapter_setup(method, model, params, examples, vocab, lengths, batch_size, cache)
    input_key = METHOD_INPUT[method]
    flat_example, flat_texts, flat_choices = [], [], []
    for i, ex in enumerate(examples):
        choices = [str(c) for c in ex[ANSWER_CHOICES]]
        if not choices:
            raise ValueError(f"evaluate_rank_classification: example {i} (task {ex[F.TASK_NAME]!r}) has no answer choices")
        if not 0 <= int(ex[LABEL]) < len(choices):
            raise ValueError(f"evaluate_rank_classification: example {i} (task {ex[F.TASK_NAME]!r}) has label "
                             f"{ex[LABEL]} but {len(choices)} answer choices")
        for c in choices:
            flat_example.append(i)
            flat_choices.append(c)
        flat_texts.append(ex[input_key])
    enc_per_example, truncated = tokenize(vocab, flat_texts, int(lengths[input_key]))
    targets, truncated_targets = tokenize(vocab, flat_choices, int(lengths[F.TARGETS]))
    flat_example = np.asarray(flat_example, np.int32)
    enc = enc_per_example[flat_example]
    dec = shift_right(targets, int(model.config.t5.decoder_start_token_id))
    tree = table.device_tree() if table is not None else None
    total, mean, seconds, compile_seconds = score_tokens(model, params, tree, rows[flat_example], enc, dec, targets,
                                                         batch_size=batch_size)
    scores = mean if length_normalize else total

    per_example_scores: list[list[float]] = [[] for _ in examples]
    for i, s in zip(flat_example.tolist(), scores.tolist()):
        per_example_scores[i].append(s)
    by_task: dict[str, list[int]] = {}
    records = []
    for i, ex in enumerate(examples):
        task = str(ex[F.TASK_NAME])
        by_task.setdefault(task, []).append(i)
        choices = [str(c) for c in ex[ANSWER_CHOICES]]
        pick = int(np.argmax(per_example_scores[i]))
        records.append({"id": _example_id(ex, i), "task_name": task, "prediction": choices[pick],
                        "references": [choices[int(ex[LABEL])]], "label": int(ex[LABEL]), "choice": pick,
                        "scores": [round(s, 6) for s in per_example_scores[i]]})
    per_task = {
        task: metrics_lib.rank_classification_accuracy([per_example_scores[i] for i in idx],
                                                       [int(examples[i][LABEL]) for i in idx])
        for task, idx in by_task.items()
    }
    result: dict = {
        "accuracy": metrics_lib.rank_classification_accuracy(per_example_scores, [int(ex[LABEL]) for ex in examples]),
        "per_task": per_task,
    }
    try:
        result["p3"] = metrics_lib.p3_summary(per_task)
    except ValueError:
        pass  # task names that are not P3 templates: per-task accuracies only
    result.update(_timing(len(examples), table, seconds, compile_seconds))
    result.update({"method": method, "num_tasks": len(per_task), "num_choices_scored": int(len(flat_example)),
                   "length_normalized": bool(length_normalize), "truncated_inputs": truncated,
                   "truncated_choices": truncated_targets})
    return records, result


# ---------------------------------------------------------------------------------------------------------------
# Reading evaluation examples from registered SeqIO tasks (string features, before tokenisation).
# ---------------------------------------------------------------------------------------------------------------


def _py(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()] if value.ndim else _py(value.item())
    if isinstance(value, (list, tuple)):
        return [_py(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def task_examples(task_or_mixture: str, split: str | None = None, max_per_task: int | None = None,
                  categories: Mapping[str, str] | None = None) -> list[dict]:
    """The string features (+ references, answer choices, label) of a registered task's or mixture's
    evaluation split, read from the source (no tokenisation), tasks in name order, `id` = `<task>-<i>`.

    `split` None picks "test" if the task has it, else "validation". Unknown names give a clear error.
    """
    import seqio

    try:
        provider = seqio.get_mixture_or_task(task_or_mixture)
    except ValueError:
        raise ValueError(f"unknown task or mixture {task_or_mixture!r}: not registered") from None
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    out = []
    for task in sorted(tasks, key=lambda t: t.name):
        task_split = split or ("test" if "test" in task.splits else "validation")
        if task_split not in task.splits:
            raise ValueError(f"task {task.name!r} has no split {task_split!r} (has {list(task.splits)})")
        ds = task.source.get_dataset(split=task_split, shuffle=False)
        if max_per_task is not None:
            ds = ds.take(max_per_task)
        for i, ex in enumerate(ds.as_numpy_iterator()):
            row = {k: _py(v) for k, v in ex.items()}
            row["id"] = f"{row.get(F.TASK_NAME, task.name)}-{i}"
            if categories is not None and row.get(F.TASK_NAME) in categories:
                row[CATEGORY] = categories[row[F.TASK_NAME]]
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------------------------
# Output: JSONL / JSON files and a console table.
# ---------------------------------------------------------------------------------------------------------------


def write_jsonl(path: str, records: Iterable[Mapping]) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def write_json(path: str, obj: Any) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
    return path


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in header]] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(cells[0]), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in cells[1:]]
    return "\n".join(lines)


def format_metrics(metrics: Mapping[str, Any], title: str = "", max_tasks: int | None = 40) -> str:
    """A readable console table of `evaluate` or `evaluate_rank_classification` metrics, with timing."""
    out = [title] if title else []
    if "rougeL" in metrics:
        rows = [("overall", float(metrics["rougeL"]), float(metrics["exact_match"]), metrics["num_examples"])]
        out.append(_table(("", "ROUGE-L", "EM", "n"), rows))
        for key, label in (("per_category", "category"), ("per_task", "task")):
            groups = metrics.get(key) or {}
            if not groups or (key == "per_task" and max_tasks is not None and len(groups) > max_tasks):
                if groups:
                    out.append(f"({len(groups)} tasks: per-task scores are in the metrics JSON)")
                continue
            rows = [(name, float(m["rougeL"]), float(m["exact_match"])) for name, m in sorted(groups.items())]
            out.append(_table((label, "ROUGE-L", "EM"), rows))
    else:
        p3 = metrics.get("p3")
        if p3:
            rows = [(ds, float(acc)) for ds, acc in p3["per_dataset"].items()]
            for key, label in (("mtest11_average", "MTest11 average"), ("hypert5_average", "HyperT5 average")):
                if p3.get(key) is not None:
                    rows.append((label, float(p3[key])))
            out.append(_table(("dataset", "accuracy"), rows))
            if p3.get("mtest11_missing"):
                out.append(f"(missing from MTest11: {', '.join(p3['mtest11_missing'])})")
        else:
            groups = metrics.get("per_task", {})
            if max_tasks is None or len(groups) <= max_tasks:
                out.append(_table(("task", "accuracy"), [(t, float(a)) for t, a in sorted(groups.items())]))
        out.append(f"overall accuracy {float(metrics['accuracy']):.2f} over {metrics['num_examples']} examples")
    out.append(format_timing(metrics))
    return "\n".join(out)


def format_timing(metrics: Mapping[str, Any]) -> str:
    eps = metrics.get("examples_per_second")
    return (f"timing: adapters {metrics.get('adapter_generation_seconds', 0):.2f}s for "
            f"{metrics.get('adapters_generated', 0)} generated / {metrics.get('adapters_reused', 0)} reused "
            f"(compile {metrics.get('adapter_compile_seconds', 0):.1f}s); decoding "
            f"{metrics.get('decoding_seconds', 0):.2f}s (compile {metrics.get('decoding_compile_seconds', 0):.1f}s); "
            f"{eps if eps is not None else '-'} examples/s")


# ---------------------------------------------------------------------------------------------------------------
# Evaluating a trained work directory on a benchmark (what launch/eval.py runs).
# ---------------------------------------------------------------------------------------------------------------

BENCHMARKS = ("synthetic", "sni", "p3")


@dataclasses.dataclass
class Benchmark:
    """Registered evaluation tasks: split label -> task names, task -> category, and the protocol."""

    name: str
    splits: dict[str, list[str]]
    categories: dict[str, str]
    rank_classification: bool = False


def _shared_data_path(sub: str) -> str:
    root = os.environ.get("TAGI_SHARED_DATA", "")
    return os.path.join(root, sub) if root else ""


def register_benchmark_tasks(config, benchmark: str, vocab, *, sni_dir: str | None = None,
                             p3_templates_dir: str | None = None, p3_data_dir: str | None = None,
                             p3_datasets: Sequence[str] | None = None) -> Benchmark:
    """Register a benchmark's evaluation tasks with the run config's data settings (the synthetic suite must
    be built with the seed and sizes it was trained with, SNI with the same setting)."""
    from tagi_jax.config import get_key

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {', '.join(BENCHMARKS)}")
    data = config.data
    if benchmark == "synthetic":
        from tasks import synthetic

        s = data.synthetic
        info = synthetic.register_synthetic(
            vocab, seed=s.seed, setting=data.setting, num_train_tasks=s.num_train_tasks,
            num_unseen_tasks=s.num_unseen_tasks, train_instances_per_task=s.train_instances_per_task,
            eval_instances_per_task=s.eval_instances_per_task)
        splits = {"unseen": list(info["unseen_task_names"]), "seen": list(info["train_task_names"])}
        return Benchmark(benchmark, {k: v for k, v in splits.items() if v}, dict(info["categories"]))
    if benchmark == "sni":
        from tasks import sni

        directory = sni_dir or get_key(config, "data.sni.dir", "")
        if not directory or not os.path.isdir(directory):
            raise FileNotFoundError(f"SNI directory not found: {directory!r} (set --sni_dir or config key 'data.sni.dir')")
        split_name = get_key(config, "data.sni.split", "default")
        sni.register_sni(directory, vocab, setting=data.setting,
                         max_test_instances=int(get_key(config, "data.sni.max_test_instances", 100)),
                         seed=int(get_key(config, "data.sni.seed", 42)),
                         skip_bad_tasks=bool(get_key(config, "data.sni.skip_bad_tasks", False)),
                         split_name=split_name)
        test = [sni.seqio_task_name(t) for t in sni.read_split(directory, split_name)["test"]]
        return Benchmark(benchmark, {"test": test}, sni.sni_task_categories(directory, split_name))
    from tasks import p3

    templates = (p3_templates_dir or get_key(config, "data.p3.templates_dir", "")
                 or _shared_data_path("promptsource_templates"))
    raw = p3_data_dir or get_key(config, "data.p3.eval_data_dir", "") or _shared_data_path("p3_eval")
    for what, path, flag, key in (("promptsource templates", templates, "--p3_templates_dir", "templates_dir"),
                                  ("P3 evaluation data", raw, "--p3_data_dir", "eval_data_dir")):
        if not path or not os.path.isdir(path):
            raise FileNotFoundError(f"{what} directory not found: {path!r} (set {flag}, config key "
                                    f"'data.p3.{key}', or TAGI_SHARED_DATA)")
    datasets = list(p3_datasets or get_key(config, "data.p3.eval_datasets", ())) or None
    registered = p3.register_p3_eval(templates, raw, vocab, datasets=datasets,
                                     original_task_only=bool(get_key(config, "data.p3.eval_original_task_only", True)))
    names = [t for ts in registered.values() for t in ts]
    categories = {t: ds for ds, ts in registered.items() for t in ts}
    return Benchmark("p3", {"validation": names}, categories, rank_classification=True)


def select_tasks(bench: Benchmark, tasks: Sequence[str] | None) -> dict[str, list[str]]:
    """The benchmark's splits restricted to `tasks` (each must be one of its tasks: clear error otherwise)."""
    if not tasks:
        return bench.splits
    known = {t for names in bench.splits.values() for t in names}
    unknown = [t for t in tasks if t not in known]
    if unknown:
        sample = ", ".join(sorted(known)[:5])
        raise ValueError(f"unknown task {unknown[0]!r} for benchmark {bench.name!r} ({len(known)} tasks, e.g. "
                         f"{sample})")
    wanted = set(tasks)
    return {label: [t for t in names if t in wanted] for label, names in bench.splits.items()
            if any(t in wanted for t in names)}


def run_evaluation(
    workdir: str,
    method: str = "tagi",
    benchmark: str | None = None,
    *,
    config=None,
    tasks: Sequence[str] | None = None,
    max_examples_per_task: int | None = None,
    batch_size: int | None = None,
    beam_size: int | None = None,
    max_decode_len: int | None = None,
    use_cache: bool = True,
    sni_dir: str | None = None,
    p3_templates_dir: str | None = None,
    p3_data_dir: str | None = None,
    p3_datasets: Sequence[str] | None = None,
    print_fn: Callable[[str], None] | None = print,
) -> dict:
    """Evaluate `method` of a pipeline work directory on a benchmark; writes
    `<workdir>/eval/<method>_<benchmark>_<split>_predictions.jsonl` and `<method>_<benchmark>_metrics.json`
    ({split: metrics}) and returns the metrics. `config` (default: the work directory's config.json) gives
    the data and eval settings; the model always comes from the work directory."""
    from tagi_jax import pipeline
    from tagi_jax.data import task_lengths
    from tagi_jax.vocab import get_vocabulary

    check_method(method)
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: work directory not found")
    _, model, params = pipeline.load_trained(workdir, method)
    if config is None:
        config = pipeline.load_workdir_config(workdir)
    benchmark = benchmark or config.data.benchmark
    vocab = get_vocabulary(config.data.vocabulary, workdir)
    bench = register_benchmark_tasks(config, benchmark, vocab, sni_dir=sni_dir, p3_templates_dir=p3_templates_dir,
                                     p3_data_dir=p3_data_dir, p3_datasets=p3_datasets)
    splits = select_tasks(bench, tasks)
    lengths = task_lengths(config.data)
    batch_size = int(batch_size or config.eval.batch_size)
    per_task = int(max_examples_per_task or config.eval.max_examples_per_task)
    cache = AdapterCache(os.path.join(workdir, "adapter_cache") if use_cache else None)
    out_dir = os.path.join(workdir, "eval")
    results = {}
    for label, names in splits.items():
        examples = [ex for name in names for ex in task_examples(name, None, per_task, bench.categories)]
        if bench.rank_classification:
            records, result = evaluate_rank_classification(method, model, params, examples, vocab, lengths=lengths,
                                                           batch_size=batch_size, cache=cache)
        else:
            records, result = evaluate(
                method, model, params, examples, vocab, lengths=lengths, batch_size=batch_size,
                max_decode_len=int(max_decode_len or config.eval.max_decode_len),
                beam_size=int(beam_size or config.eval.beam_size), cache=cache)
        result["benchmark"], result["split"] = benchmark, label
        results[label] = result
        if jax.process_index() == 0:
            write_jsonl(os.path.join(out_dir, f"{method}_{benchmark}_{label}_predictions.jsonl"), records)
        if print_fn is not None:
            print_fn(format_metrics(result, title=f"\n== {method} on {benchmark} / {label} "
                                                  f"({len(names)} tasks, {len(examples)} examples) =="))
    if jax.process_index() == 0:
        path = write_json(os.path.join(out_dir, f"{method}_{benchmark}_metrics.json"), results)
        if print_fn is not None:
            print_fn(f"\nmetrics: {path}")
    return results


__all__ = [
    "ADAPTER_METHODS",
    "AdapterCache",
    "AdapterTable",
    "BENCHMARKS",
    "Benchmark",
    "METHODS",
    "check_method",
    "decode_tokens",
    "detokenize",
    "evaluate",
    "evaluate_rank_classification",
    "format_metrics",
    "format_timing",
    "generate_task_adapters",
    "params_fingerprint",
    "register_benchmark_tasks",
    "run_evaluation",
    "select_tasks",
    "score_tokens",
    "task_examples",
    "tokenize",
    "write_json",
    "write_jsonl",
]
