"""Shared pieces of the benchmarks: paths, the reproducible command line, the machine, a small random T5, an
analytic FLOP model of `tagi_jax.models.t5.T5` / `tagi_jax.models.hypernet.HyperNetwork`, ahead-of-time
compilation with XLA's cost analysis, and side-by-side timing.

FLOPs count matrix multiplications only (2 per multiply-add), on the *padded* shapes that actually run:
XLA's cost analysis also counts element-wise work (norms, softmax, GELU, residual adds), so it is expected to
be a few percent above the analytic count. XLA counts a `while` loop's body once, whatever its trip count, so
greedy decoding is cross-checked through the teacher-forced pass that does the same matrix products (see
`decoder_flops`).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import platform
import shlex
import statistics
import sys
import time
from typing import Any, Callable, Mapping, Sequence

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/x.py` puts bench/ first on the path, not the repository
    sys.path.insert(0, str(REPO_ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from tagi_jax.models import lora  # noqa: E402
from tagi_jax.models.t5_config import T5Config  # noqa: E402


# ------------------------------------------------------------------------------------------ environment
def shared_data_dir() -> pathlib.Path:
    """$TAGI_SHARED_DATA, default ../shared/data relative to the repository root (never copied into the repo)."""
    return pathlib.Path(os.environ.get("TAGI_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def command_line(script: str, args: Any) -> str:
    """The command that reproduces this run: every flag written out, defaults included."""
    flags = []
    for key, value in sorted(vars(args).items()):
        if isinstance(value, bool):
            flags.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, (list, tuple)):
            flags.append(f"--{key}={','.join(str(v) for v in value)}")
        else:
            flags.append(f"--{key}={shlex.quote(str(value))}")
    return " ".join(["python", script] + flags)


class OneLineArgumentParser(argparse.ArgumentParser):
    """A bad flag ends the program with one `error:` line and exit status 2 (argparse also prints the usage)."""

    def error(self, message):
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)


def parse_settings(settings_cls: type, description: str, argv=None) -> tuple[Any, argparse.Namespace]:
    """The `Settings` dataclass from the command line (`settings_parser`'s flags); a bad value (argparse's or
    the dataclass's ValueError) is one `error:` line and exit status 2."""
    parser = settings_parser(settings_cls, description, parser_cls=OneLineArgumentParser)
    args = parser.parse_args(argv)
    try:
        return settings_cls(**vars(args)), args
    except ValueError as e:
        parser.error(str(e))


def settings_parser(settings_cls: type, description: str,
                    parser_cls: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """An argument parser with one flag per field of the `Settings` dataclass (booleans as --x/--no-x)."""
    p = parser_cls(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = settings_cls()
    for field in dataclasses.fields(settings_cls):
        if field.type in ("bool", bool):
            p.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default)
        else:
            p.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)), default=field.default)
    return p


def settings_from_args(settings_cls: type, args: Any, prog: str) -> Any:
    """The `Settings` of the parsed flags; a bad value ends the program with one line."""
    try:
        return settings_cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(settings_cls)})
    except ValueError as e:
        raise SystemExit(f"{prog}: {e}") from None


def print_run_header(script: str, args: Any) -> None:
    """The command that reproduces the run and the machine it ran on, first lines of every report."""
    print(f"command: {command_line(script, args)}")
    print(f"machine: {machine_description()}")


def t5_description(cfg: T5Config) -> str:
    """The backbone's shape, as the reports print it."""
    return (f"random-weight T5 v1.1 d_model={cfg.d_model} d_ff={cfg.d_ff} heads={cfg.num_heads}x{cfg.d_kv} "
            f"layers={cfg.num_encoder_layers}+{cfg.num_decoder_layers} vocab={cfg.vocab_size}")


