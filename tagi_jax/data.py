"""Which SeqIO tasks a run reads, registered from the `config.data` section, and the batches each stage sees.

`register_benchmark(config.data, workdir)` registers the instruction benchmark (the synthetic suite,
Super-NaturalInstructions, or P3: T0's training datasets and held-out evaluation) and the hypernetwork-pretraining
task, and returns a `DataInfo` naming the mixtures, the training task names (their index is the task id the
teacher table is indexed by) and their categories. Nothing is registered at import time.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator, Mapping, Sequence

from ml_collections import config_dict

from tagi_jax import features as F
from tagi_jax.config import ConfigError, get_key, require_choice, require_int, require_path
from tagi_jax.metrics import MTEST11

BENCHMARKS = ("synthetic", "sni", "p3")
# T0's training datasets as promptsource paths: the `do_train=BASE` rows of t0/datasets.csv in
# bigscience-workshop/t-zero (38 dataset/subsets: every template of each is a training task).
T0_TRAIN_DATASETS = (
    # multiple-choice QA
    "cos_e/v1.11", "cosmos_qa", "dream", "qasc", "quail", "quarel", "quartz", "sciq", "social_i_qa",
    "wiki_hop/original", "wiqa",
    # extractive QA
    "adversarial_qa/dbidaf", "adversarial_qa/dbert", "adversarial_qa/droberta", "duorc/SelfRC",
    "duorc/ParaphraseRC", "ropes", "quoref",
    # closed-book QA
    "kilt_tasks/hotpotqa", "wiki_qa",
    # structure to text
    "common_gen", "wiki_bio",
    # sentiment
    "amazon_polarity", "app_reviews", "imdb", "rotten_tomatoes", "yelp_review_full",
    # summarization
    "cnn_dailymail/3.0.0", "gigaword", "multi_news", "samsum", "xsum",
    # topic classification
    "ag_news", "dbpedia_14", "trec",
    # paraphrase identification
    "glue/mrpc", "glue/qqp", "paws/labeled_final",
)
P3_TRAIN_MIXTURE, P3_EVAL_MIXTURE = "p3_train", "p3_t0_eval"


@dataclasses.dataclass(frozen=True)
class DataInfo:
    vocabulary: object
    train_mixture: str
    eval_mixtures: Mapping[str, str]  # split label ("unseen", "seen") -> mixture name
    pretrain_task: str
    train_task_names: tuple[str, ...]  # index = task id
    categories: Mapping[str, str]  # task name -> category
    rank_classification: bool = False  # evaluation protocol: rank classification (P3), else generation

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


def task_lengths(data_cfg: config_dict.ConfigDict) -> dict[str, int]:
    return {name: int(data_cfg.lengths[name]) for name in F.TEXT_FEATURES}


def pretrain_lengths(data_cfg: config_dict.ConfigDict) -> dict[str, int]:
    return {name: int(data_cfg.pretrain.lengths[name]) for name in F.TEXT_FEATURES}


def _synthetic_corpus(suite_info: Mapping, path: str, seed: int, docs_per_task: int = 8) -> str:
    """Plain-text documents written from the *training* tasks only (definitions and worked instances).

    The demo has no C4: this gives the backbone and the hypernetwork something language-like to pretrain on
    without ever showing an unseen task.
    """
    suite = suite_info["suite"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for task in suite.train_tasks:  # seen tasks only
            for d in range(docs_per_task):
                lines = [task.definition]
                for inst in task.instances("train", 2, seed=seed * 1000 + d):
                    lines.append(f"Input: {inst['input']} Output: {inst['output'][0]}.")
                f.write(json.dumps({"text": " ".join(lines)}) + "\n")
    os.replace(tmp, path)
    return path


def require_vocabulary(config: config_dict.ConfigDict, key: str, benchmark: str) -> str:
    """The vocabulary spec at `key`: 'byte', 'synthetic_spm' (synthetic suite only) or an existing file."""
    from tagi_jax import vocab as vocab_lib

    spec = get_key(config, key)
    if spec == vocab_lib.TRAINED:
        if benchmark != "synthetic":
            raise ConfigError(f"config key '{key}': {vocab_lib.TRAINED!r} is trained on the synthetic suite; "
                              f"benchmark {benchmark!r} needs the SentencePiece model of its checkpoint")
    elif spec != vocab_lib.BYTE:
        require_path(config, key, kind="file")
    return spec


@dataclasses.dataclass(frozen=True)
class P3Settings:
    """The checked `data.p3` section (see `pipeline.default_config`); 0 caps are None here."""

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


def require_p3(config: config_dict.ConfigDict, key: str = "data.p3") -> P3Settings:
    """The P3 section at `key`, checked before any work: directories exist, every training dataset has
    promptsource templates and a `train.jsonl`, every evaluation dataset is one of T0's held-out sets and at
    least one has its `validation.jsonl`. Each failure is one line naming the key."""
    templates_dir, train_dir, eval_dir = (os.path.expanduser(require_path(config, f"{key}.{name}", kind="dir"))
                                          for name in ("templates_dir", "train_data_dir", "eval_data_dir"))
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
    # tasks/p3.py's layout for the held-out sets (P3_EVAL_DATASETS): <dir>/<dataset>/validation.jsonl.
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


def register_benchmark(data_cfg: config_dict.ConfigDict, workdir: str) -> DataInfo:
    """Register the configured benchmark and pretraining task; validates paths with the key named."""
    from tagi_jax import vocab as vocab_lib
    from tasks import pretrain

    benchmark = require_choice(data_cfg, "benchmark", BENCHMARKS)
    vocab_spec = require_vocabulary(data_cfg, "vocabulary", benchmark)
    rank_classification = False

    if benchmark == "synthetic":
        from tasks import synthetic

        s = data_cfg.synthetic
        suite = synthetic.suite_for(s.seed, s.num_train_tasks, s.num_unseen_tasks, s.train_instances_per_task,
                                    s.eval_instances_per_task)
        if vocab_spec == vocab_lib.TRAINED:
            text = synthetic.vocabulary_text(suite, synthetic.num_positive_examples(data_cfg.setting), seed=s.seed)
            vocab_lib.train_sentencepiece(text, vocab_lib.trained_model_path(workdir), s.vocab_size)
        vocabulary = vocab_lib.get_vocabulary(vocab_spec, workdir)
        info = synthetic.register_synthetic(
            vocabulary,
            seed=s.seed,
            setting=data_cfg.setting,
            num_train_tasks=s.num_train_tasks,
            num_unseen_tasks=s.num_unseen_tasks,
            train_instances_per_task=s.train_instances_per_task,
            eval_instances_per_task=s.eval_instances_per_task,
            suite=suite,
        )
        train_mixture = info["mixtures"]["train"]
        eval_mixtures = {"unseen": info["mixtures"]["unseen_eval"], "seen": info["mixtures"]["seen_eval"]}
        train_names = tuple(info["train_task_names"])
        categories = dict(info["categories"])
        source = data_cfg.pretrain.source or os.path.dirname(_synthetic_corpus(
            info, os.path.join(workdir, "data", "pretrain_corpus", "corpus.jsonl"), seed=s.seed
        ))
    elif benchmark == "p3":
        from tasks import p3

        vocabulary = vocab_lib.get_vocabulary(vocab_spec)
        s = require_p3(data_cfg, "p3")
        train = p3.register_p3_train(
            s.templates_dir, s.train_data_dir, s.train_datasets, vocabulary,
            original_task_only=s.train_original_task_only, max_examples_per_task=s.max_train_examples_per_task,
            mixing_cap=s.mixing_cap, mixture_name=P3_TRAIN_MIXTURE)
        held_out = p3.register_p3_eval(s.templates_dir, s.eval_data_dir, vocabulary, datasets=s.eval_datasets,
                                       original_task_only=s.eval_original_task_only, mixture_name=P3_EVAL_MIXTURE)
        train_mixture, eval_mixtures = P3_TRAIN_MIXTURE, {"unseen": P3_EVAL_MIXTURE}
        train_names = tuple(t for names in train.values() for t in names)
        # A template's category is its dataset, so `tagi.teachers_per = "category"` gives one teacher per dataset.
        categories = {t: ds for registered in (train, held_out) for ds, names in registered.items() for t in names}
        rank_classification = True
        source = data_cfg.pretrain.source
    else:
        from tasks import sni

        vocabulary = vocab_lib.get_vocabulary(vocab_spec)
        sni_dir = require_path(data_cfg, "sni.dir", kind="dir")
        names = sni.register_sni(
            sni_dir,
            vocabulary,
            setting=data_cfg.setting,
            max_train_instances=data_cfg.sni.max_train_instances,
            max_test_instances=data_cfg.sni.max_test_instances,
            seed=data_cfg.sni.seed,
            skip_bad_tasks=data_cfg.sni.skip_bad_tasks,
            split_name=data_cfg.sni.split,
        )
        del names
        train_mixture, eval_mixtures = "sni_train", {"unseen": "sni_test"}
        import seqio

        # The registered tasks, so files skipped with `skip_bad_tasks` get no teacher row.
        train_names = tuple(t.name for t in seqio.get_mixture_or_task("sni_train").tasks)
        categories = sni.sni_task_categories(sni_dir, data_cfg.sni.split)
        source = data_cfg.pretrain.source
    if not source:
        raise ConfigError("config key 'data.pretrain.source' is empty: name a text directory or 'tfds:c4/en'")
    if not source.startswith("tfds:") and not os.path.exists(source):
        raise ConfigError(f"config key 'data.pretrain.source': path not found: {source}")
    pretrain.register_pretrain(source, vocabulary, name="tagi_pretrain", seed=data_cfg.pretrain.seed,
                               min_words=data_cfg.pretrain.min_words)
    return DataInfo(
        vocabulary=vocabulary,
        train_mixture=train_mixture,
        eval_mixtures=eval_mixtures,
        pretrain_task="tagi_pretrain",
        train_task_names=train_names,
        categories=categories,
        rank_classification=rank_classification,
    )


def train_batches(
    mixture: str,
    lengths: Mapping[str, int],
    batch_size: int,
    task_names: Sequence[str],
    seed: int,
    start_step: int,
    host_slice: slice | None = None,
) -> Iterator[dict]:
    """Endless shuffled batches of model features for training, starting at batch `start_step`.

    The order is a function of the seed only, so a resumed run sees exactly the batches an uninterrupted
    run would. `task_id` is a task's position in `task_names` (-1 for others).
    """
    from tagi_jax.feature_converter import TagiFeatureConverter, get_model_dataset, to_numpy_batches

    converter = TagiFeatureConverter(task_names=list(task_names), count_truncation=True)
    ds = get_model_dataset(mixture, lengths, converter, split="train", shuffle=True, seed=seed, num_epochs=None)
    for batch in to_numpy_batches(ds, batch_size, drop_remainder=True, start_batch=start_step):
        out = {k: v for k, v in batch.items() if k in F.MODEL_FEATURES}
        if host_slice is not None:
            out = {k: v[host_slice] for k, v in out.items()}
        yield out


def eval_examples(mixture: str, max_per_task: int | None = None) -> list[dict]:
    """The string features and references of a mixture's evaluation split, in a deterministic order."""
    import seqio

    provider = seqio.get_mixture_or_task(mixture)
    tasks = provider.tasks if isinstance(provider, seqio.Mixture) else [provider]
    tokenize_only = (seqio.preprocessors.tokenize, seqio.preprocessors.append_eos)
    out = []
    for task in sorted(tasks, key=lambda t: t.name):
        split = "test" if "test" in task.splits else "validation"
        # Tasks that only tokenize: read the strings from the source, skipping the tokenizer graph (~0.1 s a
        # task, a minute for the demo's 450 tasks).
        if all(p in tokenize_only for p in task.preprocessors):
            ds, suffix = task.source.get_dataset(split=split, shuffle=False), ""
        else:
            ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, trim_output_features=False)
            suffix = "_pretokenized"
        if max_per_task is not None:
            ds = ds.take(max_per_task)
        for i, ex in enumerate(ds.as_numpy_iterator()):
            row = {name: _text(ex[name + suffix]) for name in F.TEXT_FEATURES}
            row[F.TASK_NAME] = _text(ex[F.TASK_NAME])
            refs = ex.get(F.REFERENCES)
            row[F.REFERENCES] = [_text(r) for r in refs] if refs is not None else [row[F.TARGETS]]
            row["id"] = f"{row[F.TASK_NAME]}-{i}"
            out.append(row)
    return out


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)
