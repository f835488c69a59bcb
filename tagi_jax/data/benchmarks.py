"""One registration of a benchmark's SeqIO tasks from `config.data`: `register_benchmark` returns the `Benchmark`
that training (mixtures, task ids, categories) and evaluation (splits, protocol) both read.

Benchmarks (`data.benchmark`): the synthetic suite, Super-NaturalInstructions, P3 (T0's training datasets,
rank classification on its held-out sets) and open-domain QA (`qa`, `synthetic_qa`: tagi_jax.data.qa_benchmarks),
each a function in `_REGISTER`. Nothing is registered at import time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping, Sequence

import sentencepiece
import seqio
from ml_collections import config_dict

from tagi_jax import vocab as vocab_lib
from tagi_jax.config import ConfigError, get_key, require_int, require_path
from tagi_jax.data.qa_benchmarks import register_qa_benchmark
from tasks import pretrain, sni
from tasks.p3 import register as p3_register
from tasks.p3.datasets import MTEST11, P3_EVAL_MIXTURE, P3_TRAIN_MIXTURE
from tasks.synthetic import register as synthetic_register
from tasks.synthetic import suite as synthetic_suite

BENCHMARKS = ("synthetic", "sni", "p3", "qa", "synthetic_qa")
PRETRAIN_TASK = "tagi_pretrain"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: what evaluation reads (`eval_splits`, `categories`, the protocol) and, when
    registered for training, the training mixture, its task names (index = task id) and the pretraining task."""

    name: str
    vocabulary: object
    eval_splits: Mapping[str, tuple[str, ...]]  # split label ("unseen", "seen") -> task names
    categories: Mapping[str, str]  # task name -> category (P3: the template's dataset)
    rank_classification: bool = False  # evaluation protocol: rank classification (P3), else generation
    scoring: str = "sni"  # how generations are scored: the SNI metrics, or "qa" (open-domain QA exact match)
    train_mixture: str | None = None
    train_task_names: tuple[str, ...] = ()
    pretrain_task: str | None = None

    @property
    def protocol(self) -> str:
        """How methods are scored on it: "rank_classification" or "generation" (`tagi_jax.eval.runner`)."""
        return "rank_classification" if self.rank_classification else "generation"

    def teacher_keys(self, per: str) -> tuple[str, ...]:
        """The rows of the teacher table: one per training task, or one per category."""
        if per == "task":
            return self.train_task_names
        return tuple(sorted({self.categories.get(t, t) for t in self.train_task_names}))

    def teacher_index(self, per: str) -> dict[str, int]:
        """task name -> teacher row."""
        keys = {k: i for i, k in enumerate(self.teacher_keys(per))}
        if per == "task":
            return keys
        return {t: keys[self.categories.get(t, t)] for t in self.train_task_names}

    def select(self, tasks: Sequence[str] | None) -> dict[str, tuple[str, ...]]:
        """The evaluation splits restricted to `tasks` (each must be one of the benchmark's tasks)."""
        if not tasks:
            return dict(self.eval_splits)
        known = {t for names in self.eval_splits.values() for t in names}
        unknown = [t for t in tasks if t not in known]
        if unknown:
            sample = ", ".join(sorted(known)[:5])
            raise ValueError(f"unknown task {unknown[0]!r} for benchmark {self.name!r} ({len(known)} tasks, e.g. "
                             f"{sample})")
        wanted = set(tasks)
        return {label: tuple(t for t in names if t in wanted) for label, names in self.eval_splits.items()
                if any(t in wanted for t in names)}


