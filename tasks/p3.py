"""P3 / T0 tasks from promptsource templates, without promptsource.

promptsource 0.2.3 (the templates behind P3 and T0) does not install on Python >= 3.10, so this module reads
its `templates.yaml` files directly (YAML constructors for the `!Template` / `!TemplateMetadata` tags) and
renders them with jinja2 exactly as `promptsource.templates.Template.apply` does: the same jinja environment
(`zip` global; `highlight`, `choice`, `most_frequent` filters), every `}}` given `| string | truncate(2048)`,
`|||` protected inside field values, the rendering split on `|||` and each part stripped; `answer_choices` is
its own jinja expression rendered from the example and split on `|||`. Keys with hyphens get underscores
(promptsource's `removeHyphen`). One deliberate difference: promptsource's `choice` filter is `random.choice`;
here it is seeded from the example and template, so a task's data is reproducible.

Raw examples come from JSONL files (`<data_dir>/<dataset>/<split>.jsonl`, fields as in each dataset's own
release) or TFDS, mapped per dataset to the Hugging Face field names the templates expect (P3_EVAL_DATASETS).

How the feature contract (tagi_jax/features.py) is filled for P3, per (example, template):
  full_inputs   the rendered prompt exactly as T0 sees it (the input side of the template).
  hyper_inputs  the instruction: the same template rendered from the example with every *instance field*
                (the dataset's text fields: premise, hypothesis, choices, sentences...) replaced by a placeholder
                `{field}` (list fields element-wise: `{endings[0]}`). Control fields (labels, indices, COPA's
                `question`) keep their values, so conditional templates render their real branch.
                e.g. RTE: '{premise} Using only the above description ..., is "{hypothesis}" definitely correct?
                Yes or no?'. Expressions that compute on instance text (WSC's `text.split(" ")[span2_index:]`)
                see the placeholder, not the text.
  inputs        the instance only: one line `field: value` for each instance field whose placeholder the
                instruction shows (all instance fields if it shows none), in the dataset's field order.
  targets       the rendered target (the correct answer choice); task_name the registered task name.
Evaluation examples (splits validation/test) also carry `references` ([targets]) and, for rank
classification, `answer_choices` (the rendered choices, a string list), `label` (int32: the index of
`targets` in `answer_choices`, as T0's evaluation computes it) and `idx` (int32: the example's row in the raw
split). Examples whose rendering leaves the input or target empty are dropped, as in T0 (e.g. COPA templates
written for one question type only). `expand_rank_classification` turns an evaluation dataset into one example
per answer choice in the t5/seqio rank-classification layout.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import re
import warnings
from collections import Counter
from typing import Any, Callable, Iterable, Mapping, Sequence

import jinja2
import seqio
import tensorflow as tf
import yaml

from tagi_jax import features as F
from tagi_jax.jsonl import iter_jsonl
from tagi_jax.metrics import MTEST11
from tasks import common

TEXT_VAR_LENGTH = 2048  # promptsource truncates every rendered variable to this many characters
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's stand-in for "|||" inside field values
EVAL_SPLITS = ("validation", "test")
ANSWER_CHOICES, LABEL, IDX = "answer_choices", "label", "idx"
_SEED_VAR = "_p3_choice_seed"
_UNSET = object()

# ---------------------------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TemplateMetadata:
    original_task: bool | None = None
    choices_in_prompt: bool | None = None
    metrics: tuple[str, ...] | None = None
    languages: tuple[str, ...] | None = None


def _choice(context, items):
    """promptsource's `choice` filter (random.choice), seeded by the example and template."""
    items = list(items)
    return random.Random(context.get(_SEED_VAR, 0)).choice(items)


def _most_frequent(items):
    if not items:
        return None
    counts = Counter(items).most_common()
    return [item for item, count in counts if count == counts[0][1]]


def _highlight(text):
    return "<span style='color: #F08080'>" + text + "</span>"


