"""Inference cost of TAGI vs instruction concatenation, measured side by side on the same backbone.

For every task of 100 instances, the same T5 runs two ways:

* TAGI: the instruction (Def + 2 Pos, Tk-Instruct format) is encoded ONCE per task by the backbone's encoder
  and turned into a LoRA adapter by the hypernetwork (`tagi_jax.models.tagi.generate_adapters`); the adapter
  is folded into the kernels once (`lora.merge_adapter`, the single-task fast path; `--adapter=factorised`
  keeps it factorised instead) and every instance is then encoded alone (`inputs`), the decoder
  cross-attending to the instance plus, with `--fusion=prepend`, the encoded instruction, whose
  cross-attention keys/values are projected once per task (`predict.project_cross_kv`, batch 1, padding
  trimmed as the evaluator's per-task table does) and shared by every instance (`--fusion_kv=instance`:
  projected again for every instance, as before);
* concatenation (Tk-Instruct / T0): every instance carries the whole instruction (`full_inputs`).

Reported per task and per suite: (1) FLOPs, counted analytically from the padded shapes (`bench/_common.py`)
and cross-checked with XLA's cost analysis of the very executables that run; (2) wall time, both paths timed
in one run, interleaved, compilation excluded (everything is compiled ahead of time), same batch size and
decode length, `block_until_ready`. Their ratio is compared with the bound (t + i) / i for mean instruction
length t and instance length i: the encoder's work when its cost is linear in the length and decoding is free.

Each path is padded to what it needs: TAGI to the instance length, concatenation to instruction + instance
(per batch, rounded up to one of `--buckets_per_octave` lengths per power of two; instances sorted by
length within a task). Modes: `score` (default) runs the teacher-forced pass on the task's real reference
answers (the decoding work of a model that stops at EOS after the reference; `tagi_jax.models.predict
.score_targets`); `greedy` runs `tagi_jax.models.predict.predict` for exactly `--decode_len` steps (EOS
disabled: random weights would stop at random points).

Random weights: cost does not depend on the values. Lengths are in bytes (byte vocabulary; no SentencePiece
model is available offline); T5 SentencePiece tokens are about 4 bytes, which leaves (t + i) / i unchanged but
shrinks attention's share of the cost.

    python bench/inference_cost.py                       # defaults: ~4 minutes on 2 idle CPU cores
    python bench/inference_cost.py --mode=greedy --decode_len=128 --suites=sni --sni_tasks=4
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import pathlib
import sys
import time
from typing import Sequence

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # `python bench/x.py`: find the repo

from bench import _common as C  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench._inference_inputs import (Batch, Prepared, Settings, TaskTexts, prepare,  # noqa: E402
                                     sni_tasks, synthetic_tasks)
from tagi_jax.eval.decode import instruction_length  # noqa: E402
from tagi_jax.models import lora  # noqa: E402
from tagi_jax.models import tagi as tagi_lib  # noqa: E402
from tagi_jax.models import predict as predict_lib  # noqa: E402
from tagi_jax.models.hypernet import HyperNetConfig  # noqa: E402
from tagi_jax.models.t5 import T5  # noqa: E402
from tagi_jax.vocab import get_vocabulary  # noqa: E402

BYTES_PER_TOKEN = 4.0  # rough size of a T5 SentencePiece token in English text (an estimate, for orientation)


# ------------------------------------------------------------------------------------------ the benchmark
def _broadcast_rows(states, mask, rows: int):
    """The task's instruction states [1, n, d] for every row of the batch (fusion, --fusion_kv=instance)."""
    if states is None:
        return None, None
    return (jnp.broadcast_to(states, (rows,) + states.shape[1:]),
            jnp.broadcast_to(mask, (rows,) + mask.shape[1:]))


def _fusion(fusion: dict, rows: int) -> dict:
    """Keyword arguments carrying the instruction (`InferenceCost._generate`'s fusion): the task's keys/values
    (batch 1, shared by every row) as they are, or its states broadcast to every row."""
    if "states" not in fusion:
        return fusion
    states, mask = _broadcast_rows(fusion["states"], fusion["mask"], rows)
    return {"extra_encoder_states": states, "extra_encoder_mask": mask}


def _score(model, params, adapters, enc, dec_in, dec_tgt, fusion):
    return predict_lib.score_targets(model, params, enc, dec_in, dec_tgt, adapters=adapters,
                                     **_fusion(fusion, enc.shape[0])).sum


