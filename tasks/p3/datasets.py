"""P3's datasets: the dataset-name lists (T0's training datasets, the held-out MTest11), the held-out datasets'
specs, and reading raw records (JSONL or TFDS) as the Hugging Face fields their templates expect.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from tagi_jax.jsonl import iter_jsonl

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

# The T0 held-out evaluation ("MTest11"), in the order of the T0 paper's tables. Keys are the dataset names the
# P3 task registry uses (P3_EVAL_DATASETS below); ANLI's three rounds are separate datasets here.
MTEST11 = (
    "rte", "cb", "anli_r1", "anli_r2", "anli_r3", "copa", "hellaswag", "story_cloze", "wsc", "wic", "winogrande",
)
ANLI_ROUNDS = ("anli_r1", "anli_r2", "anli_r3")
# HyperT5 / HINT report P3 without StoryCloze (manual download) and with ANLI as one dataset.
HYPERT5 = ("rte", "cb", "anli", "copa", "hellaswag", "wsc", "wic", "winogrande")
P3_TRAIN_MIXTURE, P3_EVAL_MIXTURE = "p3_train", "p3_t0_eval"

# Raw examples come from JSONL files (`<data_dir>/<dataset>/<split>.jsonl`, fields as in each dataset's own
# release) or TFDS, mapped per dataset to the Hugging Face field names the templates expect (P3_EVAL_DATASETS).


def _remove_hyphens(example: Mapping[str, Any]) -> dict[str, Any]:
    return {k.replace("-", "_"): v for k, v in example.items()}


def _label_map(mapping: Mapping[str, int]) -> Callable[[Any], int]:
    def convert(value):
        if isinstance(value, bool):
            raise ValueError(f"boolean label {value!r} where one of {sorted(mapping)} was expected")
        if isinstance(value, int):
            return value
        if value in mapping:
            return mapping[value]
        raise ValueError(f"unknown label {value!r} (expected one of {sorted(mapping)} or an int)")

    return convert


def _bool_label(value) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return int(value.lower() == "true")
    raise ValueError(f"label {value!r} is not a boolean")


_RTE_LABEL = _label_map({"entailment": 0, "not_entailment": 1})
_CB_LABEL = _label_map({"entailment": 0, "contradiction": 1, "neutral": 2})
_ANLI_LABEL = _label_map({"e": 0, "n": 1, "c": 2})


def _nli(label_fn):
    def convert(raw):
        return {
            "premise": raw["premise"], "hypothesis": raw["hypothesis"], "label": label_fn(raw["label"]),
            "idx": raw.get("idx", -1),
        }

    return convert


def _copa(raw):
    return {k: raw[k] for k in ("premise", "choice1", "choice2", "question")} | {
        "label": int(raw["label"]), "idx": raw.get("idx", -1)}


def _wic(raw):
    ex = {k: raw[k] for k in ("word", "sentence1", "sentence2")}
    ex.update({k: raw[k] for k in ("start1", "start2", "end1", "end2") if k in raw})
    return ex | {"label": _bool_label(raw["label"]), "idx": raw.get("idx", -1)}


def fix_wsc_spans(ex: dict[str, Any]) -> dict[str, Any]:
    """The `wsc.fixed` normalisation of the SuperGLUE loaders (HF and TFDS): make each span text a substring of
    `text` where possible (first-letter case from the text's word at the span index, trailing '.' dropped,
    newlines to spaces). Includes their quirk: for the 'theyscold' example only span2_index changes."""
    ex = dict(ex)
    for span in ("span1", "span2"):
        text, index = ex[span + "_text"], ex[span + "_index"]
        if text in ex["text"] or text in ("Kamenev and Zinoviev", "Kamenev, Zinoviev, and Stalin"):
            continue
        if "theyscold" in text:
            ex["span2_index"] = 10
        first_word = ex["text"].split()[index]
        text = (text[0].lower() if first_word[0].islower() else text[0].upper()) + text[1:]
        ex[span + "_text"] = text.rstrip(".").replace("\n", " ")
    return ex


def _wsc(raw):
    target = raw.get("target", {})
    ex = {"text": raw["text"]}
    for key in ("span1_index", "span2_index", "span1_text", "span2_text"):
        ex[key] = raw[key] if key in raw else target[key]
    return fix_wsc_spans(ex) | {"label": _bool_label(raw["label"]), "idx": raw.get("idx", -1)}


def _anli(raw):
    return {
        "uid": raw.get("uid", ""), "premise": raw["premise"] if "premise" in raw else raw["context"],
        "hypothesis": raw["hypothesis"], "label": _ANLI_LABEL(raw["label"]), "reason": raw.get("reason", ""),
    }


def _winogrande(raw):
    return {"sentence": raw["sentence"], "option1": raw["option1"], "option2": raw["option2"],
            "answer": str(raw["answer"])}


def _hellaswag(raw):
    ex = {k: raw[k] for k in ("ctx_a", "ctx_b", "ctx", "endings", "activity_label")}
    ex.update({k: raw.get(k, "") for k in ("source_id", "split", "split_type")})
    return ex | {"ind": raw.get("ind", -1), "label": str(raw["label"])}


_STORY_CLOZE_COLUMNS = {
    "InputStoryid": "story_id", "InputSentence1": "input_sentence_1", "InputSentence2": "input_sentence_2",
    "InputSentence3": "input_sentence_3", "InputSentence4": "input_sentence_4",
    "RandomFifthSentenceQuiz1": "sentence_quiz1", "RandomFifthSentenceQuiz2": "sentence_quiz2",
    "AnswerRightEnding": "answer_right_ending",
}


def _story_cloze(raw):
    ex = {_STORY_CLOZE_COLUMNS.get(k, k): v for k, v in raw.items()}
    missing = [hf for hf in _STORY_CLOZE_COLUMNS.values() if hf not in ex]
    if missing:
        raise KeyError(missing[0])
    return ex | {"answer_right_ending": int(ex["answer_right_ending"])}


# TFDS versions of the same datasets (only those whose TFDS features keep what the templates need).
def _tfds_superglue(raw):
    return dict(raw)


def _tfds_anli(raw):
    return {"uid": raw.get("uid", ""), "premise": raw["context"], "hypothesis": raw["hypothesis"],
            "label": int(raw["label"]), "reason": ""}


def _tfds_winogrande(raw):
    return {"sentence": raw["sentence"], "option1": raw["option1"], "option2": raw["option2"],
            "answer": str(int(raw["label"]) + 1)}


@dataclasses.dataclass(frozen=True)
class P3Dataset:
    """How one dataset's raw split becomes examples with the Hugging Face fields its templates expect."""

    name: str                                   # registry key (MTEST11 for the held-out set)
    templates: str                              # promptsource path under the templates directory
    instance_fields: tuple[str, ...]            # the instance content (masked in hyper_inputs, shown in inputs)
    required_fields: tuple[str, ...]            # HF fields that must exist after conversion
    from_raw: Callable[[dict], dict]            # raw JSONL record -> HF fields
    data_subdir: str | None = None              # folder under data_dir (default: name)
    split: str = "validation"
    tfds_name: str | None = None                # TFDS builder (None: JSONL only)
    tfds_split: str | None = None
    from_tfds: Callable[[dict], dict] | None = None


