"""The synthetic suite's primitive operations on lists of numbers or words, a task's steps (`Step`), their answer
(`execute`), and the one-sentence definitions with the parser that reads a task back from its definition alone.
"""
from __future__ import annotations

import dataclasses
import re
import string
from typing import Callable, Mapping, Sequence

NUMBERS, WORDS = "numbers", "words"
KINDS = (NUMBERS, WORDS)

# What the tasks of each category do:
#   number_list         sort, reverse, add k, keep numbers greater/less than k, even/odd, first/last n
#   word_transform      reverse the words or their letters, sort, first/last letters, first/last n letters of
#                       each word, add a word at the start/end, first/last n words
#   char_ops            remove / replace / count a letter, add a letter to each word, keep or drop the words
#                       containing a letter
#   selection_counting  smallest, largest, sum, count, count above k, the item at position i, longest word
#   classification      "answer <a> if <rule with k>, otherwise answer <b>": the labels themselves vary by task
#   composition         "<list operation>, then <any operation>"
# (Case changes are left out on purpose: the SNI metrics lowercase, so they would score like copying.)
CATEGORIES = (
    "number_list",
    "word_transform",
    "char_ops",
    "selection_counting",
    "classification",
    "composition",
)

# Tiny models: inputs <= 40 bytes, answers <= 24 bytes, definitions <= 150 bytes, the instruction with two
# positive examples <= 300 bytes: learnable by a small byte-level T5 trained from scratch in minutes.
MAX_INPUT_BYTES = 40
MAX_TARGET_BYTES = 24
MAX_DEFINITION_BYTES = 150
MAX_HYPER_BYTES = 300  # definition + 2 positive examples, Tk-Instruct formatted

TRAIN, TEST = "train", "test"
NUM_POSITIVE_EXAMPLES = 4  # generated per task; the setting chooses how many the instruction shows

LEXICON = (
    "ant", "bat", "bee", "box", "bus", "cab", "cat", "cow", "cup", "dog", "egg", "elm", "fig", "fox", "gem",
    "hat", "hen", "ice", "ink", "jam", "jar", "key", "kit", "log", "map", "mud", "net", "nut", "oak", "owl",
    "pen", "pig", "pot", "ram", "rat", "rug", "sun", "tea", "toy", "van", "web", "yak", "zoo",
    "bell", "bird", "boat", "cake", "coin", "desk", "door", "drum", "duck", "fish", "frog", "gift", "goat",
    "hill", "kite", "lamp", "leaf", "lion", "milk", "moon", "nest", "pear", "rain", "ring", "rock", "rose",
    "salt", "ship", "sock", "star", "tree", "wolf",
    "apple", "bread", "chair", "cloud", "grape", "horse", "lemon", "mouse", "plant", "river", "snake", "stone",
    "tiger", "train", "wheel",
)
LABEL_WORDS = (
    "yes", "no", "true", "false", "high", "low", "big", "small", "hot", "cold", "on", "off", "up", "down", "good",
    "bad", "pass", "fail", "left", "right", "win", "lose", "in", "out", "fast", "slow", "dark", "light", "full",
    "empty", "wet", "dry", "old", "new", "hit", "miss", "go", "stop", "rich", "poor", "north", "south", "black",
    "white", "sweet", "sour", "loud", "quiet",
)
# Every ordered pair of distinct label words. Each word labels many seen tasks, each time beside a different
# partner, so the only way to answer a task is to read its labels from the definition: a fixed list of pairs
# lets a model memorise its label words and answer held-out pairs with them (it did: "cold" for every task).
LABEL_PAIRS = tuple((a, b) for a in LABEL_WORDS for b in LABEL_WORDS if a != b)
# Letters in at least 10% of the lexicon's words: letter operations have something to act on.
LETTERS = tuple(c for c in string.ascii_lowercase if sum(c in w for w in LEXICON) >= 0.1 * len(LEXICON))
NUMBER_RANGE = (0, 49)
# Not "s": ROUGE-L stems "cats" to "cat", which would credit copying the input.
_SUFFIX_LETTERS = tuple(c for c in string.ascii_lowercase if c != "s")

HELD_OUT_FRACTION = 0.25  # of each operation's parameter values, of the label pairs, of the operation pairs