_ENV = jinja2.Environment(loader=jinja2.BaseLoader())
_ENV.globals.update(zip=zip)
_ENV.filters["highlight"] = _highlight
_ENV.filters["choice"] = jinja2.pass_context(_choice)
_ENV.filters["most_frequent"] = _most_frequent


@functools.lru_cache(maxsize=4096)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def _escape_pipe(example: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.replace("|||", PIPE_PROTECTOR) if isinstance(v, str) else v for k, v in example.items()}


def _unescape_pipe(text: str) -> str:
    return text.replace(PIPE_PROTECTOR, "|||")


@dataclasses.dataclass(frozen=True)
class Template:
    """One promptsource template (the fields of its YAML entry)."""

    id: str
    name: str
    jinja: str
    answer_choices: str | None = None
    reference: str | None = None
    metadata: TemplateMetadata = TemplateMetadata()

    def answer_choices_list(self, example: Mapping[str, Any], seed: int = 0) -> list[str] | None:
        """The rendered answer choices for `example` (None for open-ended templates)."""
        if self.answer_choices is None:
            return None
        rendered = _compile(self.answer_choices).render(**_escape_pipe(example), **{_SEED_VAR: seed})
        return [_unescape_pipe(choice.strip()) for choice in rendered.split("|||")]

    def apply(
        self, example: Mapping[str, Any], seed: int = 0, truncate: bool = True, answer_choices=_UNSET
    ) -> list[str]:
        """Render `example` -> [input, target] (a single part when the template renders empty), stripped.
        `answer_choices`: this example's `answer_choices_list(example, seed)` when already computed."""
        source = self.jinja
        if truncate:
            source = source.replace("}}", f" | string | truncate({TEXT_VAR_LENGTH}) }}}}")
        protected = _escape_pipe(example)
        if ANSWER_CHOICES in protected:
            raise ValueError(f"template {self.name!r}: example contains the restricted key 'answer_choices'")
        if answer_choices is _UNSET:
            answer_choices = self.answer_choices_list(example, seed)
        protected[ANSWER_CHOICES] = answer_choices
        rendered = _compile(source).render(**protected, **{_SEED_VAR: seed})
        return [_unescape_pipe(part).strip() for part in rendered.split("|||")]


class _TemplateLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """SafeLoader that understands promptsource's two custom tags (and nothing else)."""


def _construct_metadata(loader, node):
    fields = loader.construct_mapping(node, deep=True)
    known = {f.name for f in dataclasses.fields(TemplateMetadata)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if k in known}
    return TemplateMetadata(**kwargs)


def _construct_template(loader, node):
    return dict(loader.construct_mapping(node, deep=True), __template__=True)


_TemplateLoader.add_constructor("!TemplateMetadata", _construct_metadata)
_TemplateLoader.add_constructor("!Template", _construct_template)


@dataclasses.dataclass(frozen=True)
class DatasetTemplates:
    dataset: str
    subset: str | None
    templates: dict[str, Template]  # by template id, in file order

    def select(self, original_task_only: bool) -> list[Template]:
        return [t for t in self.templates.values() if not original_task_only or t.metadata.original_task]


