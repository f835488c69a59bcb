"""Throughput of greedy decoding a batch whose examples each carry their own adapter, vs one merged adapter.

Four ways to run the same batch on the same T5 (random weights), timed side by side in one run (rotating
order, compilation excluded, `block_until_ready`), all with `tagi_jax.models.predict.predict` (encode once, then
`--decode_len` cached greedy steps with EOS disabled, so every path decodes exactly as many tokens):

* none:        the plain backbone (no adapter): the floor;
* merged:      one adapter folded into the kernels (`lora.merge_adapter`): the single-task fast path, same
               cost as `none` once merged;
* shared:      one adapter, applied factorised (A/B with a batch axis of 1);
* per-example: every example its own A/B (`[batch, layers, d_in, r]`), applied factorised with batched
               einsums (`lora.lora_delta`): a batch that mixes tasks.

Printed: examples/s of each, the loss of per-example vs merged in percent and a `ratio` line, the analytic
FLOPs of each path (what factorised adapters add in arithmetic) and the bytes each decoding step reads
(what they add in memory traffic). `--diagnose` also times the encoder alone (prefill), reads the compiled
decoding loop for per-step copies (`loop_body_copies`), and compares, at several ranks, with the adapter factors
split by layer once before the loop (`LayerSplit`, a prototype of a proposed fix to the model code).

    python bench/mixed_batch.py                 # defaults: ~1 minute on 2 idle CPU cores
    python bench/mixed_batch.py --diagnose      # + the diagnosis: ~2 minutes
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # `python bench/x.py`: find the repo

from bench import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from tagi_jax.models import lora  # noqa: E402
from tagi_jax.models import predict as predict_lib  # noqa: E402
from tagi_jax.models.t5 import T5, init_params  # noqa: E402

PATHS = ("none", "merged", "shared", "per-example")


@dataclasses.dataclass(frozen=True)
class Settings(C.ModelSettings):
    targets: str = ",".join(lora.DEFAULT_TARGETS)
    batch_size: int = 32
    input_len: int = 128
    decode_len: int = 32
    repeats: int = 5
    seed: int = 0

    def __post_init__(self):
        for key in ("rank", "batch_size", "input_len", "decode_len", "repeats"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self, key)}")
        for target in self.target_list:
            lora.split_target(target)

    @property
    def target_list(self) -> tuple[str, ...]:
        return tuple(t for t in self.targets.split(",") if t)


def _greedy(model, decode_len, params, adapters, tokens):
    out, _ = predict_lib.predict(model, params, tokens, adapters=adapters, max_decode_len=decode_len, eos_id=-1)
    return out  # eos_id=-1: never stops early


@jax.tree_util.register_pytree_node_class
class LayerSplit:
    """Per-example factors [batch, layers, ...] held as one array per layer (prototype of a proposed fix).

    `lora.layer_factors` takes layer `i` as ``A[..., i, :, :]``: on a [batch, layers, d_in, r] array that slice
    is not contiguous, and inside the decoding loop XLA copies it at every step. Splitting the layers once,
    before the loop, leaves nothing to copy. This stand-in supports exactly that indexing (and `.shape` for
    `lora.check_adapters`), so the unchanged model code runs on it.
    """

    def __init__(self, layers):
        self.layers = tuple(layers)

    @classmethod
    def split(cls, x):
        return cls(x[:, i] for i in range(x.shape[1]))

    @property
    def shape(self):
        first = self.layers[0]
        return (first.shape[0], len(self.layers)) + tuple(first.shape[1:])

    def __getitem__(self, index):
        if not (isinstance(index, tuple) and len(index) == 4 and index[0] is Ellipsis
                and isinstance(index[1], int) and index[2:] == (slice(None),) * 2):
            raise TypeError(f"LayerSplit supports only [..., layer, :, :] (lora.layer_factors), got {index!r}")
        return self.layers[index[1]]

    def tree_flatten(self):
        return self.layers, None

    @classmethod
    def tree_unflatten(cls, _, layers):
        return cls(layers)


def _greedy_presplit(model, decode_len, params, adapters, tokens):
    """`_greedy` with the per-example factors split by layer once, outside the decoding loop."""
    split = {t: {**e, "A": LayerSplit.split(e["A"]), "B": LayerSplit.split(e["B"])} for t, e in adapters.items()}
    return _greedy(model, decode_len, params, split, tokens)


def _encode(model, params, adapters, tokens):
    return model.apply({"params": params}, tokens, adapters=adapters, method=T5.encode)


class MixedBatch:
    """A backbone, one shared and `batch_size` per-example adapters, and the four compiled paths."""

    def __init__(self, s: Settings):
        self.s = s
        self.config = s.t5_config()
        self.model = T5(self.config)
        k_params, k_shared, k_each, k_tokens = jax.random.split(jax.random.PRNGKey(s.seed), 4)
        self.params = init_params(self.config, k_params)
        # B is random too (PEFT would start it at 0): the values do not change the cost, but no path should be
        # able to skip anything.
        self.shared = lora.init_adapters(k_shared, self.config, s.target_list, s.rank, batch=1, b_stddev=0.01)
        self.per_example = lora.init_adapters(k_each, self.config, s.target_list, s.rank, batch=s.batch_size,
                                              b_stddev=0.01)
        self.tokens = jax.random.randint(k_tokens, (s.batch_size, s.input_len), 3, self.config.vocab_size,
                                         jnp.int32)
        self.compiled = C.Compiled()
        self._greedy = jax.jit(functools.partial(_greedy, self.model, s.decode_len))
        self._greedy_presplit = jax.jit(functools.partial(_greedy_presplit, self.model, s.decode_len))
        self._encode = jax.jit(functools.partial(_encode, self.model))
        start = time.perf_counter()
        self.merged_params = C.block(jax.jit(lora.merge_adapter)(self.params, self.shared))
        self.merge_seconds = time.perf_counter() - start  # includes its compilation: an upper bound

    def inputs(self, path: str):
        """(params, adapters) of a path."""
        return {"none": (self.params, None), "merged": (self.merged_params, None),
                "shared": (self.params, self.shared), "per-example": (self.params, self.per_example)}[path]

    def executable(self, path: str, what: str = "greedy"):
        """The compiled greedy decoder (or encoder, what="encode") of a path."""
        fn = self._greedy if what == "greedy" else self._encode
        params, adapters = self.inputs(path)
        return self.compiled.get(f"{what}:{path}", fn, params, adapters, self.tokens)

    def runner(self, path: str, what: str = "greedy"):
        compiled = self.executable(path, what)
        params, adapters = self.inputs(path)
        return lambda: compiled(params, adapters, self.tokens)

    # --- analytic costs ----------------------------------------------------------------------------
    def flops(self, path: str, what: str = "greedy") -> float:
        """Matmul FLOPs of the whole batch (encoder [+ decode_len steps]; see bench/_common.py)."""
        cfg, s = self.config, self.s
        greedy = what == "greedy"
        per_row = C.encoder_flops(cfg, s.input_len)
        if greedy:
            per_row += sum(C.decoder_flops(cfg, s.decode_len, s.input_len).values())
        if path in ("shared", "per-example"):
            per_row += C.lora_flops(cfg, s.target_list, s.rank, s.input_len, s.decode_len if greedy else 0,
                                    s.input_len if greedy else 0)
        return float(s.batch_size * per_row)

    def step_bytes(self, path: str) -> dict[str, float]:
        """float32 bytes of weights one greedy step reads (decoder kernels, logits; the adapter factors the step
        uses: per example for per-example, once for shared). Cross-attention k/v of the memory are hoisted out
        of the loop, so their kernels and adapters are not read per step."""
        cfg, s = self.config, self.s
        d, inner, f, layers = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_decoder_layers
        n_in = 2 if cfg.is_gated else 1
        weights = layers * (4 * d * inner + 2 * d * inner + (n_in + 1) * d * f) + d * cfg.vocab_size
        adapters = 0
        if path in ("shared", "per-example"):
            rows = s.batch_size if path == "per-example" else 1
            for target in s.target_list:
                block, proj = lora.split_target(target)
                if block.startswith("encoder") or (block == "decoder_cross" and proj in ("k", "v")):
                    continue
                n_layers, d_in, d_out = lora.adapter_dims(cfg, target)
                adapters += rows * n_layers * s.rank * (d_in + d_out)
        return {"weights": 4.0 * weights, "adapters": 4.0 * adapters}


def measure(s: Settings, what: str = "greedy", bench: MixedBatch | None = None) -> dict[str, dict[str, float]]:
    """{path: {"seconds": best, "median_seconds", "examples_per_s" (from the best), "flops", "step_bytes_*"}}
    for the four paths, timed side by side. The best of the repeats is the estimate: on a shared machine other
    processes only ever add time."""
    bench = MixedBatch(s) if bench is None else bench
    fns = {path: bench.runner(path, what) for path in PATHS}
    for fn in fns.values():  # one untimed run each: first-execution allocations stay out of the timings
        C.block(fn())
    timings = C.interleaved_timings(fns, s.repeats)
    out = {}
    for path in PATHS:
        sec = min(timings[path])
        out[path] = {"seconds": sec, "median_seconds": C.median(timings[path]),
                     "examples_per_s": s.batch_size / sec, "flops": bench.flops(path, what),
                     **{f"step_bytes_{k}": v for k, v in bench.step_bytes(path).items()}}
    return out


_HLO_INSTR = re.compile(r"^\s*(%[\w.\-]+) = (\w+)\[([\d,]*)\]")


def loop_body_copies(hlo_text: str, memory_len: int) -> dict[str, float]:
    """Best-effort reading of an optimised HLO module: per-iteration copies inside the decoding `while` body.

    * `adapter_slice_mb`: per-layer slices of the adapter factors (`A[..., layer, :, :]` of a
      [batch, layers, d_in, r] array is not contiguous, so every step copies it);
    * `memory_transpose_mb`: transposes of [.., memory_len] arrays (the loop-invariant cross-attention keys and
      values, recomputed once outside the loop by XLA but re-laid-out every step).
    Returns MB written per step and the instruction counts; empty if no while body is found.
    """
    comps: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            words = line.split()
            current = words[1] if words[0] == "ENTRY" else words[0]
            comps[current] = []
        elif current is not None:
            comps[current].append(line)
    out = {"adapter_slices": 0, "adapter_slice_mb": 0.0, "memory_transposes": 0, "memory_transpose_mb": 0.0}
    bodies = set(re.findall(r"body=(%[\w.\-]+)", hlo_text))
    if not bodies:
        return {}
    for body in bodies:
        for line in comps.get(body, []):
            m = _HLO_INSTR.match(line)
            if not m:
                continue
            dims = [int(x) for x in m.group(3).split(",") if x]
            mb = 4 * float(np.prod(dims)) / 1e6 if dims else 0.0
            if "while/body" in line and "decoder/slice" in line:
                out["adapter_slices"] += 1
                out["adapter_slice_mb"] += mb
            elif "transpose" in m.group(1) and dims and dims[-1] == memory_len:
                out["memory_transposes"] += 1
                out["memory_transpose_mb"] += mb
    return out


def loss_percent(result: dict, path: str = "per-example", reference: str = "merged") -> float:
    """Throughput lost by `path` relative to `reference`, in percent."""
    return 100.0 * (1.0 - result[path]["examples_per_s"] / result[reference]["examples_per_s"])


def report(result: dict, s: Settings, what: str = "greedy") -> str:
    table = C.Table(["path", "examples/s", "best s", "median s", "vs merged", "GFLOP",
                     "step MB (weights+adapters)"])
    merged = result["merged"]
    for path in PATHS:
        r = result[path]
        table.add(path, r["examples_per_s"], r["seconds"], r["median_seconds"],
                  f"{-loss_percent(result, path):+.1f}%", r["flops"] / 1e9,
                  f"{r['step_bytes_weights'] / 1e6:.1f}+{r['step_bytes_adapters'] / 1e6:.1f}")
    ratio = result["per-example"]["examples_per_s"] / merged["examples_per_s"]
    label = "greedy decoding" if what == "greedy" else "encoder only (prefill)"
    lines = [table.render(), "",
             f"{label}: throughput ratio (per-example / merged): {ratio:.2f}, i.e. per-example adapters lose "
             f"{loss_percent(result):.1f}% of the merged throughput (target: < 20%); shared factorised loses "
             f"{loss_percent(result, 'shared'):.1f}%; merged vs no adapter: "
             f"{-loss_percent(result, 'merged', 'none'):+.1f}% (the same work: timing noise)",
             f"{label}: FLOPs added by per-example factorised adapters: "
             f"{100 * (result['per-example']['flops'] / merged['flops'] - 1):.1f}%"]
    if what == "greedy":
        lines[-1] += (f"; weight bytes read per decoding step: merged {merged['step_bytes_weights'] / 1e6:.1f} MB, "
                      f"per-example adds {result['per-example']['step_bytes_adapters'] / 1e6:.1f} MB "
                      f"({100 * result['per-example']['step_bytes_adapters'] / merged['step_bytes_weights']:.0f}%)")
    return "\n".join(lines)


def presplit_report(s: Settings) -> str:
    """merged vs per-example vs per-example split by layer before the loop (`LayerSplit`), side by side."""
    bench = MixedBatch(s)
    params, adapters = bench.inputs("per-example")
    presplit = bench.compiled.get("greedy:presplit", bench._greedy_presplit, params, adapters, bench.tokens)
    fns = {"merged": bench.runner("merged"), "per-example": bench.runner("per-example"),
           "presplit": lambda: presplit(params, adapters, bench.tokens)}
    same = bool(np.array_equal(np.asarray(fns["per-example"]()), np.asarray(fns["presplit"]())))
    for fn in fns.values():
        C.block(fn())
    best = {k: min(v) for k, v in C.interleaved_timings(fns, s.repeats).items()}
    copies = loop_body_copies(presplit.as_text(), s.input_len)
    loss = lambda k: 100 * (1 - best["merged"] / best[k])
    return (f"rank {s.rank}: per-example loses {loss('per-example'):.1f}% vs merged; split by layer before the "
            f"loop (prototype, {copies.get('adapter_slices', '?')} slices left in the loop, same tokens: {same}) "
            f"loses {loss('presplit'):.1f}% ({s.batch_size / best['merged']:.1f} / "
            f"{s.batch_size / best['per-example']:.1f} / {s.batch_size / best['presplit']:.1f} examples/s)")


def parse_args(argv=None) -> argparse.Namespace:
    p = C.settings_parser(Settings, __doc__.split("\n\n")[0])
    p.add_argument("--diagnose", action=argparse.BooleanOptionalAction, default=False,
                   help="also time the encoder alone, inspect the compiled decoding loop, and compare with the "
                        "per-layer split of the adapters (a proposed fix) at several ranks")
    p.add_argument("--sweep_ranks", default="8,128", help="further ranks of the --diagnose comparison")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    s = C.settings_from_args(Settings, args, "mixed_batch")
    C.print_run_header("bench/mixed_batch.py", args)
    cfg = s.t5_config()
    print(f"model: {C.t5_description(cfg)} float32; LoRA rank "
          f"{s.rank} on {s.targets}")
    print(f"protocol: batch {s.batch_size}, input length {s.input_len}, {s.decode_len} greedy steps (EOS "
          f"disabled), best of {s.repeats} interleaved runs (rotating order) after one untimed run each, "
          "compilation excluded")
    start = time.perf_counter()
    bench = MixedBatch(s)
    result = measure(s, bench=bench)
    print("\n" + report(result, s))
    print(f"(merge_adapter, once per task, compilation included: {bench.merge_seconds:.2f} s)")
    if args.diagnose:
        enc = measure(s, what="encode", bench=bench)
        print("\n" + report(enc, s, what="encode"))
        loop = {p: result[p]["seconds"] - enc[p]["seconds"] for p in PATHS}
        print(f"decoding loop alone (greedy - encoder, best times): per-example {loop['per-example']:.2f} s vs "
              f"merged {loop['merged']:.2f} s: loses {100 * (1 - loop['merged'] / loop['per-example']):.1f}% "
              f"of the merged throughput")
        for path in ("merged", "per-example"):
            copies = loop_body_copies(bench.executable(path).as_text(), s.input_len)
            if not copies:
                print(f"{path}: no while loop found in the optimised HLO (cannot inspect the decoding loop)")
                continue
            print(f"{path}: per decoding step the compiled loop copies {copies['adapter_slice_mb']:.1f} MB of "
                  f"per-layer adapter slices ({copies['adapter_slices']} slices) and re-lays-out "
                  f"{copies['memory_transpose_mb']:.1f} MB of cross-attention keys/values "
                  f"({copies['memory_transposes']} transposes)")
        for rank in [s.rank] + [int(r) for r in args.sweep_ranks.split(",") if r]:
            print(presplit_report(dataclasses.replace(s, rank=rank)))
    print(f"\ntotal {time.perf_counter() - start:.0f} s wall, {C.cpu_seconds():.0f} s CPU (this process)")


if __name__ == "__main__":
    main()