def _greedy(model, decode_len, params, adapters, enc, fusion):
    tokens, _ = predict_lib.predict(model, params, enc, adapters=adapters, max_decode_len=decode_len, eos_id=-1,
                                    **_fusion(fusion, enc.shape[0]))
    return tokens  # eos_id=-1: never stops early, so both paths decode exactly decode_len tokens


NO_FUSION: dict = {}


class InferenceCost:
    """One backbone + hypernetwork (random weights) and the two ways of running a task on it."""

    def __init__(self, s: Settings):
        self.s = s
        self.t5_config = s.t5_config()
        self.hyper_config = HyperNetConfig(rank=s.rank, lora_alpha=float(s.rank), hidden_dim=s.hyper_hidden,
                                           embed_dim=s.hyper_embed, dropout_rate=0.0)
        self.config = tagi_lib.TAGIConfig(t5=self.t5_config, hypernet=self.hyper_config, fusion=s.fusion)
        self.tagi = tagi_lib.TAGI(self.config)
        self.t5 = T5(self.t5_config)
        import flax.linen as nn

        self.params = nn.meta.unbox(tagi_lib.init_params(self.config, jax.random.PRNGKey(s.seed)))
        self.compiled = C.Compiled()
        self._gen = jax.jit(functools.partial(tagi_lib.generate_adapters, self.tagi))
        self._merge = jax.jit(lora.merge_adapter)
        self._kv = jax.jit(functools.partial(predict_lib.project_cross_kv, self.t5))
        self._score = jax.jit(functools.partial(_score, self.t5))
        self._greedy = jax.jit(functools.partial(_greedy, self.t5, s.decode_len))

    # --- the two paths (what is timed) -------------------------------------------------------------
    def _run(self, params, adapters, batch: Batch, tokens, fusion):
        if self.s.mode == "score":
            return self.compiled("score", self._score, params, adapters, tokens, batch.dec_in, batch.dec_tgt,
                                 fusion)
        return self.compiled("greedy", self._greedy, params, adapters, tokens, fusion)

    def _generate(self, prep: Prepared):
        """Once per task: (T5 params, adapters or None, fusion): the adapter generated (and merged) and, with
        --fusion=prepend, the instruction's cross-attention keys/values projected (--fusion_kv=task)."""
        adapters, states, mask = self.compiled("generate", self._gen, self.params, prep.hyper)
        params, run_adapters = self.params["t5"], adapters
        if self.s.adapter == "merged":
            params, run_adapters = self.compiled("merge", self._merge, self.params["t5"], adapters), None
        if self.s.fusion == "none":
            return params, run_adapters, NO_FUSION
        if self.s.fusion_kv == "instance":
            return params, run_adapters, {"states": states, "mask": mask}
        n = self.fusion_len(prep)
        kv = self.compiled("fusion_kv", self._kv, params, states[:, :n], run_adapters)
        return params, run_adapters, {"extra_encoder_kv": kv, "extra_encoder_mask": mask[:, :n]}

    def fusion_len(self, prep: Prepared) -> int:
        """Instruction positions the per-task keys/values keep (padding trimmed, as the evaluator's table)."""
        return instruction_length(np.asarray(prep.hyper) > 0) if self.s.fusion_kv == "task" else prep.hyper.shape[1]

    def tagi_task(self, prep: Prepared) -> list:
        """Adapter (and fusion keys/values) generated once, then every batch with instance-only inputs."""
        params, adapters, fusion = self._generate(prep)
        return [self._run(params, adapters, b, b.enc, fusion) for b in prep.batches]

    def concat_task(self, prep: Prepared) -> list:
        """Every instance carries the instruction; no hypernetwork, no adapter."""
        return [self._run(self.params["t5"], None, b, b.full, NO_FUSION) for b in prep.batches]

    # --- FLOPs -------------------------------------------------------------------------------------
    def _target_len(self, b: Batch) -> int:
        return b.dec_tgt.shape[1] if self.s.mode == "score" else self.s.decode_len

    def analytic_flops(self, prep: Prepared, length_scale: float = 1.0) -> dict[str, dict[str, float]]:
        """Matmul FLOPs of each path's parts for the whole task (see bench/_common.py).

        "tagi" and "concat" hold the parts that add up to each path's total; "notes" holds sub-parts:
        `fusion` (all that cross-attending to the instruction adds to TAGI), `fusion_kv` (its keys/values:
        once per task, or per instance with --fusion_kv=instance) and `shared_decoder` (the decoder work both
        paths do alike: self-attention, cross-attention queries/outputs, FFN, logits).
        `length_scale` divides every padded length (an analytic what-if, e.g. 4 for SentencePiece lengths).
        """
        cfg, s = self.t5_config, self.s
        scaled = lambda n: max(1, int(np.ceil(n / length_scale)))
        lh = scaled(prep.hyper.shape[1])
        fusion = s.fusion == "prepend"
        lf_kv = scaled(self.fusion_len(prep)) if fusion else 0  # instruction positions the decoder attends to
        per_task_kv = fusion and s.fusion_kv == "task"
        targets = self.hyper_config.adapter_targets
        kv = lambda n: cfg.num_decoder_layers * 2 * 2 * n * cfg.d_model * cfg.inner_dim  # cross k, v of n states
        tagi = {"hypernet": C.hypernet_flops(cfg, self.hyper_config, lh), "adapter": 0.0, "instruction_kv": 0.0,
                "encoder": 0.0, "decoder": 0.0}
        concat = {"encoder": 0.0, "decoder": 0.0}
        notes = {"fusion": 0.0, "fusion_kv": 0.0, "shared_decoder": 0.0}
        if per_task_kv:  # once per task, batch 1 (with the factorised adapter's cross k/v factors, if any)
            tagi["instruction_kv"] = kv(lf_kv) + (C.lora_flops(cfg, targets, s.rank, 0, 0, lf_kv)
                                                  if s.adapter == "factorised" else 0)
            notes["fusion"] += tagi["instruction_kv"]
            notes["fusion_kv"] += tagi["instruction_kv"]
        if s.adapter == "merged":
            tagi["adapter"] += C.merge_flops(cfg, targets, s.rank)
        for b in prep.batches:
            t, li, lf = scaled(self._target_len(b)), scaled(b.enc.shape[1]), scaled(b.full.shape[1])
            mem = li + lf_kv
            tagi["encoder"] += b.size * C.encoder_flops(cfg, li)
            dec = C.decoder_flops(cfg, t, mem)
            if per_task_kv:  # the instance's keys/values only
                dec["cross_kv"] = C.decoder_flops(cfg, t, li)["cross_kv"]
            tagi["decoder"] += b.size * sum(dec.values())
            notes["fusion"] += b.size * (sum(dec.values()) - sum(C.decoder_flops(cfg, t, li).values()))
            notes["fusion_kv"] += 0.0 if per_task_kv else b.size * kv(lf_kv)
            notes["shared_decoder"] += b.size * sum(v for k, v in C.decoder_flops(cfg, t, 0).items())
            if s.adapter == "factorised":
                tagi["adapter"] += b.size * C.lora_flops(cfg, targets, s.rank, li, t, li if per_task_kv else mem)
            concat["encoder"] += b.size * C.encoder_flops(cfg, lf)
            concat["decoder"] += b.size * sum(C.decoder_flops(cfg, t, lf).values())
        return {"tagi": tagi, "concat": concat, "notes": notes}

    def xla_flops(self, prep: Prepared) -> dict[str, float]:
        """XLA's cost analysis of the same executables, summed like the analytic count.

        Greedy decoding is a while loop, whose body XLA counts once: its FLOPs are those of the teacher-forced
        pass over `decode_len` tokens (same products), which is what is compiled for the check.
        """
        s = self.s
        params, run_adapters, fusion = self._generate(prep)
        tagi = self.compiled.flops("generate", self._gen, self.params, prep.hyper)
        if s.adapter == "merged":
            adapters = self.compiled("generate", self._gen, self.params, prep.hyper)[0]
            tagi += self.compiled.flops("merge", self._merge, self.params["t5"], adapters)
        if "extra_encoder_kv" in fusion:
            _, states, mask = self.compiled("generate", self._gen, self.params, prep.hyper)
            n = self.fusion_len(prep)
            tagi += self.compiled.flops("fusion_kv", self._kv, params, states[:, :n], run_adapters)
        concat = 0.0
        for b in prep.batches:
            dec_in, dec_tgt = b.dec_in, b.dec_tgt
            if s.mode == "greedy":
                dec_in = dec_tgt = jnp.ones((b.size, s.decode_len), jnp.int32)
            tagi += self.compiled.flops("score", self._score, params, run_adapters, b.enc, dec_in, dec_tgt, fusion)
            concat += self.compiled.flops("score", self._score, self.params["t5"], None, b.full, dec_in, dec_tgt,
                                          NO_FUSION)
        return {"tagi": tagi, "concat": concat}

    def compile_task(self, prep: Prepared) -> None:
        """Compile every executable the timed runs will use (nothing compiles inside a timed region)."""
        params, adapters, fusion = self._generate(prep)
        for b in prep.batches:
            for tokens, p, a, f in ((b.enc, params, adapters, fusion), (b.full, self.params["t5"], None, NO_FUSION)):
                if self.s.mode == "score":
                    self.compiled.get("score", self._score, p, a, tokens, b.dec_in, b.dec_tgt, f)
                else:
                    self.compiled.get("greedy", self._greedy, p, a, tokens, f)