# ---------------------------------------------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Operation:
    """One primitive operation on a list of numbers or words.

    `fn(items, param)` returns a tuple (list output), an int/str (value output), a bool (label output; the
    task's label pair renders it), or None where the input is invalid for it (empty result, tie, ...).
    `clause` is the imperative clause of the definition, with `{p}` (the parameter; `{c}`/`{d}` for a letter
    pair) and `{a}`/`{b}` (the labels).
    """

    name: str
    kind: str
    out: str  # "list" | "value" | "label"
    category: str
    clause: str
    fn: Callable
    params: tuple = ()
    permutes: bool = False  # output is a reordering of the input
    order_free: bool = False  # output does not depend on the input's order

    @property
    def has_param(self) -> bool:
        return bool(self.params)


def _nonempty(xs) -> tuple | None:
    xs = tuple(xs)
    return xs if xs else None


def _unique_extreme(words, key, pick) -> str | None:
    best = pick(key(w) for w in words)
    hits = [w for w in words if key(w) == best]
    return hits[0] if len(hits) == 1 else None


def _at(xs, i):
    return xs[i - 1] if i <= len(xs) else None


def _first(xs, n):
    return tuple(xs[:n]) if n < len(xs) else None


def _last(xs, n):
    return tuple(xs[-n:]) if n < len(xs) else None


def _remove_letter(ws, c):
    out = tuple(w.replace(c, "") for w in ws)
    return out if all(out) else None