def _superglue(name, config, instance, required, from_raw):
    return P3Dataset(name, f"super_glue/{config}", instance, required, from_raw,
                     tfds_name=f"super_glue/{config}", tfds_split="validation", from_tfds=_tfds_superglue)


_NLI_FIELDS = ("premise", "hypothesis")
P3_EVAL_DATASETS: dict[str, P3Dataset] = {
    ds.name: ds
    for ds in (
        _superglue("rte", "rte", _NLI_FIELDS, _NLI_FIELDS + ("label",), _nli(_RTE_LABEL)),
        _superglue("cb", "cb", _NLI_FIELDS, _NLI_FIELDS + ("label",), _nli(_CB_LABEL)),
        _superglue("copa", "copa", ("premise", "choice1", "choice2"),
                   ("premise", "choice1", "choice2", "question", "label"), _copa),
        _superglue("wic", "wic", ("word", "sentence1", "sentence2"),
                   ("word", "sentence1", "sentence2", "label"), _wic),
        _superglue("wsc", "wsc.fixed", ("text", "span1_text", "span2_text"),
                   ("text", "span1_index", "span2_index", "span1_text", "span2_text", "label"), _wsc),
        *(
            P3Dataset(f"anli_r{r}", "anli", _NLI_FIELDS, _NLI_FIELDS + ("label",), _anli,
                      tfds_name=f"anli/r{r}", tfds_split="validation", from_tfds=_tfds_anli)
            for r in (1, 2, 3)
        ),
        P3Dataset("winogrande", "winogrande/winogrande_xl", ("sentence", "option1", "option2"),
                  ("sentence", "option1", "option2", "answer"), _winogrande,
                  tfds_name="winogrande", tfds_split="validation", from_tfds=_tfds_winogrande),
        # TFDS hellaswag has no ctx_a/ctx_b and TFDS story_cloze joins the four sentences: JSONL only.
        P3Dataset("hellaswag", "hellaswag", ("ctx", "ctx_a", "ctx_b", "activity_label", "endings"),
                  ("ctx", "ctx_a", "ctx_b", "activity_label", "endings", "label"), _hellaswag),
        P3Dataset("story_cloze", "story_cloze/2016",
                  tuple(f"input_sentence_{i}" for i in range(1, 5)) + ("sentence_quiz1", "sentence_quiz2"),
                  tuple(f"input_sentence_{i}" for i in range(1, 5))
                  + ("sentence_quiz1", "sentence_quiz2", "answer_right_ending"), _story_cloze),
    )
}
assert tuple(sorted(P3_EVAL_DATASETS)) == tuple(sorted(MTEST11))


