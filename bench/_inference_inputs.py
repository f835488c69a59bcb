"""What bench/inference_cost.py measures on: each task's texts (SNI sample, synthetic suite), the run's settings,
and the tokenised batches, each path padded to its own need."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax.numpy as jnp

from bench import _common as C
from tagi_jax import features as F
from tasks import sni
from tasks.synthetic import suite as synthetic
from tasks.synthetic.operations import TEST

EOS = 1


# ------------------------------------------------------------------------------------------ data
@dataclasses.dataclass
class TaskTexts:
    """One task's text features: its instruction (the same for every instance) and its instances."""
    suite: str
    name: str
    instruction: str            # hyper_inputs
    inputs: list[str]           # the instance part alone (TAGI)
    full_inputs: list[str]      # instruction + instance (concatenation)
    targets: list[str]


def _task_texts(suite: str, name: str, examples: Sequence[dict]) -> TaskTexts:
    instructions = {ex[F.HYPER_INPUTS] for ex in examples}
    if len(instructions) != 1:
        raise ValueError(f"{suite} task {name}: the instruction differs between instances ({len(instructions)} "
                         "variants); TAGI reads one instruction per task")
    for ex in examples:
        if ex[F.FULL_INPUTS] != ex[F.HYPER_INPUTS] + ex[F.INPUTS]:
            raise ValueError(f"{suite} task {name}: full_inputs is not hyper_inputs + inputs")
    return TaskTexts(suite, name, examples[0][F.HYPER_INPUTS], [ex[F.INPUTS] for ex in examples],
                     [ex[F.FULL_INPUTS] for ex in examples], [ex[F.TARGETS] for ex in examples])


def sni_tasks(sni_dir, num_tasks: int, instances: int = 100, num_pos: int = 2) -> list[TaskTexts]:
    """`num_tasks` test tasks of `sni_dir`'s default split, evenly spaced in its list (all of them when
    num_tasks >= the list's length), Def + `num_pos` Pos, Tk-Instruct format."""
    listed = sni.read_split(str(sni_dir))[sni.TEST]
    num_tasks = min(num_tasks, len(listed))
    names = [listed[(k * len(listed)) // num_tasks] for k in range(num_tasks)]
    out = []
    for name in names:
        task = sni.load_task_file(sni.task_path(str(sni_dir), name))
        examples = sni.build_examples(task, name, sni.TEST, num_pos=num_pos, num_neg=0, max_instances=instances)
        out.append(_task_texts("sni", name, examples))
    return out


def synthetic_tasks(num_tasks: int, instances: int = 100, num_pos: int = 2, seed: int = 0) -> list[TaskTexts]:
    """`num_tasks` unseen tasks of the synthetic suite, one category after another, test instances."""
    suite = synthetic.build_suite(seed)
    by_category: dict[str, list] = {}
    for task in suite.unseen_tasks:
        by_category.setdefault(task.category, []).append(task)
    picked, round_ = [], 0
    while len(picked) < num_tasks and any(len(v) > round_ for v in by_category.values()):
        picked += [v[round_] for v in by_category.values() if len(v) > round_][: num_tasks - len(picked)]
        round_ += 1
    out = []
    for task in picked:
        examples = [synthetic.format_example(task, inst, num_pos=num_pos)
                    for inst in task.instances(TEST, instances, seed=seed)]
        out.append(_task_texts("synthetic", task.name, examples))
    return out


# ------------------------------------------------------------------------------------------ settings
@dataclasses.dataclass(frozen=True)
class Settings(C.ModelSettings):
    """What one benchmark run measures (the command-line flags that matter to the measurement)."""
    hyper_hidden: int = 512
    hyper_embed: int = 128
    fusion: str = "prepend"         # "prepend" | "none"
    fusion_kv: str = "task"         # the instruction's cross-attention keys/values: once per "task" | "instance"
    adapter: str = "merged"         # "merged" | "factorised"
    mode: str = "score"             # "score" | "greedy"
    decode_len: int = 128           # greedy steps
    batch_size: int = 25
    buckets_per_octave: int = 4     # lengths padded to one of this many lengths per power of two
    xla_check: bool = True
    seed: int = 0

    def __post_init__(self):
        for key, allowed in (("fusion", ("prepend", "none")), ("fusion_kv", ("task", "instance")),
                             ("adapter", ("merged", "factorised")), ("mode", ("score", "greedy"))):
            if getattr(self, key) not in allowed:
                raise ValueError(f"--{key}: {getattr(self, key)!r} is not one of {allowed}")
        for key in ("batch_size", "buckets_per_octave", "decode_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"--{key} must be >= 1, got {getattr(self, key)}")


# ------------------------------------------------------------------------------------------ prepared inputs
@dataclasses.dataclass
class Batch:
    size: int
    enc: Any          # [b, Li] instance tokens (TAGI)
    full: Any         # [b, Lf] instruction + instance tokens (concatenation)
    dec_in: Any       # [b, T] (score mode; greedy: None)
    dec_tgt: Any


@dataclasses.dataclass
class Prepared:
    texts: TaskTexts
    hyper: Any                 # [1, Lh]
    batches: list[Batch]
    instruction_bytes: int     # t (without EOS)
    input_bytes: list[int]     # i per instance (without EOS)

    @property
    def num_instances(self) -> int:
        return sum(b.size for b in self.batches)


def _encode(vocab, text: str) -> list[int]:
    return list(vocab.encode(text)) + [EOS]


def prepare(texts: TaskTexts, vocab, s: Settings) -> Prepared:
    """Tokenise and pad: each path to its own need, per batch, instances sorted by length within the task."""
    hyper_ids = _encode(vocab, texts.instruction)
    bucket = functools.partial(C.bucket_length, per_octave=s.buckets_per_octave, minimum=16)
    hyper = jnp.asarray(C.pad_batch([hyper_ids], bucket(len(hyper_ids))))
    enc_ids = [_encode(vocab, x) for x in texts.inputs]
    full_ids = [_encode(vocab, x) for x in texts.full_inputs]
    tgt_ids = [_encode(vocab, x) for x in texts.targets]
    order = sorted(range(len(enc_ids)), key=lambda k: (len(enc_ids[k]), k))
    batches = []
    for start in range(0, len(order), s.batch_size):
        idx = order[start: start + s.batch_size]
        enc = [enc_ids[k] for k in idx]
        full = [full_ids[k] for k in idx]
        dec_in = dec_tgt = None
        if s.mode == "score":
            tgt = [tgt_ids[k] for k in idx]
            tlen = C.bucket_length(max(map(len, tgt)), s.buckets_per_octave, minimum=8)
            dec_tgt = jnp.asarray(C.pad_batch(tgt, tlen))
            dec_in = jnp.asarray(C.pad_batch([[0] + t[:-1] for t in tgt], tlen))  # start token 0, shifted
        batches.append(Batch(
            len(idx),
            jnp.asarray(C.pad_batch(enc, bucket(max(map(len, enc))))),
            jnp.asarray(C.pad_batch(full, bucket(max(map(len, full))))),
            dec_in, dec_tgt))
    return Prepared(texts, hyper, batches, len(hyper_ids) - 1, [len(x) - 1 for x in enc_ids])