@functools.lru_cache(maxsize=None)
def load_templates(templates_dir: str, dataset_path: str) -> DatasetTemplates:
    """Read `<templates_dir>/<dataset_path>/templates.yaml` (dataset_path e.g. 'super_glue/rte', 'anli')."""
    if not os.path.isdir(templates_dir):
        raise FileNotFoundError(f"promptsource templates directory not found: {templates_dir}")
    path = os.path.join(templates_dir, dataset_path, "templates.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no promptsource templates for {dataset_path!r}: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            raw = yaml.load(f, Loader=_TemplateLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("templates"), dict):
        raise ValueError(f"{path}: expected a mapping with a 'templates' mapping")
    templates = {}
    for key, entry in raw["templates"].items():
        if not isinstance(entry, dict) or not entry.pop("__template__", False):
            raise ValueError(f"{path}: templates[{key}] is not a !Template")
        for required in ("name", "jinja"):
            if not isinstance(entry.get(required), str):
                raise ValueError(f"{path}: templates[{key}] has no string field {required!r}")
        templates[str(key)] = Template(
            id=str(entry.get("id", key)),
            name=entry["name"],
            jinja=entry["jinja"],
            answer_choices=entry.get("answer_choices"),
            reference=entry.get("reference"),
            metadata=entry.get("metadata") or TemplateMetadata(),
        )
    subset = raw.get("subset")
    return DatasetTemplates(raw.get("dataset", dataset_path), None if subset is None else str(subset), templates)


# ---------------------------------------------------------------------------------------------------------------
# Raw examples -> Hugging Face field names
# ---------------------------------------------------------------------------------------------------------------


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

    name: str                                   # registry key (tagi_jax.metrics.MTEST11 for the held-out set)
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
# Rendering examples into the feature contract
# ---------------------------------------------------------------------------------------------------------------


def _choice_seed(template: Template, example: Mapping[str, Any]) -> int:
    blob = json.dumps(example, sort_keys=True, default=str) + template.id
    return int.from_bytes(hashlib.sha256(blob.encode("utf-8")).digest()[:8], "little")


def _placeholder(field: str) -> str:
    return "{" + field + "}"


def mask_instance(example: Mapping[str, Any], instance_fields: Sequence[str]) -> dict[str, Any]:
    """The example with each instance field replaced by `{field}` (lists element-wise: `{field[i]}`)."""
    masked = dict(example)
    for field in instance_fields:
        value = example.get(field)
        if isinstance(value, str):
            masked[field] = _placeholder(field)
        elif isinstance(value, (list, tuple)):
            masked[field] = [_placeholder(f"{field}[{i}]") for i in range(len(value))]
    return masked


def instance_text(example: Mapping[str, Any], instance_fields: Sequence[str], instruction: str) -> str:
    """`field: value` lines for the instance fields the instruction refers to (all of them if none)."""
    lines, shown = [], []
    for field in instance_fields:
        value = example.get(field)
        if isinstance(value, str):
            items = [(field, value)]
        elif isinstance(value, (list, tuple)):
            items = [(f"{field}[{i}]", str(v)) for i, v in enumerate(value)]
        else:
            continue
        lines.extend(items)
        shown.extend(item for item in items if _placeholder(item[0]) in instruction)
    return "\n".join(f"{k}: {v}" for k, v in (shown or lines))


def render_example(
    template: Template,
    example: Mapping[str, Any],
    instance_fields: Sequence[str],
    task_name: str,
    with_choices: bool,
    where: str = "",
) -> dict[str, Any] | None:
    """One (example, template) -> the feature-contract dict, or None when the template renders it empty."""
    seed = _choice_seed(template, example)
    choices = template.answer_choices_list(example, seed)
    parts = template.apply(example, seed, answer_choices=choices)
    if len(parts) != 2 or not parts[0] or not parts[1]:
        return None
    full_inputs, target = parts
    hyper = template.apply(mask_instance(example, instance_fields), seed)[0]
    out = {
        F.INPUTS: instance_text(example, instance_fields, hyper),
        F.HYPER_INPUTS: hyper,
        F.FULL_INPUTS: full_inputs,
        F.TARGETS: target,
        F.TASK_NAME: task_name,
    }
    if with_choices:
        if not choices:
            raise ValueError(f"{where}template {template.name!r} has no answer_choices; rank classification needs them")
        if target not in choices:
            raise ValueError(f"{where}template {template.name!r}: target {target!r} is not one of the answer "
                             f"choices {choices}")
        out.update({F.REFERENCES: [target], ANSWER_CHOICES: choices, LABEL: choices.index(target)})
    return out


def _signature(with_choices: bool) -> dict[str, tf.TensorSpec]:
    sig = {name: tf.TensorSpec((), tf.string) for name in F.STRING_FEATURES}
    if with_choices:
        sig[F.REFERENCES] = tf.TensorSpec([None], tf.string)
        sig[ANSWER_CHOICES] = tf.TensorSpec([None], tf.string)
        sig[LABEL] = tf.TensorSpec((), tf.int32)
        sig[IDX] = tf.TensorSpec((), tf.int32)
    return sig


def _to_dataset(examples: Callable[[], Iterable[Mapping[str, Any]]], with_choices: bool) -> tf.data.Dataset:
    """Stream rendered examples (a generator function) into tf.data with fixed feature specs."""
    sig = _signature(with_choices)

    def gen():
        for ex in examples():
            yield {k: ex[k] for k in sig}

    return tf.data.Dataset.from_generator(gen, output_signature=sig)


def expand_rank_classification(dataset: tf.data.Dataset, vocabulary=None) -> tf.data.Dataset:
    """Evaluation examples -> one example per answer choice (t5/seqio rank-classification layout).

    Each row gets `targets` = the choice, `idx` = [example idx, choice index] and `is_correct` = (choice index
    == label); other features are repeated. On a tokenized dataset (a task's output, with
    `targets_pretokenized`) pass the task's `vocabulary`: the choice becomes `targets_pretokenized` and its
    tokens + EOS the new `targets`. Score each row, then `tagi_jax.metrics.group_choice_scores` regroups them.
    """
    tokenized = f"{F.TARGETS}_pretokenized" in dataset.element_spec
    if tokenized and vocabulary is None:
        raise ValueError("expand_rank_classification: the dataset is tokenized; pass the task's vocabulary")

    def expand(ex):
        choices = ex[ANSWER_CHOICES]
        n = tf.shape(choices)[0]
        positions = tf.range(n, dtype=tf.int32)
        rows = {k: tf.repeat(tf.expand_dims(v, 0), n, axis=0) for k, v in ex.items()
                if k not in (F.TARGETS, f"{F.TARGETS}_pretokenized", IDX, ANSWER_CHOICES, F.REFERENCES)}
        rows[IDX] = tf.stack([tf.fill([n], ex[IDX]), positions], axis=1)
        rows["is_correct"] = tf.equal(positions, ex[LABEL])
        rows[f"{F.TARGETS}_pretokenized" if tokenized else F.TARGETS] = choices
        return tf.data.Dataset.from_tensor_slices(rows)

    def tokenize(ex):
        tokens = vocabulary.encode_tf(ex[f"{F.TARGETS}_pretokenized"])
        eos = tf.constant([vocabulary.eos_id], tokens.dtype)
        return {**ex, F.TARGETS: tf.cast(tf.concat([tokens, eos], axis=0), target_dtype)}

    target_dtype = dataset.element_spec[F.TARGETS].dtype
    dataset = dataset.flat_map(expand)
    if tokenized:
        dataset = dataset.map(tokenize, num_parallel_calls=tf.data.AUTOTUNE)
    return dataset


def task_clean(text: str) -> str:
    """promptsource's task-name cleaning: anything but word characters, digits, '.' and '_' -> '_'."""
    return re.sub(r"[^\w\d\._]+", "_", text)


def _template_task_names(prefix: str, templates: Sequence[Template]) -> list[str]:
    names = [f"{prefix}_{task_clean(t.name)}" for t in templates]
    counts = Counter(names)
    return [f"{n}_{t.id[:8]}" if counts[n] > 1 else n for n, t in zip(names, templates)]


def _examples_fn(
    read: Callable[[str], Iterable[dict]],
    template: Template,
    instance_fields: Sequence[str] | None,
    task_name: str,
    eval_splits: Sequence[str],
    max_examples: int | None,
) -> Callable[[str], Iterable[dict]]:
    """split -> generator of rendered examples (instance_fields None: every string field of the example)."""

    def examples(split: str) -> Iterable[dict]:
        with_choices = split in eval_splits
        count = 0
        for i, ex in enumerate(read(split)):
            if max_examples is not None and count >= max_examples:
                return
            fields = instance_fields if instance_fields is not None else _string_fields(ex)
            rendered = render_example(template, ex, fields, task_name, with_choices,
                                      where=f"{task_name} [{split}] example {i}: ")
            if rendered is None:
                continue
            rendered[IDX] = i
            count += 1
            yield rendered

    return examples


def _register(task_name, examples_fn, splits, vocabulary, eval_splits) -> None:
    def dataset_fn(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
        del shuffle_files, seed
        return _to_dataset(functools.partial(examples_fn, split), with_choices=split in eval_splits)

    source = seqio.FunctionDataSource(dataset_fn=dataset_fn, splits=tuple(splits))
    common.register_task(task_name, source, vocabulary)


# ---------------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------------


def register_p3_eval(
    templates_dir: str,
    data_dir: str | None,
    vocabulary,
    datasets: Sequence[str] | None = None,
    original_task_only: bool = True,
    *,
    use_tfds: bool = False,
    tfds_data_dir: str | None = None,
    mixture_name: str = "p3_t0_eval",
) -> dict[str, list[str]]:
    """Register the T0 held-out evaluation: one task per (dataset, template), split 'validation'.

    Task names are `p3_<dataset>_<template name, task_clean'ed>` (dataset keys: tagi_jax.metrics.MTEST11);
    mixtures `p3_<dataset>` (one dataset's templates) and `mixture_name` (everything registered).
    Data: `<data_dir>/<dataset>/validation.jsonl` (see P3_EVAL_DATASETS for the field mappings) or, with
    `use_tfds`, the TFDS builders (rte, cb, copa, wic, wsc, anli_r*, winogrande). A dataset without data is
    skipped with a warning; a missing templates directory or file is an error. Only templates with
    `metadata.original_task: true` unless `original_task_only=False` (templates without answer choices are
    then skipped: rank classification needs them). Nothing is read until a dataset is requested.
    Returns {dataset: [task names]}.
    """
    if not os.path.isdir(templates_dir):
        raise FileNotFoundError(f"promptsource templates directory not found: {templates_dir}")
    names = list(datasets) if datasets is not None else list(MTEST11)
    unknown = [n for n in names if n not in P3_EVAL_DATASETS]
    if unknown:
        raise ValueError(f"register_p3_eval: unknown dataset(s) {unknown}; known: {sorted(P3_EVAL_DATASETS)}")
    if data_dir is None and not use_tfds:
        raise ValueError("register_p3_eval: give data_dir (JSONL) or use_tfds=True")
    registered: dict[str, list[str]] = {}
    for name in names:
        spec = P3_EVAL_DATASETS[name]
        templates = [t for t in load_templates(templates_dir, spec.templates).select(original_task_only)
                     if t.answer_choices is not None]
        if use_tfds:
            if spec.tfds_name is None:
                warnings.warn(f"P3 dataset {name!r} skipped: no TFDS version with the fields its templates need "
                              f"(use JSONL)", stacklevel=2)
                continue
            read = functools.partial(_read_tfds_split, spec=spec, tfds_data_dir=tfds_data_dir)
        else:
            path = os.path.join(data_dir, spec.data_subdir or spec.name, f"{spec.split}.jsonl")
            if not os.path.isfile(path):
                warnings.warn(f"P3 dataset {name!r} skipped: no data at {path}", stacklevel=2)
                continue
            read = functools.partial(_read_jsonl_split, path=path, spec=spec)
        task_names = _template_task_names(f"p3_{name}", templates)
        for template, task_name in zip(templates, task_names):
            examples = _examples_fn(read, template, spec.instance_fields, task_name, EVAL_SPLITS, None)
            _register(task_name, examples, ("validation",), vocabulary, EVAL_SPLITS)
        common.register_mixture(f"p3_{name}", task_names)
        registered[name] = task_names
    if not registered:
        where = f"TFDS ({tfds_data_dir or 'default data dir'})" if use_tfds else data_dir
        raise FileNotFoundError(f"register_p3_eval: no data found in {where} for any of {names}")
    common.register_mixture(mixture_name, [t for ts in registered.values() for t in ts])
    return registered


def _read_jsonl_split(split: str, path: str, spec: P3Dataset) -> tuple[dict, ...]:
    if split != "validation":
        raise ValueError(f"P3 dataset {spec.name!r}: only the 'validation' split is registered, got {split!r}")
    return _read_jsonl(path, spec.from_raw, spec.required_fields)


@functools.lru_cache(maxsize=16)
def _read_tfds_split(split: str, spec: P3Dataset, tfds_data_dir: str | None) -> tuple[dict, ...]:
    if split != "validation":
        raise ValueError(f"P3 dataset {spec.name!r}: only the 'validation' split is registered, got {split!r}")
    return tuple(_iter_tfds(spec.tfds_name, spec.tfds_split, tfds_data_dir, spec.from_tfds, spec.required_fields))


def _string_fields(example: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(k for k, v in example.items()
                 if isinstance(v, str) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, str) for x in v)))


