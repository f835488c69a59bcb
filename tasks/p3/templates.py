"""promptsource templates without promptsource: reading `templates.yaml` files and rendering a template
(its input, target and answer choices) from an example exactly as `promptsource.templates.Template.apply` does.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import random
from collections import Counter
from typing import Any, Mapping

import jinja2
import yaml

# promptsource 0.2.3 (the templates behind P3 and T0) does not install on Python >= 3.10, so this module reads
# its `templates.yaml` files directly (YAML constructors for the `!Template` / `!TemplateMetadata` tags) and
# renders them with jinja2 exactly as `promptsource.templates.Template.apply` does: the same jinja environment
# (`zip` global; `highlight`, `choice`, `most_frequent` filters), every `}}` given `| string | truncate(2048)`,
# `|||` protected inside field values, the rendering split on `|||` and each part stripped; `answer_choices` is
# its own jinja expression rendered from the example and split on `|||`. Keys with hyphens get underscores
# (promptsource's `removeHyphen`, in tasks/p3/datasets.py). One deliberate difference: promptsource's `choice`
# filter is `random.choice`; here it is seeded from the example and template, so a task's data is reproducible.

TEXT_VAR_LENGTH = 2048  # promptsource truncates every rendered variable to this many characters
PIPE_PROTECTOR = "3ed2dface8203c4c9dfb1a5dc58e41e0"  # promptsource's stand-in for "|||" inside field values
ANSWER_CHOICES = "answer_choices"  # the rendered choices; an example may not have this key
_SEED_VAR = "_p3_choice_seed"
_UNSET = object()


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
