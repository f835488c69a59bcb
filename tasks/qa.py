"""Open-domain (closed-book) QA as SeqIO tasks: NQ-open, WebQuestions and TriviaQA read from JSON Lines files of
`{"question": str, "answer": [str, ...]}` (the layout of `shared/data/qa`), scored with `tagi_jax.metrics.qa_metrics`.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Mapping, Sequence

from absl import logging

from tagi_jax import features as F
from tagi_jax.jsonl import iter_jsonl
from tasks.common import function_source, register_task

TRAIN, VALIDATION, TEST = "train", "validation", "test"
SPLITS = (TRAIN, VALIDATION, TEST)
EVAL_SPLITS = (VALIDATION, TEST)
INPUT_PREFIX = "question: "  # FiD's input format
CONTEXT_PREFIX = "context: "

# dataset -> {split: file relative to the qa directory}; see shared/data/qa/README.md for what each file is.
QA_DATASETS: dict[str, dict[str, str]] = {
    "nq_open": {
        VALIDATION: "nq_open/dpr_dev.jsonl",  # DPR's NQ dev (8,757, held out from NQ-open train)
        TEST: "nq_open/dev.jsonl",  # the official NQ-open dev = the "NQ test" of ORQA/DPR/FiD (3,610)
    },
    "webquestions": {
        TRAIN: "webquestions/resplit.train.jsonl",  # ORQA's 3,417 / 361 split of the original train
        VALIDATION: "webquestions/resplit.dev.jsonl",
        TEST: "webquestions/test.jsonl",  # DPR's WebQ test (2,032)
    },
    "triviaqa": {
        VALIDATION: "triviaqa/dpr_dev.jsonl",  # DPR's TQA dev (8,837)
        TEST: "triviaqa/dpr_test.jsonl",  # TriviaQA unfiltered dev = the "TQA test" of ORQA/DPR/FiD (11,313)
    },
}


class QAFormatError(ValueError):
    """A QA file that cannot be used; the message names the file, the line and the field."""


# ------------------------------------------------------------------------------------------- files
def _bad(where: str, field: str, why: str) -> QAFormatError:
    return QAFormatError(f"{where}: field {field!r}: {why}")


def _records(path: str) -> Iterator[tuple[str, object]]:
    """`iter_jsonl`, with its invalid-JSON errors raised as QAFormatError."""
    records = iter_jsonl(path)
    while True:
        try:
            item = next(records)
        except StopIteration:
            return
        except ValueError as e:
            raise QAFormatError(str(e)) from e
        yield item


def _check_text(value: object, where: str, field: str) -> None:
    if not isinstance(value, str):
        raise _bad(where, field, f"must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _bad(where, field, "is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone \uD800-\uDFFF escape: tf.string could not hold it
        raise _bad(where, field, "is not valid Unicode (lone surrogate escape)") from None


def _validate(record: object, where: str) -> dict:
    if not isinstance(record, dict):
        raise QAFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "question" not in record:
        raise _bad(where, "question", "missing")
    _check_text(record["question"], where, "question")
    if "answer" not in record:
        raise _bad(where, "answer", "missing")
    answers = record["answer"]
    if not isinstance(answers, list):
        raise _bad(where, "answer", f"must be a non-empty list of strings, got {type(answers).__name__}")
    if not answers:
        raise _bad(where, "answer", "must be a non-empty list of strings, got an empty list")
    for i, answer in enumerate(answers):
        _check_text(answer, where, f"answer[{i}]")
    return {"question": record["question"], "answer": list(answers)}


def read_qa_file(path: str, limit: int | None = None) -> list[dict]:
    """The rows `{"question": str, "answer": [str, ...]}` of a QA JSON Lines file, in file order.

    Strict: a row that is not an object with a non-empty string `question` and a non-empty list of non-empty
    strings `answer` raises QAFormatError naming `path:line` and the field; blank lines are skipped. With
    `limit`, only the first `limit` rows are read (and checked). Strings are kept exactly as in the file.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"read_qa_file: limit must be >= 1 or None, got {limit}")
    rows = []
    for where, record in _records(path):
        rows.append(_validate(record, where))
        if limit is not None and len(rows) >= limit:
            break
    return rows