def require_vocabulary(config: config_dict.ConfigDict, key: str, benchmark: str) -> str:
    """The vocabulary spec at `key`: 'byte', 'synthetic_spm' (synthetic suite only) or an existing file."""
    spec = get_key(config, key)
    if spec == vocab_lib.TRAINED:
        if benchmark not in ("synthetic", "synthetic_qa"):
            raise ConfigError(f"config key '{key}': {vocab_lib.TRAINED!r} is trained on the synthetic suite; "
                              f"benchmark {benchmark!r} needs the SentencePiece model of its checkpoint")
    elif spec != vocab_lib.BYTE:
        path = require_path(config, key, kind="file")
        try:
            sentencepiece.SentencePieceProcessor(model_file=os.path.expanduser(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError(f"config key '{key}': {path} is not a SentencePiece model ({_first_line(e)})") from None
    return spec


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@dataclasses.dataclass(frozen=True)
class P3Settings:
    """The checked `data.p3` section (see `tagi_jax.run.defaults.default_config`); 0 caps are None here."""

    templates_dir: str
    train_data_dir: str
    eval_data_dir: str
    train_datasets: tuple[str, ...]
    eval_datasets: tuple[str, ...]
    train_original_task_only: bool
    eval_original_task_only: bool
    max_train_examples_per_task: int | None
    mixing_cap: int | None


def _names(config: config_dict.ConfigDict, key: str) -> tuple[str, ...]:
    value = get_key(config, key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"config key '{key}' must be a list of dataset names, got {value!r}")
    if not value:
        raise ConfigError(f"config key '{key}' is empty: name at least one dataset")
    twice = sorted({v for v in value if list(value).count(v) > 1})
    if twice:
        raise ConfigError(f"config key '{key}' lists {twice} more than once")
    return tuple(value)


def _listed(items: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def require_p3(config: config_dict.ConfigDict, key: str = "data.p3", training: bool = True) -> P3Settings:
    """The P3 section at `key`, checked before any work: directories exist, every training dataset has
    promptsource templates and a `train.jsonl` (when `training`), every evaluation dataset is one of T0's
    held-out sets and at least one has its `validation.jsonl`. Each failure is one line naming the key."""
    dirs = ("templates_dir", "train_data_dir", "eval_data_dir") if training else ("templates_dir", "eval_data_dir")
    paths = {name: os.path.expanduser(require_path(config, f"{key}.{name}", kind="dir")) for name in dirs}
    templates_dir, eval_dir = paths["templates_dir"], paths["eval_data_dir"]
    train_dir, train = paths.get("train_data_dir", ""), ()
    if training:
        train = _names(config, f"{key}.train_datasets")
        unknown = [n for n in train if not os.path.isfile(os.path.join(templates_dir, n, "templates.yaml"))]
        if unknown:
            raise ConfigError(f"config key '{key}.train_datasets': unknown dataset(s) {_listed(unknown)}: no "
                              f"promptsource templates at {templates_dir}/<dataset>/templates.yaml")
        missing = [n for n in train if not os.path.isfile(os.path.join(train_dir, n, "train.jsonl"))]
        if missing:
            raise ConfigError(f"config key '{key}.train_data_dir': no {train_dir}/<dataset>/train.jsonl for "
                              f"{_listed(missing)}")
    held_out = _names(config, f"{key}.eval_datasets")
    unknown = [n for n in held_out if n not in MTEST11]
    if unknown:
        raise ConfigError(f"config key '{key}.eval_datasets': unknown dataset(s) {_listed(unknown)}; known: "
                          f"{', '.join(MTEST11)}")
    # tasks/p3's layout for the held-out sets: <dir>/<dataset>/validation.jsonl.
    if not any(os.path.isfile(os.path.join(eval_dir, n, "validation.jsonl")) for n in held_out):
        raise ConfigError(f"config key '{key}.eval_data_dir': none of {_listed(list(held_out))} has "
                          f"{eval_dir}/<dataset>/validation.jsonl")
    flags = {}
    for flag in ("train_original_task_only", "eval_original_task_only"):
        flags[flag] = get_key(config, f"{key}.{flag}")
        if not isinstance(flags[flag], bool):
            raise ConfigError(f"config key '{key}.{flag}' must be a bool, got {flags[flag]!r}")
    caps = {name: require_int(config, f"{key}.{name}", 0) or None
            for name in ("max_train_examples_per_task", "mixing_cap")}
    return P3Settings(templates_dir, train_dir, eval_dir, train, held_out, **flags, **caps)


def _synthetic_corpus(suite, path: str, seed: int, docs_per_task: int = 8) -> str:
    """Plain-text documents written from the *training* tasks only (definitions and worked instances).

    The demo has no C4: this gives the backbone and the hypernetwork something language-like to pretrain on
    without ever showing an unseen task.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # hosts sharing a work directory each write their own, then rename
    with open(tmp, "w") as f:
        for task in suite.train_tasks:  # seen tasks only
            for d in range(docs_per_task):
                lines = [task.definition]
                for inst in task.instances("train", 2, seed=seed * 1000 + d):
                    lines.append(f"Input: {inst['input']} Output: {inst['output'][0]}.")
                f.write(json.dumps({"text": " ".join(lines)}) + "\n")
    os.replace(tmp, path)
    return path


def _register_synthetic(data_cfg, spec: str, workdir: str | None, training: bool) -> tuple[Benchmark, str]:
    s = data_cfg.synthetic
    suite = synthetic_suite.suite_for(s.seed, s.num_train_tasks, s.num_unseen_tasks, s.train_instances_per_task,
                                      s.eval_instances_per_task)
    if training and spec == vocab_lib.TRAINED:
        text = synthetic_suite.vocabulary_text(suite, synthetic_suite.num_positive_examples(data_cfg.setting),
                                               seed=s.seed)
        try:
            vocab_lib.train_sentencepiece(text, vocab_lib.trained_model_path(workdir), s.vocab_size)
        except RuntimeError as e:  # SentencePiece's check, e.g. fewer pieces than the text's characters
            raise ConfigError(f"config key 'data.synthetic.vocab_size' ({s.vocab_size}): SentencePiece cannot "
                              f"train that vocabulary ({_first_line(e)[-120:]})") from None
    vocabulary = vocab_lib.get_vocabulary(spec, workdir)
    info = synthetic_register.register_synthetic(
        vocabulary, seed=s.seed, setting=data_cfg.setting, num_train_tasks=s.num_train_tasks,
        num_unseen_tasks=s.num_unseen_tasks, train_instances_per_task=s.train_instances_per_task,
        eval_instances_per_task=s.eval_instances_per_task, suite=suite)
    splits = {"unseen": tuple(info["unseen_task_names"]), "seen": tuple(info["train_task_names"])}
    source = ""
    if training:
        source = data_cfg.pretrain.source or os.path.dirname(_synthetic_corpus(
            suite, os.path.join(workdir, "data", "pretrain_corpus", "corpus.jsonl"), seed=s.seed))
    bench = Benchmark("synthetic", vocabulary, {k: v for k, v in splits.items() if v}, dict(info["categories"]),
                      train_mixture=info["mixtures"]["train"], train_task_names=tuple(info["train_task_names"]))
    return bench, source


def _register_sni(data_cfg, spec: str, workdir: str | None, training: bool) -> tuple[Benchmark, str]:
    vocabulary = vocab_lib.get_vocabulary(spec)
    sni_dir = require_path(config_dict.ConfigDict({"data": data_cfg}), "data.sni.dir", kind="dir")
    sni.register_sni(sni_dir, vocabulary, setting=data_cfg.setting,
                     max_train_instances=data_cfg.sni.max_train_instances,
                     max_test_instances=data_cfg.sni.max_test_instances, seed=data_cfg.sni.seed,
                     skip_bad_tasks=data_cfg.sni.skip_bad_tasks, split_name=data_cfg.sni.split)
    # The registered tasks, so files skipped with `skip_bad_tasks` get no teacher row and no evaluation.
    registered = {m: tuple(t.name for t in seqio.get_mixture_or_task(m).tasks) for m in ("sni_train", "sni_test")}
    bench = Benchmark("sni", vocabulary, {"unseen": registered["sni_test"]},
                      sni.sni_task_categories(sni_dir, data_cfg.sni.split), train_mixture="sni_train",
                      train_task_names=registered["sni_train"])
    return bench, data_cfg.pretrain.source


def _register_p3(data_cfg, spec: str, workdir: str | None, training: bool) -> tuple[Benchmark, str]:
    vocabulary = vocab_lib.get_vocabulary(spec)
    s = require_p3(config_dict.ConfigDict({"data": data_cfg}), "data.p3", training=training)
    train: dict[str, list[str]] = {}
    if training:
        train = p3_register.register_p3_train(
            s.templates_dir, s.train_data_dir, s.train_datasets, vocabulary,
            original_task_only=s.train_original_task_only, max_examples_per_task=s.max_train_examples_per_task,
            mixing_cap=s.mixing_cap, mixture_name=P3_TRAIN_MIXTURE)
    held_out = p3_register.register_p3_eval(s.templates_dir, s.eval_data_dir, vocabulary, datasets=s.eval_datasets,
                                            original_task_only=s.eval_original_task_only,
                                            mixture_name=P3_EVAL_MIXTURE)
    # A template's category is its dataset, so `tagi.teachers_per = "category"` gives one teacher per dataset.
    categories = {t: ds for registered in (train, held_out) for ds, names in registered.items() for t in names}
    bench = Benchmark("p3", vocabulary, {"unseen": tuple(t for names in held_out.values() for t in names)},
                      categories, rank_classification=True,
                      train_mixture=P3_TRAIN_MIXTURE if training else None,
                      train_task_names=tuple(t for names in train.values() for t in names))
    return bench, data_cfg.pretrain.source


def _register_qa(data_cfg, spec: str, workdir: str | None, training: bool) -> tuple[Benchmark, str]:
    fields, source = register_qa_benchmark(data_cfg, spec, workdir, training)
    return Benchmark(data_cfg.benchmark, **fields), source


_REGISTER = {"synthetic": _register_synthetic, "sni": _register_sni, "p3": _register_p3, "qa": _register_qa,
             "synthetic_qa": _register_qa}


def register_benchmark(data_cfg: config_dict.ConfigDict, workdir: str | None = None, *,
                       training: bool = True) -> Benchmark:
    """Register the configured benchmark (`data_cfg` is a run config's `data` section); with `training`, also
    its training tasks and the hypernetwork-pretraining task (a synthetic run first trains its vocabulary and
    writes its pretraining corpus into `workdir`). Paths are checked with the config key named."""
    name = data_cfg.get("benchmark")
    if name not in _REGISTER:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
    spec = require_vocabulary(config_dict.ConfigDict({"data": data_cfg}), "data.vocabulary", name)
    bench, source = _REGISTER[name](data_cfg, spec, workdir, training)
    if not training:
        return bench
    if not source:
        raise ConfigError("config key 'data.pretrain.source' is empty: name a text directory or 'tfds:c4/en'")
    if not source.startswith("tfds:") and not os.path.exists(source):
        raise ConfigError(f"config key 'data.pretrain.source': path not found: {source}")
    pretrain.register_pretrain(source, bench.vocabulary, name=PRETRAIN_TASK, seed=data_cfg.pretrain.seed,
                               min_words=data_cfg.pretrain.min_words)
    return dataclasses.replace(bench, pretrain_task=PRETRAIN_TASK)
