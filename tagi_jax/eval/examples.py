"""What the evaluators need of evaluation examples: the features each method reads, ids, references, categories."""
from __future__ import annotations

from typing import Mapping, Sequence

from tagi_jax import features as F
from tagi_jax.data.batches import CATEGORY
from tagi_jax.run.stages import check_method


def check_examples(examples: Sequence[Mapping], method: str, extra: Sequence[str] = ()) -> None:
    """Every example has the features `method` reads (and `extra`); errors name the example and feature."""
    spec = check_method(method)
    if not examples:
        raise ValueError("evaluate: no examples")
    needed = [spec.encoder_input, F.TASK_NAME, *extra]
    if spec.generates_adapters:
        needed.append(F.HYPER_INPUTS)
    for i, ex in enumerate(examples):
        for key in needed:
            if key not in ex:
                raise KeyError(f"evaluate: example {i} (task {ex.get(F.TASK_NAME, '?')!r}) has no {key!r} feature "
                               f"(method {method!r} needs {needed})")


def example_references(ex: Mapping) -> list[str]:
    """The example's reference answers (its target when it has none)."""
    refs = ex.get(F.REFERENCES)
    if refs is None:
        refs = [ex[F.TARGETS]]
    elif isinstance(refs, str):
        refs = [refs]
    return [str(r) for r in refs]


def example_id(ex: Mapping, i: int) -> str:
    return str(ex["id"]) if "id" in ex else f"{ex[F.TASK_NAME]}-{i}"


def categories_of(examples, categories: Mapping[str, str] | None) -> list[str] | None:
    """Each example's category (its own field, else `categories[task]`); None unless every example has one."""
    out = []
    for ex in examples:
        c = ex.get(CATEGORY)
        if c is None and categories is not None:
            c = categories.get(str(ex[F.TASK_NAME]))
        if c is None:
            return None
        out.append(str(c))
    return out