def qa_file(qa_dir: str, dataset: str, split: str) -> str:
    """The path of a dataset's split under `qa_dir` (see QA_DATASETS)."""
    if dataset not in QA_DATASETS:
        raise ValueError(f"QA: unknown dataset {dataset!r}; known: {', '.join(QA_DATASETS)}")
    if split not in QA_DATASETS[dataset]:
        raise ValueError(f"QA: dataset {dataset!r} has no split {split!r} (has {', '.join(QA_DATASETS[dataset])})")
    return os.path.join(qa_dir, QA_DATASETS[dataset][split])


def seqio_task_name(dataset: str, split: str, prefix: str = "qa") -> str:
    """The registered SeqIO name (and `task_name` feature) of one dataset's split: `<prefix>_<dataset>_<split>`."""
    return f"{prefix}_{dataset}_{split}"


# -------------------------------------------------------------------------------------- examples
# Per example (the feature contract of tagi_jax.features):
#   inputs        "question: <question>" (FiD's format): what the model with the generated adapter reads
#   hyper_inputs  the question itself: the instruction is the instance ("instance" instruction source), so the
#                 hypernetwork generates the adapter from the very question it must answer
#   full_inputs   "question: <question>", the same text as inputs: the instruction *is* the question, so
#                 instruction + instance would only repeat it; teachers and the concatenation baseline read the
#                 whole question, exactly what the adapted model reads
#   targets       the first answer (training and evaluation)
#   task_name     `<prefix>_<dataset>_<split>`
#   references    evaluation splits only: every answer (EM is the max over them)
#
# With passages (Fusion-in-Decoder: retrieved or "imagined" documents), full_inputs holds one
# "question: <q> context: <passage>" text per passage joined by F.PASSAGE_SEPARATOR, each encoded alone by the
# FiD teacher; with an imagined document for the student, inputs is "question: <q> context: <document>".
def qa_example(question: str, answers: Sequence[str], task_name: str, with_references: bool,
               passages: Sequence[str] = (), student_document: str | None = None) -> dict:
    """One example's string features (see above)."""
    text = INPUT_PREFIX + question
    full = F.PASSAGE_SEPARATOR.join(f"{text} {CONTEXT_PREFIX}{p}" for p in passages) if passages else text
    ex = {F.INPUTS: f"{text} {CONTEXT_PREFIX}{student_document}" if student_document else text,
          F.HYPER_INPUTS: question, F.FULL_INPUTS: full, F.TARGETS: answers[0], F.TASK_NAME: task_name}
    if with_references:
        ex[F.REFERENCES] = list(answers)
    return ex


def build_examples(rows: Sequence[Mapping], task_name: str, with_references: bool,
                   passages: Mapping[str, Sequence[str]] | None = None, num_passages: int = 0,
                   imagined: Mapping[str, Sequence[str]] | None = None, where: str = "") -> list[dict]:
    """The example dicts of validated rows (see `read_qa_file`); `passages` / `imagined` map questions to their
    documents (`read_passages_file`): the first `num_passages` of each go to full_inputs, the first imagined
    one to inputs. A question missing from a given map raises QAFormatError naming `where` and the question."""
    def lookup(table, question, what):
        if question not in table:
            raise QAFormatError(f"{what}: no entry for question {question!r} of {where or task_name}")
        return table[question]

    examples = []
    for row in rows:
        question = row["question"]
        found = lookup(passages, question, "passages file")[:num_passages] if passages is not None else ()
        document = lookup(imagined, question, "imagined documents file")[0] if imagined is not None else None
        examples.append(qa_example(question, row["answer"], task_name, with_references, found, document))
    return examples


def read_passages_file(path: str) -> dict[str, list[str]]:
    """{question: [passage, ...]} from JSON Lines rows `{"question": str, "passages": [str, ...]}` (retrieved or
    generated documents, best first). Strict, like `read_qa_file`; a question listed twice or a passage holding
    the passage separator (ASCII 0x1f) raises QAFormatError naming the line."""
    table: dict[str, list[str]] = {}
    first_line: dict[str, str] = {}
    for where, record in _records(path):
        if not isinstance(record, dict):
            raise QAFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if "question" not in record:
            raise _bad(where, "question", "missing")
        _check_text(record["question"], where, "question")
        passages = record.get("passages")
        if not isinstance(passages, list) or not passages:
            raise _bad(where, "passages", "must be a non-empty list of strings")
        for i, p in enumerate(passages):
            _check_text(p, where, f"passages[{i}]")
            if F.PASSAGE_SEPARATOR in p:
                raise _bad(where, f"passages[{i}]", "holds the passage separator character 0x1f")
        question = record["question"]
        if question in table:
            raise _bad(where, "question", f"listed twice (first at {first_line[question]})")
        table[question], first_line[question] = list(passages), where
    if not table:
        raise QAFormatError(f"{path}: no rows")
    return table


