"""Generated adapters, once per distinct instruction: the checkpoint fingerprint, the adapter cache (memory and
disk), the stacked `AdapterTable` the compiled decoders gather rows from, and `generate_task_adapters`."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
import warnings
from typing import Any, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tagi_jax import features as F
from tagi_jax.eval.decode import bucket, compiled, model_fusion, pad_rows, padded_rows, tokenize
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.run.stages import check_method


def _uses_fusion(model) -> bool:
    """Whether the model reads the encoded instruction besides the adapters (so the table keeps its states)."""
    return model_fusion(model) != "none"


def _generator_params(params) -> dict:
    """The subtrees adapter generation reads (so compiled generators do not depend on e.g. the teachers)."""
    return {k: params[k] for k in ("t5", "hypernet", "hyper_encoder") if k in params}


def _generate_fn(params, hyper_tokens, *, model):
    """Instructions [b, n] -> (adapters [b, ...], states [b, n, d] | None, mask [b, n] | None)."""
    adapters, states, mask = tagi_lib.generate_adapters(model, params, hyper_tokens)
    if not _uses_fusion(model):
        states = mask = None
    return adapters, states, mask


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
        size = padded_rows(len(self.index))
        pad = lambda x: pad_rows(x, size)  # noqa: E731
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


def _check_finite_entry(entry: Entry, instruction: str) -> None:
    """A NaN/Inf adapter would decode to empty strings that look like a (bad) model: refuse it instead."""
    bad = sorted(k for k, v in entry.items() if np.issubdtype(np.asarray(v).dtype, np.floating)
                 and not np.all(np.isfinite(v)))
    if bad:
        raise ValueError(f"the hypernetwork produced non-finite values ({', '.join(bad[:3])}) for the instruction "
                         f"{instruction[:60]!r}: the checkpoint holds NaN/Inf parameters (a diverged run?)")


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
        bs = bucket(len(missing), batch_size)
        tokens, truncated = tokenize(vocab, missing, hyper_len)
        if truncated:
            warnings.warn(f"generate_task_adapters: {truncated} of {len(missing)} instructions were truncated to "
                          f"hyper_inputs length {hyper_len}", stacklevel=2)
        for start in range(0, len(missing), bs):
            chunk = tokens[start:start + bs]
            n = len(chunk)
            if n < bs:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)])
            gen_params = _generator_params(params)
            fn, compile_s = compiled(_generate_fn, {"model": model}, (gen_params, chunk))
            table.compile_seconds += compile_s
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(gen_params, chunk))
            table.seconds += time.perf_counter() - t0
            table.generator_calls += 1
            for text, entry in zip(missing[start:start + n], _split_entries(*out, n)):
                _check_finite_entry(entry, text)
                entries[text] = entry
                cache.put(fingerprint, text, hyper_len, entry)
        table.generated = len(missing)
    table.adapters, table.states, table.mask = _stack_entries([entries[t] for t in distinct], fusion)
    table.index = {t: i for i, t in enumerate(distinct)}
    return table


@dataclasses.dataclass
class InstanceAdapters:
    """`tagi.instruction_source = "instance"` (IAG): every example's own instruction, tokenised, row i for example
    i; the compiled decoding step generates each batch's adapters from its rows (`decode._gather`). No table and
    no cache: one adapter per example (megabytes each at real sizes) is made, used and dropped batch by batch.
    The timing fields of `AdapterTable` are kept for the report (generation time is inside decoding's)."""

    tokens: np.ndarray
    generator_params: dict
    generated: int = 0
    reused: int = 0
    generator_calls: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0

    def device_tree(self) -> dict:
        return {"instance_tokens": pad_rows(self.tokens, padded_rows(len(self.tokens))),
                "generator": self.generator_params}


def instance_adapters(model, params, instructions: Sequence[str], vocab, hyper_len: int,
                      task_names: Sequence[str] | None = None) -> InstanceAdapters:
    """The per-example source of `adapter_setup` for an "instance" model: instructions tokenised, not generated."""
    _check_instructions(instructions, task_names)
    tokens, truncated = tokenize(vocab, list(instructions), hyper_len)
    if truncated:
        warnings.warn(f"instance adapters: {truncated} of {len(instructions)} instructions were truncated to "
                      f"hyper_inputs length {hyper_len}", stacklevel=2)
    return InstanceAdapters(tokens, _generator_params(params), generated=len(instructions))


def adapter_setup(method: str, model, params, examples, vocab, lengths, batch_size: int, cache):
    """(table or None, rows [n] or zeros): the generated adapters the examples use (an `AdapterTable` of the
    distinct instructions, or for an "instance" model the `InstanceAdapters` the decoding step generates from)."""
    if not check_method(method).generates_adapters:
        return None, np.zeros(len(examples), np.int32)
    if not hasattr(model.config, "hypernet"):
        raise ValueError(f"evaluate: method {method!r} needs a TAGI model (with a hypernetwork), got "
                         f"{type(model).__name__}")
    instructions = [ex[F.HYPER_INPUTS] for ex in examples]
    if getattr(model.config, "instruction_source", "task") == "instance":
        source = instance_adapters(model, params, instructions, vocab, int(lengths[F.HYPER_INPUTS]),
                                   [ex[F.TASK_NAME] for ex in examples])
        return source, np.arange(len(examples), dtype=np.int32)
    table = generate_task_adapters(model, params, instructions, vocab, int(lengths[F.HYPER_INPUTS]), batch_size,
                                   cache, task_names=[ex[F.TASK_NAME] for ex in examples])
    return table, table.rows(instructions)