def machine_description() -> str:
    """CPU model, cores, load average and the JAX backend, for the README figures."""
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "load average %.1f / %.1f / %.1f (1/5/15 min)" % os.getloadavg()
    except OSError:
        load = "load average unknown"
    devices = jax.devices()
    return (f"{cpu}, {os.cpu_count()} cores visible, {load}; jax {jax.__version__} on "
            f"{devices[0].platform} ({len(devices)} device(s) visible, 1 used)")


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (with the wall time: how much of the machine we got)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ------------------------------------------------------------------------------------------ models
@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """The backbone and adapter sizes both benchmarks take as flags (their `Settings` extend it)."""
    d_model: int = 256
    layers: int = 4
    heads: int = 4
    d_kv: int = 64
    d_ff: int = 1024
    rank: int = 32

    def t5_config(self) -> T5Config:
        return small_t5_config(self.d_model, self.layers, self.heads, self.d_kv, self.d_ff)


def small_t5_config(d_model: int = 256, layers: int = 4, heads: int = 4, d_kv: int = 64,
                    d_ff: int = 1024, vocab_size: int = 259, dtype: str = "float32") -> T5Config:
    """A T5 v1.1-style (gated GELU, untied logits) backbone; vocab 259 = the byte vocabulary."""
    return T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_heads=heads,
                    num_encoder_layers=layers, num_decoder_layers=layers, dropout_rate=0.0,
                    dtype=dtype, param_dtype="float32")


def round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def bucket_length(n: int, per_octave: int = 4, minimum: int = 16) -> int:
    """`n` rounded up to one of `per_octave` lengths per power of two (at most 1/per_octave padding), and at
    least `minimum`: few distinct shapes (few compilations) for little padding.

    E.g. per_octave=4: ..., 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, ...
    """
    if n <= minimum:
        return minimum
    octave = 1 << ((n - 1).bit_length() - 1)  # the largest power of two below n
    return round_up(n, max(octave // per_octave, 1))


def pad_batch(rows: Sequence[Sequence[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"pad_batch: a row of {len(row)} tokens does not fit length {length}")
        out[i, : len(row)] = row
    return out


# ------------------------------------------------------------------------------------------ analytic FLOPs
def _mm(m: int, k: int, n: int) -> int:
    """FLOPs of an [m, k] x [k, n] product (one multiply-add = 2 FLOPs)."""
    return 2 * m * k * n


def _ffn_in(cfg: T5Config) -> int:
    return 2 if cfg.is_gated else 1


def encoder_flops(cfg: T5Config, length: int) -> int:
    """One sequence of `length` (padded) tokens through the encoder stack."""
    d, inner, f = cfg.d_model, cfg.inner_dim, cfg.d_ff
    per_layer = (4 * _mm(length, d, inner)              # q, k, v, o
                 + 2 * _mm(length, inner, length)       # q·kᵀ and weights·v (all heads)
                 + (_ffn_in(cfg) + 1) * _mm(length, d, f))
    return cfg.num_encoder_layers * per_layer


def decoder_flops(cfg: T5Config, target_len: int, memory_len: int) -> dict[str, int]:
    """One sequence through the decoder: `target_len` tokens, cross-attending to `memory_len` states.

    Also the cost of `target_len` cached greedy steps: each step's self-attention reads the whole cache
    (masked), i.e. target_len x target_len in total as in the teacher-forced pass, and the cross-attention
    keys/values of the (loop-invariant) memory are computed once per sequence: `tagi_jax.models.predict.predict`
    projects them before the decoding loop (`T5.project_cross_kv`). Returns the parts
    {"self", "cross_q_attn_o", "cross_kv", "mlp", "logits"} (summed over layers).
    """
    d, inner, f, layers = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.num_decoder_layers
    t, m = target_len, memory_len
    return {
        "self": layers * (4 * _mm(t, d, inner) + 2 * _mm(t, inner, t)),
        "cross_q_attn_o": layers * (2 * _mm(t, d, inner) + 2 * _mm(t, inner, m)),
        "cross_kv": layers * 2 * _mm(m, d, inner),
        "mlp": layers * (_ffn_in(cfg) + 1) * _mm(t, d, f),
        "logits": _mm(t, d, cfg.vocab_size),
    }


def _target_tokens(target: str, enc_len: int, dec_len: int, mem_len: int) -> int:
    block, proj = lora.split_target(target)
    if block.startswith("encoder"):
        return enc_len
    if block == "decoder_cross" and proj in ("k", "v"):
        return mem_len
    return dec_len


def lora_flops(cfg: T5Config, targets: Sequence[str], rank: int, enc_len: int, dec_len: int,
               mem_len: int) -> int:
    """Extra FLOPs of factorised adapters, x·A then ·B, for one sequence (enc_len = 0: decoder only)."""
    total = 0
    for target in targets:
        layers, d_in, d_out = lora.adapter_dims(cfg, target)
        n = _target_tokens(target, enc_len, dec_len, mem_len)
        total += layers * (_mm(n, d_in, rank) + _mm(n, rank, d_out))
    return total


def merge_flops(cfg: T5Config, targets: Sequence[str], rank: int) -> int:
    """`lora.merge_adapter`: A·B for every layer of every target (once per task)."""
    total = 0
    for target in targets:
        layers, d_in, d_out = lora.adapter_dims(cfg, target)
        total += layers * _mm(d_in, rank, d_out)
    return total


def hypernet_flops(cfg: T5Config, hyper, instruction_len: int) -> int:
    """Encoding one instruction (backbone encoder, no adapters) + the hypernetwork's projections and heads."""
    specs = [lora.target_spec(cfg, t) for t in hyper.adapter_targets]
    h, e = hyper.hidden_dim, hyper.embed_dim
    max_layers = max(s.num_layers for s in specs)
    flops = encoder_flops(cfg, instruction_len)
    flops += _mm(1, cfg.d_model, h) + _mm(1, h, e) + _mm(1, e, h)   # instruction code, its trunk part
    flops += _mm(max_layers, e, h) + _mm(len(specs), e, h)          # layer and module embeddings
    for s in specs:
        flops += s.num_layers * (_mm(1, h, s.d_in * hyper.rank) + _mm(1, h, hyper.rank * s.d_out))
    return flops


# ------------------------------------------------------------------------------------------ compile & time
def shape_key(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return (str(treedef),) + tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x)))) for x in leaves)


