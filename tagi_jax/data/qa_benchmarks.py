"""The two open-domain QA benchmarks of the pipeline (IAG): `qa` (NQ-open, WebQuestions or TriviaQA files, with
optional retrieved passages for the Fusion-in-Decoder teacher and imagined documents for the student) and
`synthetic_qa` (the CPU-sized closed-book suite of `tasks.synthetic_qa`). Each registration returns what
`tagi_jax.data.benchmarks.Benchmark` holds; evaluation scores generations with the DPR exact match.

Features (tasks/qa.py): inputs "question: q" (+ " context: <imagined document>" with
`data.qa.student_document = "imagined"`), hyper_inputs the question (the hypernetwork reads each question:
`tagi.instruction_source = "instance"`), full_inputs one "question: q context: <passage>" per passage.
"""
from __future__ import annotations

import json
import os

from ml_collections import config_dict

from tagi_jax import vocab as vocab_lib
from tagi_jax.config import ConfigError, require_choice, require_int, require_path
from tasks import qa, synthetic_qa
from tasks.common import function_source, register_task

QA_BENCHMARKS = ("qa", "synthetic_qa")
STUDENT_DOCUMENTS = ("none", "imagined")
SYNTHETIC_PREFIX = "sqa"


def check_qa(config: config_dict.ConfigDict, benchmark: str, training: bool = True) -> None:
    """Load-time checks of `data.qa` (and `data.synthetic_qa`), each naming its key."""
    student = require_choice(config, "data.qa.student_document", STUDENT_DOCUMENTS)
    passages = require_int(config, "data.qa.num_passages", 0)
    if passages:
        require_int(config, "data.qa.passage_length", 2)
    elif int(config.data.qa.passage_length):
        raise ConfigError("config key 'data.qa.passage_length' is set but 'data.qa.num_passages' is 0")
    for name in ("max_train_examples", "max_eval_examples"):
        require_int(config, f"data.qa.{name}", 0)
    if benchmark == "synthetic_qa":
        s = config.data.synthetic_qa
        for name in ("num_entities", "test_attributes_per_entity", "corpus_copies", "vocab_size"):
            require_int(config, f"data.synthetic_qa.{name}", 1)
        if not 0.0 <= float(s.test_entity_fraction) < 1.0:
            raise ConfigError(f"config key 'data.synthetic_qa.test_entity_fraction' must be in [0, 1), got "
                              f"{s.test_entity_fraction}")
        if not 0.0 <= float(s.imagined_accuracy) <= 1.0:
            raise ConfigError(f"config key 'data.synthetic_qa.imagined_accuracy' must be in [0, 1], got "
                              f"{s.imagined_accuracy}")
        if passages > int(s.num_entities):
            raise ConfigError(f"config key 'data.qa.num_passages' ({passages}) exceeds "
                              f"'data.synthetic_qa.num_entities' ({s.num_entities})")
        return
    q = config.data.qa
    require_path(config, "data.qa.dir", kind="dir")
    dataset = require_choice(config, "data.qa.dataset", tuple(qa.QA_DATASETS))
    split = require_choice(config, "data.qa.eval_split", qa.EVAL_SPLITS)
    if split not in qa.QA_DATASETS[dataset]:
        raise ConfigError(f"config key 'data.qa.eval_split': {dataset} has no {split!r} split")
    if not os.path.isfile(qa.qa_file(q.dir, dataset, split)):
        raise ConfigError(f"config key 'data.qa.dir': no {qa.QA_DATASETS[dataset][split]} under {q.dir}")
    if training and not q.train_file and qa.TRAIN not in qa.QA_DATASETS[dataset]:
        raise ConfigError(f"config key 'data.qa.train_file' is empty and {dataset} has no train split in "
                          f"{q.dir}: name the training JSON Lines file")
    if q.train_file:
        require_path(config, "data.qa.train_file", kind="file")
    if passages and not q.passages_file:
        raise ConfigError("config key 'data.qa.num_passages' is set but 'data.qa.passages_file' is empty")
    if q.passages_file:
        require_path(config, "data.qa.passages_file", kind="file")
        if not passages:
            raise ConfigError("config key 'data.qa.passages_file' is set but 'data.qa.num_passages' is 0")
    if student == "imagined":
        require_path(config, "data.qa.imagined_file", kind="file")


