"""What `launch/init.py` proposes for batch size, microbatches, mesh and remat, from a per-device memory estimate
(parameter counts of each stage's tree, exact, plus a small activation table measured and kept here), and the texts
of DIR/config.py and DIR/run.sh.
"""
from __future__ import annotations

import dataclasses
import re
import shlex
import textwrap
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from tagi_jax.models.t5_config import T5Config
from tagi_jax.run.defaults import tagi_config
from tagi_jax.run.stages import PRETRAIN_DATA_STAGES, frozen_patterns, stage_init_fn

GIB = 2 ** 30
# Activation memory of one training example, in 4-byte words: least squares over XLA's buffer assignment
# (`compiled.memory_analysis().temp_size_in_bytes`) of a concat-stage gradient step on CPU (jax 0.10.2, float32,
# d_kv 64, d_ff 2.5·d_model, vocabulary 1024, batch 8) at ten shapes from d_model 256 / 2+2 layers / 128+32
# tokens to d_model 1024 / 8+8 layers and 512 / 8+8 layers / 256+64 tokens; every shape within 12% of the fit.
ACTIVATION_WORDS = {
    "token_layer": 4.03,  # x d_model, per token per layer it passes through
    "attention": 6.29,  # per attention score (head x query x key) per layer
    "logits": 39.1,  # x vocabulary, per target token (logits, softmax, their gradients)
}
# What "full" remat keeps: each layer's input (a quarter of the per-token words) and one layer's attention at a
# time. An estimate from what it stores, not measured: XLA's CPU buffer assignment showed no saving (0.94x).
REMAT_FULL = {"token_layer": 0.3, "attention_layers": 1}
BYTES_PER_TRAINED = {"adafactor": 9}  # float32 weight + gradient + factored moments; Adam/AdamW/SGD: 16 (below)
BYTES_ADAM, BYTES_FROZEN = 16, 4  # float32 weight, gradient and two Adam moments; a frozen weight alone
HEADROOM = 0.85  # of each device's memory: XLA's workspace, fragmentation, the input pipeline's buffers


@dataclasses.dataclass(frozen=True)
class Plan:
    batch_size: int
    num_microbatches: int
    mesh_model: int
    fsdp: bool
    remat: str
    bytes_per_device: int
    memory_bytes: int | None
    fits: bool
    stage: str  # the stage that needs the most memory

    def describe(self) -> str:
        need = f"~{self.bytes_per_device / GIB:.2f} GiB per device at peak (stage {self.stage})"
        have = f" of {self.memory_bytes / GIB:.1f} GiB" if self.memory_bytes else ""
        verdict = "" if self.fits else ": does NOT fit; shorten the lengths or add devices"
        return (f"batch {self.batch_size} in {self.num_microbatches} microbatch(es), mesh model axis "
                f"{self.mesh_model}{' with FSDP' if self.fsdp else ''}, remat {self.remat!r}: {need}{have}{verdict}")


def stage_param_counts(config, num_teachers: int, t5: T5Config | None, stages: Sequence[str]) -> dict:
    """{stage: (trained, frozen)} parameter counts of each stage's tree (`jax.eval_shape`: nothing allocated),
    split by the optimizer's frozen patterns as the trainer applies them."""
    model_cfg = tagi_config(config, num_teachers=max(1, num_teachers), t5=t5)
    out = {}
    for stage in stages:
        shapes = jax.eval_shape(lambda: nn.meta.unbox(stage_init_fn(stage, model_cfg)(jax.random.key(0))))
        flat = traverse_util.flatten_dict(shapes)
        patterns = [re.compile(p) for p in frozen_patterns(stage, config.tagi.train_backbone)]
        patterns += [re.compile(p) for p in config.stages[stage].optimizer.frozen]
        trained = frozen = 0
        for path, leaf in flat.items():
            n = int(np.prod(leaf.shape))
            if any(p.search("/".join(path)) for p in patterns):
                frozen += n
            else:
                trained += n
        out[stage] = (trained, frozen)
    return out