def _operations() -> dict[str, Operation]:
    ops = [
        # number_list: number list -> number list
        Operation("sort_asc", NUMBERS, "list", "number_list", "sort the numbers in ascending order",
                  lambda xs, p: tuple(sorted(xs)), permutes=True, order_free=True),
        Operation("sort_desc", NUMBERS, "list", "number_list", "sort the numbers in descending order",
                  lambda xs, p: tuple(sorted(xs, reverse=True)), permutes=True, order_free=True),
        Operation("reverse", NUMBERS, "list", "number_list", "reverse the order of the numbers",
                  lambda xs, p: tuple(reversed(xs)), permutes=True),
        Operation("add", NUMBERS, "list", "number_list", "add {p} to each number",
                  lambda xs, p: tuple(x + p for x in xs), params=tuple(range(1, 21))),
        Operation("keep_gt", NUMBERS, "list", "number_list", "keep only the numbers greater than {p}",
                  lambda xs, p: _nonempty(x for x in xs if x > p), params=tuple(range(5, 41))),
        Operation("keep_lt", NUMBERS, "list", "number_list", "keep only the numbers less than {p}",
                  lambda xs, p: _nonempty(x for x in xs if x < p), params=tuple(range(10, 46))),
        Operation("keep_even", NUMBERS, "list", "number_list", "keep only the even numbers",
                  lambda xs, p: _nonempty(x for x in xs if x % 2 == 0)),
        Operation("keep_odd", NUMBERS, "list", "number_list", "keep only the odd numbers",
                  lambda xs, p: _nonempty(x for x in xs if x % 2 == 1)),
        Operation("first", NUMBERS, "list", "number_list", "keep only the first {p} numbers", _first,
                  params=(2, 3, 4)),
        Operation("last", NUMBERS, "list", "number_list", "keep only the last {p} numbers", _last,
                  params=(2, 3, 4)),
        # selection_counting on numbers
        Operation("min", NUMBERS, "value", "selection_counting", "return the smallest number",
                  lambda xs, p: min(xs), order_free=True),
        Operation("max", NUMBERS, "value", "selection_counting", "return the largest number",
                  lambda xs, p: max(xs), order_free=True),
        Operation("sum", NUMBERS, "value", "selection_counting", "return the sum of the numbers",
                  lambda xs, p: sum(xs), order_free=True),
        Operation("count", NUMBERS, "value", "selection_counting", "return how many numbers there are",
                  lambda xs, p: len(xs), order_free=True),
        Operation("count_gt", NUMBERS, "value", "selection_counting", "count the numbers greater than {p}",
                  lambda xs, p: sum(x > p for x in xs), params=tuple(range(5, 41)), order_free=True),
        Operation("nth", NUMBERS, "value", "selection_counting", "return the number at position {p}", _at,
                  params=(1, 2, 3, 4)),
        # classification on numbers
        Operation("any_gt", NUMBERS, "label", "classification",
                  "answer {a} if any number is greater than {p}, otherwise answer {b}",
                  lambda xs, p: any(x > p for x in xs), params=tuple(range(10, 46)), order_free=True),
        Operation("all_gt", NUMBERS, "label", "classification",
                  "answer {a} if every number is greater than {p}, otherwise answer {b}",
                  lambda xs, p: all(x > p for x in xs), params=tuple(range(2, 21)), order_free=True),
        Operation("first_gt", NUMBERS, "label", "classification",
                  "answer {a} if the first number is greater than {p}, otherwise answer {b}",
                  lambda xs, p: xs[0] > p, params=tuple(range(10, 41))),
        # word_transform: word list -> word list
        Operation("reverse_words", WORDS, "list", "word_transform", "reverse the order of the words",
                  lambda ws, p: tuple(reversed(ws)), permutes=True),
        Operation("reverse_letters", WORDS, "list", "word_transform", "reverse the letters of each word",
                  lambda ws, p: tuple(w[::-1] for w in ws)),
        Operation("sort_words", WORDS, "list", "word_transform", "sort the words in alphabetical order",
                  lambda ws, p: tuple(sorted(ws)), permutes=True, order_free=True),
        Operation("first_letters", WORDS, "list", "word_transform", "replace each word with its first letter",
                  lambda ws, p: tuple(w[0] for w in ws)),
        Operation("last_letters", WORDS, "list", "word_transform", "replace each word with its last letter",
                  lambda ws, p: tuple(w[-1] for w in ws)),
        Operation("append", WORDS, "list", "word_transform", "add the word {p} at the end",
                  lambda ws, p: tuple(ws) + (p,), params=LEXICON),
        Operation("prepend", WORDS, "list", "word_transform", "add the word {p} at the start",
                  lambda ws, p: (p,) + tuple(ws), params=LEXICON),
        Operation("prefix", WORDS, "list", "word_transform", "keep the first {p} letters of each word",
                  lambda ws, p: tuple(w[:p] for w in ws), params=(2, 3)),
        Operation("suffix", WORDS, "list", "word_transform", "keep the last {p} letters of each word",
                  lambda ws, p: tuple(w[-p:] for w in ws), params=(2, 3)),
        Operation("first_words", WORDS, "list", "word_transform", "keep only the first {p} words", _first,
                  params=(2, 3)),
        Operation("last_words", WORDS, "list", "word_transform", "keep only the last {p} words", _last,
                  params=(2, 3)),
        # char_ops: letters inside words
        Operation("remove_letter", WORDS, "list", "char_ops", "remove every letter {p}", _remove_letter,
                  params=LETTERS),
        Operation("replace_letter", WORDS, "list", "char_ops", "replace every letter {c} with {d}",
                  lambda ws, p: tuple(w.replace(p[0], p[1]) for w in ws),
                  params=tuple((c, d) for c in LETTERS for d in string.ascii_lowercase if c != d)),
        Operation("append_letter", WORDS, "list", "char_ops", "add the letter {p} at the end of each word",
                  lambda ws, p: tuple(w + p for w in ws), params=_SUFFIX_LETTERS),
        Operation("drop_with", WORDS, "list", "char_ops", "remove the words that contain the letter {p}",
                  lambda ws, p: _nonempty(w for w in ws if p not in w), params=LETTERS),
        Operation("keep_with", WORDS, "list", "char_ops", "keep only the words that contain the letter {p}",
                  lambda ws, p: _nonempty(w for w in ws if p in w), params=LETTERS),
        Operation("count_letter", WORDS, "value", "char_ops", "count how many times the letter {p} appears",
                  lambda ws, p: sum(w.count(p) for w in ws), params=LETTERS, order_free=True),
        # selection_counting on words
        Operation("word_count", WORDS, "value", "selection_counting", "return how many words there are",
                  lambda ws, p: len(ws), order_free=True),
        Operation("nth_word", WORDS, "value", "selection_counting", "return the word at position {p}", _at,
                  params=(1, 2, 3)),
        Operation("longest", WORDS, "value", "selection_counting", "return the longest word",
                  lambda ws, p: _unique_extreme(ws, len, max), order_free=True),
        Operation("shortest", WORDS, "value", "selection_counting", "return the shortest word",
                  lambda ws, p: _unique_extreme(ws, len, min), order_free=True),
        Operation("count_long", WORDS, "value", "selection_counting", "count the words longer than {p} letters",
                  lambda ws, p: sum(len(w) > p for w in ws), params=(3, 4), order_free=True),
        # classification on words
        Operation("has_letter", WORDS, "label", "classification",
                  "answer {a} if the letter {p} appears, otherwise answer {b}",
                  lambda ws, p: any(p in w for w in ws), params=LETTERS, order_free=True),
        Operation("more_words", WORDS, "label", "classification",
                  "answer {a} if there are more than {p} words, otherwise answer {b}",
                  lambda ws, p: len(ws) > p, params=(2, 3), order_free=True),
        Operation("first_long", WORDS, "label", "classification",
                  "answer {a} if the first word is longer than {p} letters, otherwise answer {b}",
                  lambda ws, p: len(ws[0]) > p, params=(3, 4)),
    ]
    return {op.name: op for op in ops}