# ------------------------------------------------------------------------------------------ one suite
@dataclasses.dataclass
class TaskResult:
    name: str
    instances: int
    t: float                 # instruction bytes
    i: float                 # mean instance bytes
    lengths: str             # padded Lh / Li / Lf / T
    analytic: dict
    analytic_sp: dict        # the same at lengths / BYTES_PER_TOKEN (SentencePiece-length estimate)
    xla: dict | None
    seconds: dict | None     # {"tagi": s, "concat": s} (min over repeats)


def _total(parts: dict) -> float:
    return float(sum(parts.values()))


def _sum_parts(results: Sequence[TaskResult], key: str, attr: str = "analytic") -> dict[str, float]:
    first = getattr(results[0], attr)[key]
    return {k: float(sum(getattr(r, attr)[key][k] for r in results)) for k in first}


def measure_suite(bench: InferenceCost, tasks: Sequence[TaskTexts], vocab, repeats: int = 1,
                  time_it: bool = True) -> list[TaskResult]:
    """FLOPs (analytic and, with `xla_check`, XLA) and wall time of both paths for every task."""
    results = []
    for texts in tasks:
        prep = prepare(texts, vocab, bench.s)
        bench.compile_task(prep)
        analytic = bench.analytic_flops(prep)
        analytic_sp = bench.analytic_flops(prep, length_scale=BYTES_PER_TOKEN)
        xla = bench.xla_flops(prep) if bench.s.xla_check else None
        seconds = None
        if time_it:
            timings = C.interleaved_timings({"tagi": lambda: bench.tagi_task(prep),
                                             "concat": lambda: bench.concat_task(prep)}, repeats)
            seconds = {k: min(v) for k, v in timings.items()}
        b0 = prep.batches[-1]
        tlen = bench._target_len(b0)
        results.append(TaskResult(
            texts.name, prep.num_instances, prep.instruction_bytes, float(np.mean(prep.input_bytes)),
            f"{prep.hyper.shape[1]}/{b0.enc.shape[1]}/{b0.full.shape[1]}/{tlen}", analytic, analytic_sp, xla,
            seconds))
    return results


