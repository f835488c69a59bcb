"""Tk-Instruct's text format: an SNI-shaped task and instance -> the hyper_inputs / inputs / full_inputs strings.

Pure Python (no TensorFlow or SeqIO): the SNI registry and the synthetic suite both format through it.
"""
from __future__ import annotations

import string
from typing import Callable, Mapping, Sequence

from tagi_jax import features as F

# The text features, the same strings Tk-Instruct's `DataCollatorForNI` builds (src/ni_collator.py):
#   hyper_inputs  the instruction: "Definition: ...\n\n" + " Positive Example k -\nInput: ...\n Output: ...\n\n"
#                 ... + " Negative Example k -\n..." (what TAGI's hypernetwork reads: its collator's `prefix`)
#   inputs        the instance part alone: "Now complete the following example -\nInput: ...\nOutput: "
#                 (what the student with the generated adapter reads: the collator's `task_input`. TAGI's code,
#                 with `custom_model`, gives its student `definition + task_input`; the feature contract says
#                 the instance alone, and the definition reaches the student through the adapter and fusion)
#   full_inputs   Tk-Instruct's source text, i.e. exactly hyper_inputs + inputs (teachers, concat baseline)
# With a length limit, demonstration examples that would make the tokenised full input longer than
# `max_source_length` are dropped, one by one, with the collator's own length check (its quirks kept: the check
# joins examples with " ").


def _example_str(kind: str, idx: int, example: Mapping, add_explanation: bool) -> str:
    # Verbatim Tk-Instruct (ni_collator.py), including the leading spaces.
    s = f" {kind} Example {idx + 1} -\n"
    s += f"Input: {example['input'].strip()}"
    if not s[-1] in string.punctuation:
        s += "."
    s += "\n"
    s += f" Output: {example['output'].strip()}"
    if not s[-1] in string.punctuation:
        s += "."
    s += "\n"
    if add_explanation and "explanation" in example:
        s += f" Explanation: {example['explanation'].strip()}"
        if not s[-1] in string.punctuation:
            s += "."
        s += "\n"
    s += "\n"
    return s


def tk_instruct_texts(
    task: Mapping,
    instance_input: str,
    num_pos: int = 2,
    num_neg: int = 0,
    add_explanation: bool = False,
    add_task_definition: bool = True,
    task_prefix: str = "",
    token_length: Callable[[str], int] | None = None,
    max_source_length: int | None = None,
    max_instruction_chars: int | None = None,
) -> dict[str, str]:
    """{hyper_inputs, inputs, full_inputs} for one instance, as Tk-Instruct's DataCollatorForNI builds them.

    `token_length(text)` counts tokens including EOS (like a HF tokenizer's input_ids); with
    `max_source_length`, examples that would overflow are dropped (and the ones after them), as there.
    `task_prefix` is the collator's optional "<task name>. " prefix (off in every Tk-Instruct setting).
    """
    task_input = ""
    task_input += "Now complete the following example -\n"
    task_input += f"Input: {instance_input.strip()}"
    if not task_input[-1] in string.punctuation:
        task_input += "."
    task_input += "\n"
    task_input += "Output: "

    definition = ""
    if add_task_definition:
        raw = task["Definition"][0] if isinstance(task["Definition"], list) else task["Definition"]
        if max_instruction_chars is not None:
            raw = raw.strip()[:max_instruction_chars]
        definition = "Definition: " + raw.strip()
        if not definition[-1] in string.punctuation:
            definition += "."
        definition += "\n\n"

    def fits(text: str) -> bool:
        return max_source_length is None or token_length is None or token_length(text) <= max_source_length

    pos_examples: list[str] = []
    for idx, example in enumerate(task.get("Positive Examples", [])[:num_pos]):
        s = _example_str("Positive", idx, example, add_explanation)
        if fits(definition + " ".join(pos_examples) + s + task_input):
            pos_examples.append(s)
        else:
            break

    neg_examples: list[str] = []
    for idx, example in enumerate(task.get("Negative Examples", [])[:num_neg]):
        s = _example_str("Negative", idx, example, add_explanation)
        if fits(definition + " ".join(pos_examples) + " ".join(neg_examples) + s + task_input):
            neg_examples.append(s)
        else:
            break

    instruction = task_prefix + definition + "".join(pos_examples) + "".join(neg_examples)
    return {F.HYPER_INPUTS: instruction, F.INPUTS: task_input, F.FULL_INPUTS: instruction + task_input}


# The same text for a plain definition with positive examples only (no negatives, explanations or length limit),
# written independently of `tk_instruct_texts`: the synthetic suite sizes its instructions with it when it is
# built (tests check the two agree).
def _end_with_punctuation(text: str) -> str:
    return text if text and text[-1] in string.punctuation else text + "."


def tk_instruction(definition: str, positive_examples: Sequence[Mapping[str, str]] = ()) -> str:
    """Tk-Instruct's instruction: "Definition: ...\n\n" + " Positive Example k -\nInput: ...\n Output: ...\n\n"."""
    text = _end_with_punctuation("Definition: " + definition.strip()) + "\n\n"
    for i, ex in enumerate(positive_examples):
        text += _end_with_punctuation(f" Positive Example {i + 1} -\nInput: {ex['input'].strip()}") + "\n"
        text += _end_with_punctuation(f" Output: {ex['output'].strip()}") + "\n\n"
    return text


def tk_instance(instance_input: str) -> str:
    """Tk-Instruct's instance part: "Now complete the following example -\nInput: ...\nOutput: "."""
    text = f"Now complete the following example -\nInput: {instance_input.strip()}"
    return _end_with_punctuation(text) + "\nOutput: "