def _to_python(value):
    """TFDS numpy values -> plain Python (bytes -> str, arrays -> lists)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _to_python(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _to_python(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_to_python(v) for v in value]
    return value


def _validate(ex: Mapping[str, Any], required: Iterable[str], where: str) -> dict[str, Any]:
    for field in required:
        if field not in ex or ex[field] is None:
            raise ValueError(f"{where}: missing field {field!r}")
    return dict(ex)


def _iter_jsonl(path: str, convert: Callable[[dict], dict], required: Sequence[str]) -> Iterable[dict]:
    """Records of a JSONL file converted to HF fields; errors name the file, line and field."""
    for where, raw in iter_jsonl(path):
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected a JSON object")
        yield _convert(raw, convert, required, where)


def _convert(raw: dict, convert: Callable[[dict], dict], required: Sequence[str], where: str) -> dict:
    try:
        ex = convert(_remove_hyphens(raw))
    except KeyError as e:
        raise ValueError(f"{where}: missing field {e.args[0]!r}") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e
    return _validate(_remove_hyphens(ex), required, where)


@functools.lru_cache(maxsize=32)
def _read_jsonl(path: str, convert: Callable[[dict], dict], required: tuple[str, ...]) -> tuple[dict, ...]:
    """A small (evaluation) JSONL file, read once for all of its dataset's templates."""
    return tuple(_iter_jsonl(path, convert, required))


def _iter_tfds(name: str, split: str, data_dir: str | None, convert, required) -> Iterable[dict]:
    import tensorflow_datasets as tfds  # only when a TFDS dataset is actually read

    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
    for i, raw in enumerate(tfds.as_numpy(ds)):
        yield _convert(_to_python(raw), convert, required, f"tfds {name}[{split}] example {i}")



# ---------------------------------------------------------------------------------------------------------------
# Readers: a registered task's split -> converted examples, and the split sizes T0's mixing rates need
# ---------------------------------------------------------------------------------------------------------------


def read_jsonl_split(split: str, path: str, spec: P3Dataset) -> tuple[dict, ...]:
    if split != "validation":
        raise ValueError(f"P3 dataset {spec.name!r}: only the 'validation' split is registered, got {split!r}")
    return _read_jsonl(path, spec.from_raw, spec.required_fields)


@functools.lru_cache(maxsize=16)
def read_tfds_split(split: str, spec: P3Dataset, tfds_data_dir: str | None) -> tuple[dict, ...]:
    if split != "validation":
        raise ValueError(f"P3 dataset {spec.name!r}: only the 'validation' split is registered, got {split!r}")
    return tuple(_iter_tfds(spec.tfds_name, spec.tfds_split, tfds_data_dir, spec.from_tfds, spec.required_fields))


@functools.lru_cache(maxsize=None)
def _count_records(path: str, mtime_ns: int, size: int) -> int:
    del mtime_ns, size  # cache key only: a rewritten file is counted again
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def jsonl_split_size(root: str, split: str) -> int:
    """Records (non-blank lines) of `<root>/<split>.jsonl`."""
    path = os.path.join(root, f"{split}.jsonl")
    stat = os.stat(path)
    return _count_records(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def tfds_split_size(tfds_name: str, data_dir: str | None, split: str) -> int:
    import tensorflow_datasets as tfds  # only when a TFDS dataset's size is actually needed

    return int(tfds.builder(tfds_name, data_dir=data_dir).info.splits[split].num_examples)


def read_train_jsonl(split: str, root: str, convert) -> Iterable[dict]:
    return _iter_jsonl(os.path.join(root, f"{split}.jsonl"), convert, ())


def read_train_tfds(split: str, tfds_name: str, data_dir: str | None, convert) -> Iterable[dict]:
    return _iter_tfds(tfds_name, split, data_dir, convert, ())