def register_p3_train(
    templates_dir: str,
    data_dir: str | None,
    dataset_names: Sequence[str],
    vocabulary,
    *,
    splits: Sequence[str] = ("train",),
    original_task_only: bool = False,
    field_maps: Mapping[str, Callable[[dict], dict]] | None = None,
    instance_fields: Mapping[str, Sequence[str]] | None = None,
    tfds_names: Mapping[str, str] | None = None,
    tfds_data_dir: str | None = None,
    max_examples_per_task: int | None = None,
    mixing_cap: int | None = None,
    mixture_name: str = "p3_train",
) -> dict[str, list[str]]:
    """Register P3 training tasks (e.g. T0's training datasets) from the user's data, one per template.

    Args:
      dataset_names: promptsource paths, '<dataset>[/<subset>]' (e.g. 'ag_news', 'super_glue/boolq').
      data_dir: JSONL files at `<data_dir>/<dataset>[/<subset>]/<split>.jsonl`, records with the Hugging Face
        field names (or anything `field_maps[name]` converts to them). A dataset without files is skipped with a
        warning.
      tfds_names: {dataset path: TFDS name} for datasets read from TFDS instead (lazily, at read time).
      instance_fields: {dataset path: fields} that are instance content (masked in hyper_inputs); default:
        every string / string-list field of the example (give it explicitly when a string field steers the
        template's control flow, like COPA's `question`).
      original_task_only: T0 trains on all templates (default False).
      max_examples_per_task: cap per (template, split) on the examples read (a truncation; T0 has none).
      mixing_cap: T0's examples-proportional mixing: a template is sampled in proportion to its dataset's
        training examples, a dataset with more than `mixing_cap` counting as `mixing_cap // (its number of
        templates, all of them)` per template (T0: 500k; t-zero's `mixture_cap`). Sizes are counted (JSONL
        records, TFDS split info) when the mixture is first read. None: every template at the same rate.
    Task names `p3_train_<dataset path, cleaned>_<template>`; the mixture `mixture_name` holds them all.
    Validation/test splits additionally carry references, answer choices and labels (templates with
    answer choices only). Returns {dataset path: [task names]}.
    """
    if not os.path.isdir(templates_dir):
        raise FileNotFoundError(f"promptsource templates directory not found: {templates_dir}")
    field_maps = dict(field_maps or {})
    instance_fields = dict(instance_fields or {})
    tfds_names = dict(tfds_names or {})
    for key, mapping in (("field_maps", field_maps), ("instance_fields", instance_fields),
                         ("tfds_names", tfds_names)):
        extra = sorted(set(mapping) - set(dataset_names))
        if extra:
            raise ValueError(f"register_p3_train: {key} names datasets not in dataset_names: {extra}")
    if mixing_cap is not None and mixing_cap < 1:
        raise ValueError(f"register_p3_train: mixing_cap must be >= 1 (or None), got {mixing_cap}")
    registered: dict[str, list[str]] = {}
    rates: dict[str, Callable[[seqio.Task], float]] = {}
    for name in dataset_names:
        convert = field_maps.get(name, dict)
        if name in tfds_names:
            read = functools.partial(_read_train_tfds, tfds_name=tfds_names[name], data_dir=tfds_data_dir,
                                     convert=convert)
            present_splits = tuple(splits)
            count = functools.partial(_tfds_split_size, tfds_names[name], tfds_data_dir)
        else:
            if data_dir is None:
                raise ValueError(f"register_p3_train: {name!r} is not in tfds_names and no data_dir was given")
            present_splits = tuple(s for s in splits if os.path.isfile(os.path.join(data_dir, name, f"{s}.jsonl")))
            if not present_splits:
                warnings.warn(f"P3 training dataset {name!r} skipped: no {'/'.join(splits)}.jsonl under "
                              f"{os.path.join(data_dir, name)}", stacklevel=2)
                continue
            read = functools.partial(_read_train_jsonl, root=os.path.join(data_dir, name), convert=convert)
            count = functools.partial(_jsonl_split_size, os.path.join(data_dir, name))
        fields = instance_fields.get(name)
        task_names = []
        all_templates = load_templates(templates_dir, name)
        templates = all_templates.select(original_task_only)
        eval_splits = tuple(s for s in present_splits if s in EVAL_SPLITS)
        for template, task_name in zip(templates, _template_task_names(f"p3_train_{task_clean(name)}", templates)):
            splits_here = tuple(s for s in present_splits if s not in eval_splits or template.answer_choices)
            examples = _examples_fn(read, template, fields, task_name, eval_splits, max_examples_per_task)
            _register(task_name, examples, splits_here, vocabulary, eval_splits)
            task_names.append(task_name)
        if not task_names:
            warnings.warn(f"P3 training dataset {name!r} skipped: no templates selected", stacklevel=2)
            continue
        registered[name] = task_names
        if mixing_cap is not None:
            size_split = "train" if "train" in present_splits else present_splits[0]
            rate = _T0Rate(functools.partial(count, size_split), len(all_templates.templates), mixing_cap,
                           max_examples_per_task)
            rates.update({t: rate for t in task_names})
    if not registered:
        raise FileNotFoundError(f"register_p3_train: no data found for any of {list(dataset_names)}")
    common.register_mixture(mixture_name, [t for ts in registered.values() for t in ts], rates=rates)
    return registered