def example_activation_bytes(t5: T5Config, stage: str, lengths: Mapping[str, int],
                             pretrain_lengths: Mapping[str, int], remat: str) -> float:
    """Activation bytes one training example of `stage` keeps for the backward pass (ACTIVATION_WORDS)."""
    ln = pretrain_lengths if stage in PRETRAIN_DATA_STAGES else lengths
    if stage in ("concat", "teachers", "backbone"):
        encoded = [ln["full_inputs"]]
    elif stage == "no_instruction":
        encoded = [ln["inputs"]]
    else:  # the student: the instance and the instruction through the encoder, the decoder reads both
        encoded = [ln["inputs"], ln["hyper_inputs"]]
    t, n_enc, n_dec = ln["targets"], t5.num_encoder_layers, t5.num_decoder_layers
    token = ACTIVATION_WORDS["token_layer"] * t5.d_model * (sum(encoded) * n_enc + t * n_dec)
    scores = t5.num_heads * (sum(length ** 2 for length in encoded) * n_enc + (t * t + t * sum(encoded)) * n_dec)
    attention = ACTIVATION_WORDS["attention"] * scores
    if remat == "full":
        token *= REMAT_FULL["token_layer"]
        attention /= max(n_enc, n_dec) / REMAT_FULL["attention_layers"]
    words = token + attention + ACTIVATION_WORDS["logits"] * t5.vocab_size * t
    return 4.0 * words * (1.1 if stage == "finetune" else 1.0)  # finetune also runs its teacher forward


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def peak_bytes(config, t5: T5Config, counts: Mapping[str, tuple[int, int]], num_devices: int, model_axis: int,
               fsdp: bool, batch_size: int, micro: int, remat: str) -> tuple[float, str]:
    """(bytes per device, stage) at the stage that needs the most: its parameters and optimizer state over
    the shards that hold them, plus the activations of each device's share of a microbatch."""
    data_axis = num_devices // model_axis
    shards = model_axis * (data_axis if fsdp else 1)
    lengths, pre = config.data.lengths.to_dict(), config.data.pretrain.lengths.to_dict()
    need = {}
    for stage, (trained, frozen) in counts.items():
        per_trained = BYTES_PER_TRAINED.get(config.stages[stage].optimizer.name, BYTES_ADAM)
        state = (trained * per_trained + frozen * BYTES_FROZEN) / shards
        need[stage] = state + batch_size / micro / data_axis * example_activation_bytes(t5, stage, lengths, pre, remat)
    stage = max(need, key=need.get)
    return need[stage], stage


def propose(config, t5: T5Config, counts: Mapping[str, tuple[int, int]], num_devices: int,
            memory_bytes: int | None, batch_size: int) -> Plan:
    """The smallest model axis (FSDP only when needed) whose parameters and optimizer state take at most 60% of
    a device, then the fewest microbatches, first without remat, then with "full" remat, that fit."""
    budget = None if memory_bytes is None else HEADROOM * memory_bytes
    layouts = [(m, f) for f in (False, True) for m in _divisors(num_devices) if not (f and num_devices // m == 1)]
    model_axis, fsdp = 1, False
    if budget is not None:
        for m, f in layouts:
            state, _ = peak_bytes(config, t5, counts, num_devices, m, f, batch_size, batch_size, "full")
            if state <= 0.6 * budget:  # one example per microbatch: mostly parameters and optimizer state
                model_axis, fsdp = m, f
                break
        else:
            model_axis, fsdp = layouts[-1]
    data_axis = num_devices // model_axis
    batch_size = max(batch_size, data_axis) // data_axis * data_axis  # every data shard gets whole examples
    micros = [k for k in _divisors(batch_size) if (batch_size // k) % data_axis == 0]
    for remat in ("none", "full"):
        for micro in micros:
            need, stage = peak_bytes(config, t5, counts, num_devices, model_axis, fsdp, batch_size, micro, remat)
            if budget is None or need <= budget:
                return Plan(batch_size, micro, model_axis, fsdp, remat, int(need), memory_bytes, True, stage)
    need, stage = peak_bytes(config, t5, counts, num_devices, model_axis, fsdp, batch_size, micros[-1], "full")
    return Plan(batch_size, micros[-1], model_axis, fsdp, "full", int(need), memory_bytes, False, stage)


# ------------------------------------------------------------------------------------------------ the files
def _wrapped(line: str, width: int = 112) -> list[str]:
    """A line of the body, its comment moved above it and wrapped when the line is too long to read."""
    indent = line[: len(line) - len(line.lstrip())]
    code, sep, comment = line.partition("# ") if line.lstrip().startswith("#") else line.partition("  # ")
    if len(line) + 4 <= width or not sep:
        return [line]
    out = textwrap.wrap(comment, width - 6 - len(indent), initial_indent=f"{indent}# ",
                        subsequent_indent=f"{indent}# ", break_on_hyphens=False)
    return out + ([code.rstrip()] if code.strip() else [])


def render_config(doc: str, base_import: str, base_call: str, lines: Sequence[str]) -> str:
    """An ordinary configs/*.py-style file: the base config, then one assignment (and its reason) a line."""
    body = "\n".join(f"    {w}" for ln in lines for w in _wrapped(ln))
    doc = "\n\n".join(textwrap.fill(p, 112, break_on_hyphens=False) for p in doc.strip().split("\n\n"))
    return (f'"""{doc}\n"""\n{base_import}\n\n\ndef get_config():\n    c = {base_call}\n{body}\n'
            f"    return c\n")


def render_run_script(repo: str, python: str, config_path: str, workdir: str) -> str:
    """DIR/run.sh: the exact launch/train.py command (extra arguments, e.g. --config.x=y, are passed on)."""
    cmd = (f"{shlex.quote(python)} launch/train.py --config={shlex.quote(config_path)} "
           f"--workdir={shlex.quote(workdir)}")
    return ("#!/usr/bin/env bash\n"
            "# Written by launch/init.py: trains every configured stage, then evaluates (resumable: run it again).\n"
            "set -euo pipefail\n"
            f"cd {shlex.quote(repo)}\n"
            f'exec {cmd} "$@"\n')