def xla_flops(compiled) -> float:
    """'flops' of XLA's cost analysis (a dict, or a one-element list of dicts in some jax versions)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


class Compiled:
    """Ahead-of-time compiled executables of jitted functions, one per input shape, with their XLA FLOPs.

    The same executable serves the cost analysis and the timed runs, so nothing is compiled twice and no
    compilation happens inside a timed region.
    """

    def __init__(self):
        self._cache: dict[tuple, Any] = {}
        self.compile_seconds = 0.0

    def get(self, name: str, jitted: Callable, *args):
        key = (name,) + shape_key(args)
        if key not in self._cache:
            start = time.perf_counter()
            self._cache[key] = jitted.lower(*args).compile()
            self.compile_seconds += time.perf_counter() - start
        return self._cache[key]

    def flops(self, name: str, jitted: Callable, *args) -> float:
        return xla_flops(self.get(name, jitted, *args))

    def __call__(self, name: str, jitted: Callable, *args):
        return self.get(name, jitted, *args)(*args)

    def __len__(self):
        return len(self._cache)


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def interleaved_timings(fns: Mapping[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
    """Wall seconds of each function, run in rotating order (A B C, B C A, ...) `repeats` times.

    Rotating the order spreads any drift of a shared machine's load over all the contenders.
    """
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            block(fns[n]())
            out[n].append(time.perf_counter() - start)
    return out


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


@dataclasses.dataclass
class Table:
    """A plain fixed-width console table."""
    header: Sequence[str]
    rows: list = dataclasses.field(default_factory=list)

    def add(self, *cells):
        self.rows.append([c if isinstance(c, str) else _fmt(c) for c in cells])

    def render(self) -> str:
        cols = list(zip(*([list(self.header)] + self.rows)))
        widths = [max(len(str(c)) for c in col) for col in cols]
        line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                       for i, (c, w) in enumerate(zip(cells, widths)))
        return "\n".join([line(self.header), line(["-" * w for w in widths])] + [line(r) for r in self.rows])


def _fmt(x) -> str:
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if x != x:
        return "nan"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1 or x == 0:
        return f"{x:.2f}"
    return f"{x:.2g}"