@dataclasses.dataclass(frozen=True)
class _T0Rate:
    """A template's mixing rate as t-zero computes it (`mixture_cap`), from its dataset's size, counted once."""

    count: Callable[[], int]
    num_templates: int
    cap: int
    max_examples: int | None = None

    def __call__(self, task: seqio.Task | None = None) -> float:
        size = self.count()
        rate = size if size <= self.cap else self.cap // self.num_templates
        return float(rate if self.max_examples is None else min(rate, self.max_examples))


@functools.lru_cache(maxsize=None)
def _count_records(path: str, mtime_ns: int, size: int) -> int:
    del mtime_ns, size  # cache key only: a rewritten file is counted again
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def _jsonl_split_size(root: str, split: str) -> int:
    """Records (non-blank lines) of `<root>/<split>.jsonl`."""
    path = os.path.join(root, f"{split}.jsonl")
    stat = os.stat(path)
    return _count_records(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=None)
def _tfds_split_size(tfds_name: str, data_dir: str | None, split: str) -> int:
    import tensorflow_datasets as tfds  # only when a TFDS dataset's size is actually needed

    return int(tfds.builder(tfds_name, data_dir=data_dir).info.splits[split].num_examples)


def _read_train_jsonl(split: str, root: str, convert) -> Iterable[dict]:
    return _iter_jsonl(os.path.join(root, f"{split}.jsonl"), convert, ())


def _read_train_tfds(split: str, tfds_name: str, data_dir: str | None, convert) -> Iterable[dict]:
    return _iter_tfds(tfds_name, split, data_dir, convert, ())