def summarize(results: Sequence[TaskResult]) -> dict[str, float]:
    """Suite totals and ratios (concat / TAGI), and the bound (t + i) / i over all instances."""
    n = sum(r.instances for r in results)
    t = sum(r.t * r.instances for r in results) / n
    i = sum(r.i * r.instances for r in results) / n
    out = {"instances": n, "t": t, "i": i, "bound": (t + i) / i}
    tagi, concat, notes = (_sum_parts(results, k) for k in ("tagi", "concat", "notes"))
    out.update({f"tagi_{k}": v for k, v in tagi.items()})
    out.update({f"concat_{k}": v for k, v in concat.items()})
    out.update({f"tagi_{k}": v for k, v in notes.items()})
    out["flops_tagi"], out["flops_concat"] = _total(tagi), _total(concat)
    out["flops_ratio"] = out["flops_concat"] / out["flops_tagi"]
    out["encoder_ratio"] = concat["encoder"] / tagi["encoder"]
    out["flops_ratio_no_fusion"] = out["flops_concat"] / (out["flops_tagi"] - notes["fusion"])
    # The bound assumes decoding is free: the decoder work both paths do alike, taken out of both.
    out["flops_ratio_no_shared_decoder"] = ((out["flops_concat"] - notes["shared_decoder"])
                                            / (out["flops_tagi"] - notes["shared_decoder"]))
    sp_tagi, sp_concat = _sum_parts(results, "tagi", "analytic_sp"), _sum_parts(results, "concat", "analytic_sp")
    out["flops_ratio_sp"] = _total(sp_concat) / _total(sp_tagi)
    if all(r.xla is not None for r in results):
        out["xla_tagi"] = sum(r.xla["tagi"] for r in results)
        out["xla_concat"] = sum(r.xla["concat"] for r in results)
        out["xla_ratio"] = out["xla_concat"] / out["xla_tagi"]
    if all(r.seconds is not None for r in results):
        out["seconds_tagi"] = sum(r.seconds["tagi"] for r in results)
        out["seconds_concat"] = sum(r.seconds["concat"] for r in results)
        out["time_ratio"] = out["seconds_concat"] / out["seconds_tagi"]
    return out