# ---------------------------------------------------------------------------------- registration
def register_qa(
    qa_dir: str,
    datasets: Sequence[str] | None,
    vocabulary,
    splits: Sequence[str] | None = None,
    max_examples: int | None = None,
    prefix: str = "qa",
    metric_fns: Sequence[Callable] = (),
    postprocess_fn: Callable | None = None,
) -> list[str]:
    """Registers one SeqIO task per (dataset, split) of QA_DATASETS: `<prefix>_<dataset>_<split>`, whose only
    SeqIO split is that split ("validation"/"test" with `references`).

    `datasets` None: all of QA_DATASETS; `splits` None: every split a dataset has (else only those, where the
    dataset has them). Registration only checks that each file exists (FileNotFoundError naming it); files are
    read, with `read_qa_file`, when a dataset is requested. `max_examples` keeps each split's first rows in
    file order (None: all). Returns the registered task names.
    """
    names = list(QA_DATASETS) if datasets is None else list(datasets)
    unknown = [n for n in names if n not in QA_DATASETS]
    if unknown:
        raise ValueError(f"register_qa: unknown dataset(s) {unknown}; known: {', '.join(QA_DATASETS)}")
    if not names:
        raise ValueError("register_qa: no datasets given")
    wanted = SPLITS if splits is None else tuple(splits)
    bad_splits = [s for s in wanted if s not in SPLITS]
    if bad_splits:
        raise ValueError(f"register_qa: unknown split(s) {bad_splits}; expected some of {', '.join(SPLITS)}")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"register_qa: max_examples must be >= 1 or None, got {max_examples}")
    if not os.path.isdir(qa_dir):
        raise FileNotFoundError(f"QA: directory not found: {qa_dir}")

    todo = [(d, s, qa_file(qa_dir, d, s)) for d in names for s in QA_DATASETS[d] if s in wanted]
    if not todo:
        raise ValueError(f"register_qa: none of {names} has any of the splits {list(wanted)}")
    for dataset, split, path in todo:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"QA: {dataset} {split} file not found: {path}")

    registered = []
    for dataset, split, path in todo:
        task_name = seqio_task_name(dataset, split, prefix)

        def examples_fn(requested, _path=path, _name=task_name):
            return build_examples(read_qa_file(_path, max_examples), _name,
                                  with_references=requested in EVAL_SPLITS)

        source = function_source(examples_fn, splits=(split,), eval_splits=EVAL_SPLITS)
        register_task(task_name, source, vocabulary, metric_fns=metric_fns, postprocess_fn=postprocess_fn)
        registered.append(task_name)
    logging.info("QA: registered %d tasks from %s", len(registered), qa_dir)
    return registered


def register_qa_run(
    vocabulary,
    *,
    train_file: str | None,
    eval_file: str,
    dataset: str,
    eval_split: str,
    passages_file: str = "",
    num_passages: int = 0,
    imagined_file: str = "",
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    prefix: str = "qa",
) -> tuple[str | None, str]:
    """The pipeline's two QA tasks, (`<prefix>_<dataset>_train` or None, `<prefix>_<dataset>_<eval_split>`):
    training rows from `train_file`, evaluation rows (with references) from `eval_file`; with `passages_file`
    the FiD reader's full_inputs hold each question's first `num_passages` passages, with `imagined_file` the
    student's inputs hold its first imagined document. Files are read when the data is (strictly)."""
    tables: dict[str, dict] = {}

    def table(path):  # each passages file read once, when first needed
        if path and path not in tables:
            tables[path] = read_passages_file(path)
        return tables.get(path) if path else None

    def make(path, name, split, limit):
        def examples_fn(requested):
            return build_examples(read_qa_file(path, limit), name, requested in EVAL_SPLITS,
                                  passages=table(passages_file), num_passages=num_passages,
                                  imagined=table(imagined_file), where=path)
        register_task(name, function_source(examples_fn, splits=(split,), eval_splits=EVAL_SPLITS), vocabulary,
                      passages=True)
        return name

    train = make(train_file, seqio_task_name(dataset, TRAIN, prefix), TRAIN, max_train_examples) if train_file else None
    return train, make(eval_file, seqio_task_name(dataset, eval_split, prefix), eval_split, max_eval_examples)