def fid_settings(data_cfg) -> tuple[int, int]:
    """(passages, passage length) of the Fusion-in-Decoder reader: (0, 0) outside the QA benchmarks."""
    if data_cfg.get("benchmark") not in QA_BENCHMARKS:
        return 0, 0
    return int(data_cfg.qa.num_passages), int(data_cfg.qa.passage_length)


def register_qa_benchmark(data_cfg, spec: str, workdir: str | None, training: bool) -> tuple[dict, str]:
    """(Benchmark fields, pretraining source) of `data.benchmark` = "qa" or "synthetic_qa"."""
    config = config_dict.ConfigDict({"data": data_cfg})
    check_qa(config, data_cfg.benchmark, training)
    if data_cfg.benchmark == "synthetic_qa":
        return _register_synthetic_qa(data_cfg, spec, workdir, training)
    q = data_cfg.qa
    vocabulary = vocab_lib.get_vocabulary(spec)
    train_file = q.train_file or (qa.qa_file(q.dir, q.dataset, qa.TRAIN) if training else None)
    train, test = qa.register_qa_run(
        vocabulary, train_file=train_file if training else None, eval_file=qa.qa_file(q.dir, q.dataset, q.eval_split),
        dataset=q.dataset, eval_split=q.eval_split, passages_file=q.passages_file, num_passages=int(q.num_passages),
        imagined_file=q.imagined_file if q.student_document == "imagined" else "",
        max_train_examples=int(q.max_train_examples) or None, max_eval_examples=int(q.max_eval_examples) or None)
    return _fields(vocabulary, test, train), data_cfg.pretrain.source


def _fields(vocabulary, test: str, train: str | None) -> dict:
    return {"vocabulary": vocabulary, "eval_splits": {"test": (test,)}, "categories": {}, "scoring": "qa",
            "train_mixture": train, "train_task_names": (train,) if train else ()}


def _suite(data_cfg) -> synthetic_qa.QASuite:
    s = data_cfg.synthetic_qa
    return synthetic_qa.make_suite(int(s.seed), int(s.num_entities), int(s.test_attributes_per_entity),
                                   float(s.imagined_accuracy), float(s.test_entity_fraction))


def _register_synthetic_qa(data_cfg, spec: str, workdir: str | None, training: bool) -> tuple[dict, str]:
    suite = _suite(data_cfg)
    if training and spec == vocab_lib.TRAINED:
        try:
            vocab_lib.train_sentencepiece(suite.vocabulary_text(), vocab_lib.trained_model_path(workdir),
                                          int(data_cfg.synthetic_qa.vocab_size))
        except RuntimeError as e:
            raise ConfigError(f"config key 'data.synthetic_qa.vocab_size' ({data_cfg.synthetic_qa.vocab_size}): "
                              f"SentencePiece cannot train that vocabulary ({str(e).strip()[-120:]})") from None
    vocabulary = vocab_lib.get_vocabulary(spec, workdir)
    n_passages, imagined = int(data_cfg.qa.num_passages), data_cfg.qa.student_document == "imagined"

    def make(items, split):
        name = f"{SYNTHETIC_PREFIX}_{split}"

        def examples_fn(requested):
            return [qa.qa_example(it.question, [it.answer], name, requested in qa.EVAL_SPLITS,
                                  suite.passages(it, n_passages) if n_passages else (),
                                  suite.imagined_document(it) if imagined else None) for it in items]
        register_task(name, function_source(examples_fn, splits=(split,), eval_splits=qa.EVAL_SPLITS), vocabulary,
                      passages=True)
        return name

    train = make(suite.train, qa.TRAIN) if training else None
    test = make(suite.test, qa.TEST)
    source = ""
    if training:
        source = data_cfg.pretrain.source or _write_corpus(
            suite, os.path.join(workdir, "data", "pretrain_corpus", "corpus.jsonl"),
            int(data_cfg.synthetic_qa.corpus_copies))
    return _fields(vocabulary, test, train), source


def _write_corpus(suite: synthetic_qa.QASuite, path: str, copies: int) -> str:
    """The suite's documents (every entity's facts, `copies` sentence orders each) as pretraining text: the
    closed-book knowledge a backbone trained on it can hold. Returns the directory."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"  # hosts sharing a work directory each write their own, then rename
    with open(tmp, "w") as f:
        for text in suite.corpus(copies):
            f.write(json.dumps({"text": text}) + "\n")
    os.replace(tmp, path)
    return os.path.dirname(path)