def report(label: str, results: Sequence[TaskResult], s: Settings) -> str:
    table = C.Table(["task", "n", "t", "i", "Lh/Li/Lf/T", "GFLOP TAGI", "GFLOP concat", "ratio", "XLA ratio",
                     "s TAGI", "s concat", "time ratio"])
    for r in results:
        a_t, a_c = _total(r.analytic["tagi"]), _total(r.analytic["concat"])
        x = r.xla["concat"] / r.xla["tagi"] if r.xla else float("nan")
        st, sc = (r.seconds["tagi"], r.seconds["concat"]) if r.seconds else (float("nan"),) * 2
        table.add(r.name[:44], r.instances, r.t, r.i, r.lengths, a_t / 1e9, a_c / 1e9, a_c / a_t, x, st, sc,
                  sc / st if r.seconds else float("nan"))
    m = summarize(results)
    lines = [table.render(), ""]
    lines.append(f"{label}: {len(results)} tasks, {m['instances']} instances; mean instruction t = {m['t']:.0f} "
                 f"bytes, mean instance i = {m['i']:.0f} bytes (~{m['t'] / BYTES_PER_TOKEN:.0f} and "
                 f"~{m['i'] / BYTES_PER_TOKEN:.0f} SentencePiece tokens at ~4 bytes/token, an estimate)")
    xla = (f", {m['xla_ratio']:.2f} by XLA cost analysis (XLA/analytic: TAGI {m['xla_tagi'] / m['flops_tagi']:.3f},"
           f" concat {m['xla_concat'] / m['flops_concat']:.3f})") if "xla_ratio" in m else ""
    lines.append(f"{label}: FLOPs ratio (concat / TAGI): {m['flops_ratio']:.2f} analytic{xla}; "
                 f"concat {m['flops_concat'] / 1e12:.3f} vs TAGI {m['flops_tagi'] / 1e12:.3f} TFLOP")
    if "time_ratio" in m:
        lines.append(f"{label}: wall-time ratio (concat / TAGI): {m['time_ratio']:.2f}; "
                     f"concat {m['seconds_concat']:.2f} s ({m['instances'] / m['seconds_concat']:.1f} instances/s) "
                     f"vs TAGI {m['seconds_tagi']:.2f} s ({m['instances'] / m['seconds_tagi']:.1f} instances/s) "
                     f"for {m['instances']} instances")
    lines.append(f"{label}: bound (t + i) / i = ({m['t']:.0f} + {m['i']:.0f}) / {m['i']:.0f} = {m['bound']:.2f}; "
                 f"FLOPs ratio = {100 * m['flops_ratio'] / m['bound']:.0f}% of the bound"
                 + (f", wall-time ratio = {100 * m['time_ratio'] / m['bound']:.0f}%" if "time_ratio" in m else "")
                 + f"; encoder-only FLOPs ratio {m['encoder_ratio']:.2f}")
    ft = m["flops_tagi"]
    lines.append(f"{label}: estimate at SentencePiece lengths (every padded length / {BYTES_PER_TOKEN:.0f}, "
                 f"analytic only): FLOPs ratio {m['flops_ratio_sp']:.2f}")
    if s.fusion == "prepend":
        where = ("once per task (measured)" if s.fusion_kv == "task"
                 else "for every instance (--fusion_kv=instance)")
        lines.append(f"{label}: fusion: the instruction's cross-attention keys/values projected {where}: "
                     f"{100 * m['tagi_fusion_kv'] / ft:.1f}% of TAGI's FLOPs; all of fusion "
                     f"{100 * m['tagi_fusion'] / ft:.1f}%; without fusion (--fusion=none, other maths) the FLOPs "
                     f"ratio would be {m['flops_ratio_no_fusion']:.2f} ({100 * m['flops_ratio_no_fusion'] / m['bound']:.0f}% "
                     "of the bound)")
    lines.append(f"{label}: decoder work both paths do alike (self-attention, cross-attention queries/outputs, FFN, "
                 f"logits): {100 * m['tagi_shared_decoder'] / ft:.1f}% of TAGI's FLOPs; taken out of both paths "
                 f"(the bound's 'decoding is free'), the ratio would be {m['flops_ratio_no_shared_decoder']:.2f}")
    lines.append(f"{label}: TAGI FLOPs: hypernetwork (once per task) {100 * m['tagi_hypernet'] / ft:.1f}%, "
                 f"adapter ({s.adapter}) {100 * m['tagi_adapter'] / ft:.1f}%, "
                 f"instruction keys/values (once per task) {100 * m['tagi_instruction_kv'] / ft:.1f}%, "
                 f"encoder {100 * m['tagi_encoder'] / ft:.1f}%, "
                 f"decoder {100 * m['tagi_decoder'] / ft:.1f}% (of which cross-attention to the instruction "
                 f"{100 * (m['tagi_fusion'] - m['tagi_instruction_kv']) / ft:.1f}%); concat FLOPs: "
                 f"encoder {100 * m['concat_encoder'] / m['flops_concat']:.1f}%, decoder "
                 f"{100 * m['concat_decoder'] / m['flops_concat']:.1f}%")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = C.settings_parser(Settings, __doc__.split("\n\n")[0])
    p.add_argument("--suites", default="sni,synthetic", help="comma-separated: sni, synthetic")
    p.add_argument("--sni_tasks", type=int, default=4,
                   help="test tasks of the SNI sample, evenly spaced in its list (it has 12)")
    p.add_argument("--synthetic_tasks", type=int, default=4, help="unseen synthetic tasks, one per category")
    p.add_argument("--instances", type=int, default=100, help="instances per task")
    p.add_argument("--num_pos", type=int, default=2, help="positive examples in the instruction (Def + k Pos)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs per task and path, rotating which path goes first; the minimum is kept (the "
                        "first run of each executable also pays its one-time warm-up)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.suites.split(",")) - {"sni", "synthetic"})
    if unknown:
        p.error(f"--suites: unknown {unknown} (expected sni, synthetic)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    s = C.settings_from_args(Settings, args, "inference_cost")

    C.print_run_header("bench/inference_cost.py", args)
    start = time.perf_counter()
    vocab = get_vocabulary("byte")
    bench = InferenceCost(s)
    cfg = bench.t5_config
    print(f"model: {C.t5_description(cfg)} (bytes) float32; "
          f"hypernetwork rank={s.rank} hidden={s.hyper_hidden} targets={','.join(bench.hyper_config.adapter_targets)}; "
          f"fusion={s.fusion}, adapter={s.adapter}")
    print(f"protocol: mode={s.mode}" + (" (teacher-forced on each task's first reference + EOS)" if s.mode == "score"
                                       else f" ({s.decode_len} greedy steps, EOS disabled)")
          + f", batch {s.batch_size}, lengths padded per batch to one of {s.buckets_per_octave} lengths per "
          "power of two (instances sorted by length within a task); "
          f"wall time = best of {args.repeats} runs per path (rotating order), compilation excluded; random weights "
          "(cost does not depend on them); lengths in bytes")
    print("columns: t = instruction bytes, i = mean instance bytes, Lh/Li/Lf/T = padded hypernetwork / TAGI "
          "encoder / concat encoder / decoder lengths (last batch); ratio = concat / TAGI")
    suites = []
    if "sni" in args.suites.split(","):
        sni_dir = C.shared_data_dir() / "sni_sample"
        if not sni_dir.is_dir():
            raise SystemExit(f"SNI sample not found at {sni_dir} (set TAGI_SHARED_DATA, or --suites=synthetic)")
        suites.append(("SNI", sni_tasks(sni_dir, args.sni_tasks, args.instances, args.num_pos)))
    if "synthetic" in args.suites.split(","):
        suites.append(("synthetic", synthetic_tasks(args.synthetic_tasks, args.instances, args.num_pos, s.seed)))
    for label, tasks in suites:
        print(f"\n== {label}: Def + {args.num_pos} Pos, {len(tasks)} tasks x {args.instances} instances ==")
        results = measure_suite(bench, tasks, vocab, repeats=args.repeats)
        print(report(label, results, s), flush=True)
    print(f"\n{len(bench.compiled)} executables compiled in {bench.compiled.compile_seconds:.0f} s; "
          f"total {time.perf_counter() - start:.0f} s wall, {C.cpu_seconds():.0f} s CPU (this process)")


if __name__ == "__main__":
    main()
