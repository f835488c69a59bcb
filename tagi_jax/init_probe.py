"""What `launch/init.py` finds out before it proposes anything: the devices, the backbone checkpoint (read with the
importer), its vocabulary, and a sample of the chosen data rendered as the training features, with token lengths.

Every check raises ValueError / FileNotFoundError with a one-line message, which the questionnaire shows beside
the question (or, with flags only, as `error: --flag: ...`).
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import random
import tempfile
from typing import Callable, Mapping, Sequence

import jax
import numpy as np
import sentencepiece

from tagi_jax import features as F
from tagi_jax import hf
from tagi_jax import vocab as vocab_lib
from tagi_jax.models.t5_config import T5Config
from tasks import sni
from tasks.p3 import datasets as p3_datasets
from tasks.p3 import render as p3_render
from tasks.p3 import templates as p3_templates
from tasks.synthetic import suite as synthetic_suite

GIB = 2 ** 30
# T5 v1.1 / LM-adapt sizes by d_model (T5 v1.0 and mT5 use the same widths).
SIZE_NAMES = {512: "small", 768: "base", 1024: "large", 2048: "xl", 4096: "xxl"}


# ------------------------------------------------------------------------------------------------ devices
@dataclasses.dataclass(frozen=True)
class Devices:
    platform: str  # "cpu", "gpu", "tpu"
    kind: str  # device_kind, e.g. "NVIDIA H100 80GB HBM3"
    count: int
    memory_bytes: int | None  # per device, where known
    memory_source: str  # "reported by the backend", "host memory / devices", or "unknown"

    def describe(self) -> str:
        mem = (f"{self.memory_bytes / GIB:.1f} GiB each ({self.memory_source})" if self.memory_bytes
               else "memory not reported")
        return f"{self.count} x {self.platform} ({self.kind}), {mem}"


def detect_devices() -> Devices:
    """jax.devices(): platform, kind, count and each device's memory (`memory_stats()["bytes_limit"]` where the
    backend reports it; CPU devices share the host's memory, so that divided by their number)."""
    devices = jax.devices()
    d = devices[0]
    stats = None
    try:
        stats = d.memory_stats()
    except Exception:  # noqa: BLE001 - backends without the call raise various types; memory is then unknown
        stats = None
    if stats and stats.get("bytes_limit"):
        return Devices(d.platform, d.device_kind, len(devices), int(stats["bytes_limit"]), "reported by the backend")
    if d.platform == "cpu":
        try:
            host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            return Devices(d.platform, d.device_kind, len(devices), host // len(devices), "host memory / devices")
        except (ValueError, OSError):
            pass
    return Devices(d.platform, d.device_kind, len(devices), None, "unknown")


# ------------------------------------------------------------------------------------------------ backbone
@dataclasses.dataclass(frozen=True)
class Backbone:
    path: str
    t5: T5Config
    num_params: int
    model_type: str

    @property
    def family(self) -> str:
        if self.model_type == "mt5":
            return "mT5 (gated GELU, multilingual vocabulary)"
        if self.t5.is_gated:
            return "T5 v1.1 / LM-adapt (gated GELU, untied head)" if not self.t5.tie_word_embeddings else \
                "T5 v1.1-style (gated GELU, tied head)"
        return "T5 v1.0 (ReLU, tied head)"

    @property
    def size(self) -> str:
        return SIZE_NAMES.get(self.t5.d_model, f"custom (d_model {self.t5.d_model})")

    @property
    def config_size(self) -> str:
        """The size argument of configs/sni_t5_lm.py and configs/p3_t0.py whose hyper-parameters fit best."""
        return "base" if self.t5.d_model <= 1024 else ("xl" if self.t5.d_model <= 2048 else "xxl")

    def describe(self) -> str:
        t = self.t5
        return (f"{self.family}, size {self.size}: {self.num_params / 1e6:.1f}M parameters, d_model {t.d_model}, "
                f"{t.num_encoder_layers}+{t.num_decoder_layers} layers, vocabulary {t.vocab_size}")


def check_backbone(path: str) -> Backbone:
    """Import the checkpoint with `tagi_jax.hf.load_t5` (every tensor read and its shape checked; bfloat16 on the
    host to halve the memory this takes) and describe it."""
    path = os.path.abspath(os.path.expanduser(path))
    t5, params = hf.load_t5(path, param_dtype="bfloat16")
    count = int(sum(np.size(v) for v in jax.tree_util.tree_leaves(params)))
    # The model type (t5 / mt5) is not part of T5Config; the importer has already read this file.
    with open(os.path.join(path, hf.CONFIG_FILE)) as f:
        model_type = str(json.load(f).get("model_type", "t5"))
    return Backbone(path, t5, count, model_type)


def check_vocabulary(path: str, model_vocab_size: int | None) -> int:
    """The SentencePiece model's size; it must load and fit the backbone's embedding table."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such SentencePiece model file")
    try:
        size = sentencepiece.SentencePieceProcessor(model_file=path).get_piece_size()
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path} is not a SentencePiece model ({str(e).strip().splitlines()[0][:120]})") from None
    if model_vocab_size is not None and size > model_vocab_size:
        raise ValueError(f"{path} has {size} pieces but the backbone embeds only {model_vocab_size} ids")
    return size


def tokenizer(spec: str, synthetic_text: Callable[[], Sequence[str]] | None = None,
              vocab_size: int = 1024) -> Callable[[Sequence[str]], list[int]]:
    """texts -> token counts with EOS, as training measures them: a SentencePiece path, "byte", or
    "synthetic_spm" (trained now, in a temporary folder, on `synthetic_text()` as a run trains it at start)."""
    if spec == vocab_lib.BYTE:
        return lambda texts: [len(t.encode("utf-8")) + 1 for t in texts]
    if spec == vocab_lib.TRAINED:
        with tempfile.TemporaryDirectory(prefix="tagi_init_vocab_") as tmp:  # loaded into memory, then removed
            path = vocab_lib.train_sentencepiece(synthetic_text(), os.path.join(tmp, "spm.model"), vocab_size)
            sp = sentencepiece.SentencePieceProcessor(model_file=path)
    else:
        sp = sentencepiece.SentencePieceProcessor(model_file=os.path.expanduser(spec))
    return lambda texts: [len(ids) + 1 for ids in sp.encode(list(texts))]


# ------------------------------------------------------------------------------------------------ data
def sni_task_files(folder: str) -> list[str]:
    """The SNI-format task files of a folder of the user's own tasks (`*.json`, or `tasks/*.json`)."""
    folder = os.path.expanduser(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: not a directory")
    files = sorted(glob.glob(os.path.join(folder, "*.json"))) or sorted(glob.glob(os.path.join(folder, "tasks",
                                                                                                "*.json")))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.json task files (SNI format: Definition, Positive Examples, "
                                "Instances)")
    return files


def check_directory(text: str) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such directory")
    return path


def check_sni_dir(text: str) -> str:
    """A natural-instructions checkout whose default split lists training and test tasks."""
    path = check_directory(text)
    split = sni.read_split(path)
    if not split["train"] or not split["test"]:
        raise ValueError(f"{path}: splits/default lists {len(split['train'])} train and {len(split['test'])} test "
                         "tasks; both are needed")
    return path


def check_task_files(text: str) -> list[str]:
    """The user's task files, every one parsed and validated as training will read it."""
    files = sni_task_files(text)
    if len(files) < 2:
        raise ValueError(f"{text}: {len(files)} task file; training and evaluation need at least two")
    for path in files:
        sni.load_task_file(path)  # SNIFormatError (a ValueError) names the file and the field
    return files


def check_test_tasks(text: str, names: Sequence[str]) -> tuple[str, ...]:
    chosen = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in chosen if n not in names]
    if unknown:
        more = " ..." if len(names) > 6 else ""
        raise ValueError(f"unknown task {unknown[0]!r} (tasks: {', '.join(names[:6])}{more})")
    if not chosen or len(chosen) == len(names):
        raise ValueError("hold out at least one task and train on at least one")
    return chosen


def check_p3_train(text: str, templates_dir: str) -> tuple[str, tuple[str, ...]]:
    """(folder, T0 training datasets found in it with their promptsource templates)."""
    path = check_directory(text)
    found = tuple(d for d in p3_datasets.T0_TRAIN_DATASETS if os.path.isfile(os.path.join(path, d, "train.jsonl"))
                  and os.path.isfile(os.path.join(templates_dir, d, "templates.yaml")))
    if not found:
        raise FileNotFoundError(f"{path}: no <dataset>/train.jsonl of T0's training datasets with templates")
    return path, found


def synthetic_examples(setting: str, num_tasks: int = 360, per_task: int = 4, seed: int = 0) -> list[dict]:
    """Training examples of the synthetic suite as the demo registers it (the first `num_tasks` seen tasks)."""
    suite = synthetic_suite.suite_for(seed, 360, 90, 100, 20)  # the demo's suite (configs/demo.py)
    num_pos = synthetic_suite.num_positive_examples(setting)
    return [synthetic_suite.format_example(task, inst, num_pos)
            for task in suite.train_tasks[:num_tasks] for inst in task.instances("train", per_task, seed=seed)]


def synthetic_vocabulary_text(setting: str, seed: int = 0) -> list[str]:
    suite = synthetic_suite.suite_for(seed, 360, 90, 100, 20)
    return synthetic_suite.vocabulary_text(suite, synthetic_suite.num_positive_examples(setting), seed=seed)


def sni_examples(files: Sequence[str], setting: str, count: Callable[[Sequence[str]], list[int]] | None = None,
                 max_tasks: int = 60, per_task: int = 20, seed: int = 0, max_source_length: int = 1024) -> list[dict]:
    """Training examples of up to `max_tasks` task files (a seeded choice), rendered as training renders them
    (with `count`, demonstrations that would overflow `max_source_length` are dropped, as tasks/sni.py does)."""
    n_pos, n_neg = sni.setting_counts(setting, 2, 2)
    chosen = list(files)
    if len(chosen) > max_tasks:
        chosen = sorted(random.Random(seed).sample(chosen, max_tasks))
    out = []
    for path in chosen:
        task = sni.load_task_file(path)  # SNIFormatError (a ValueError) names the file and field
        name = os.path.splitext(os.path.basename(path))[0]
        out += sni.build_examples(task, name, sni.TRAIN, n_pos, n_neg, max_instances=per_task, seed=seed,
                                  rng_key=name, token_length=(lambda t: count([t])[0]) if count else None,
                                  max_source_length=max_source_length if count else None)
    return out


def p3_examples(templates_dir: str, eval_data_dir: str, per_template: int = 20,
                datasets: Sequence[str] = p3_datasets.MTEST11) -> list[dict]:
    """Rendered examples of the held-out sets found in `eval_data_dir` (the training mixture uses the same
    promptsource templates on other datasets; its files are often too large to sample quickly)."""
    out = []
    for name in datasets:
        spec = p3_datasets.P3_EVAL_DATASETS[name]
        path = os.path.join(eval_data_dir, spec.data_subdir or spec.name, f"{spec.split}.jsonl")
        if not os.path.isfile(path):
            continue
        rows = p3_datasets.read_jsonl_split(spec.split, path, spec)[:per_template]
        for template in p3_templates.load_templates(templates_dir, spec.templates).select(True):
            for i, ex in enumerate(rows):
                fields = spec.instance_fields if spec.instance_fields is not None else p3_render.string_fields(ex)
                rendered = p3_render.render_example(template, ex, fields, name, False)
                if rendered is not None:
                    out.append(rendered)
    if not out:
        raise FileNotFoundError(f"{eval_data_dir}: none of {', '.join(datasets)} has <dataset>/validation.jsonl")
    return out


# ------------------------------------------------------------------------------------------------ lengths
def token_lengths(examples: Sequence[Mapping], count: Callable[[Sequence[str]], list[int]]) -> dict[str, np.ndarray]:
    return {f: np.asarray(count([str(ex[f]) for ex in examples]), np.int64) for f in F.TEXT_FEATURES}


def propose_length(lengths: np.ndarray, coverage: float = 0.95, multiple: int = 8) -> int:
    """The smallest multiple of `multiple` that holds at least `coverage` of the examples whole (a multiple of
    8 keeps accelerator tiles full), at least 8."""
    need = int(np.ceil(np.quantile(lengths, coverage, method="higher")))
    return max(multiple, -(-need // multiple) * multiple)


def truncation_note(lengths: np.ndarray, length: int) -> str:
    cut = int(np.sum(lengths > length))
    share = 100.0 * cut / max(len(lengths), 1)
    if not cut:
        return f"nothing truncated (longest {int(lengths.max())})"
    return (f"{cut} of {len(lengths)} sampled examples ({share:.1f}%) truncated, the longest from "
            f"{int(lengths.max())} tokens")


def histogram(lengths: np.ndarray, name: str, bins: int = 8, width: int = 36) -> str:
    """A text histogram of token lengths with its median, 95th percentile and maximum."""
    edges = np.unique(np.linspace(lengths.min(), lengths.max() + 1, bins + 1).astype(int))
    if len(edges) < 2:
        edges = np.asarray([lengths.min(), lengths.min() + 1])
    counts, _ = np.histogram(lengths, bins=edges)
    top = max(int(counts.max()), 1)
    lines = [f"{name}: median {int(np.median(lengths))}, 95% {int(np.quantile(lengths, 0.95, method='higher'))}, "
             f"max {int(lengths.max())} tokens ({len(lengths)} examples)"]
    for lo, hi, c in zip(edges[:-1], edges[1:], counts):
        lines.append(f"  {lo:>6}-{hi - 1:<6} {'#' * int(round(width * c / top)):<{width}} {c}")
    return "\n".join(lines)