OPERATIONS: Mapping[str, Operation] = _operations()


# ---------------------------------------------------------------------------------------------------------------
# Task specifications: a task is one or two (operation, parameter) steps
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Step:
    """One operation with its parameter (None if it has none) and, for classification, its label pair."""

    op: str
    param: object = None
    labels: tuple[str, str] | None = None

    @property
    def operation(self) -> Operation:
        return OPERATIONS[self.op]

    def clause(self) -> str:
        p = self.param
        fields = {"p": p, "a": None, "b": None, "c": None, "d": None}
        if isinstance(p, tuple):
            fields.update(c=p[0], d=p[1])
        if self.labels:
            fields.update(a=self.labels[0], b=self.labels[1])
        return self.operation.clause.format(**fields)

    def slug(self) -> str:
        parts = [self.op]
        if isinstance(self.param, tuple):
            parts += [str(x) for x in self.param]
        elif self.param is not None:
            parts.append(str(self.param))
        if self.labels:
            parts += list(self.labels)
        return "_".join(parts)


def _parse_items(kind: str, text: str) -> tuple:
    return tuple(int(x) for x in text.split()) if kind == NUMBERS else tuple(text.split())


def _render(value) -> str:
    if isinstance(value, tuple):
        return " ".join(str(x) for x in value)
    return str(value)


def execute(kind: str, steps: Sequence[Step], text: str) -> str | None:
    """The answer of the task `steps` on input `text`, or None where the input is invalid for the task.

    Invalid: an empty or degenerate intermediate result, a list answer equal to the input (the operation
    would do nothing), or an answer longer than MAX_TARGET_BYTES.
    """
    items = _parse_items(kind, text)
    value: object = items
    for i, step in enumerate(steps):
        op = step.operation
        if not isinstance(value, tuple):
            raise ValueError(f"step {i} ({step.op}) needs a list, got {value!r}")
        value = op.fn(value, step.param)
        if value is None:
            return None
        if op.out == "label":
            value = step.labels[0] if value else step.labels[1]
    if isinstance(value, tuple) and value == items:
        return None
    answer = _render(value)
    if len(answer.encode()) > MAX_TARGET_BYTES:
        return None
    return answer


def render_alone(kind: str, steps: tuple[Step, ...], text: str) -> str | None:
    """The answer of `steps` without the output==input and length rules (to compare with a composition)."""
    value: object = _parse_items(kind, text)
    for step in steps:
        value = step.operation.fn(value, step.param)
        if value is None:
            return None
        if step.operation.out == "label":
            value = step.labels[0] if value else step.labels[1]
    return _render(value)


# ---------------------------------------------------------------------------------------------------------------
# Definitions and their parser (the parser shows the definition alone determines the task)
# ---------------------------------------------------------------------------------------------------------------


def definition_text(kind: str, steps: Sequence[Step]) -> str:
    """"Given a list of numbers, <clause>[, then <clause>]." (SNI-style, one sentence)."""
    return f"Given a list of {kind}, " + ", then ".join(s.clause() for s in steps) + "."


def _clause_regex(op: Operation) -> re.Pattern:
    pattern = re.escape(op.clause)
    for field in ("p", "a", "b", "c", "d"):
        pattern = pattern.replace(re.escape("{" + field + "}"), f"(?P<{field}>[a-z0-9]+)")
    return re.compile(pattern + "$")


def parse_definition(definition: str) -> tuple[str, tuple[Step, ...]]:
    """Inverse of `definition_text`: (kind, steps) read back from the text alone."""
    m = re.fullmatch(r"Given a list of (numbers|words), (.+)\.", definition)
    if not m:
        raise ValueError(f"not a synthetic definition: {definition!r}")
    kind, body = m.group(1), m.group(2)
    steps = []
    for clause in body.split(", then "):
        for op in OPERATIONS.values():
            if op.kind != kind:
                continue
            cm = _clause_regex(op).match(clause)
            if cm:
                g = cm.groupdict()
                if "c" in g:
                    param: object = (g["c"], g["d"])
                elif "p" in g:
                    param = int(g["p"]) if g["p"].isdigit() else g["p"]
                else:
                    param = None
                labels = (g["a"], g["b"]) if "a" in g else None
                steps.append(Step(op.name, param, labels))
                break
        else:
            raise ValueError(f"unknown clause {clause!r} in definition {definition!r}")
    return kind, tuple(steps)
