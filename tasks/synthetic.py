"""The synthetic instruction suite: the embedded default that trains and evaluates anywhere, with no files.

Several hundred procedurally generated text tasks, each with an SNI-style definition, positive examples and a
seeded instance generator. Every task maps a short list of numbers or words to a short answer:

  number_list         sort, reverse, add k, keep numbers greater/less than k, even/odd, first/last n
  word_transform      reverse the words or their letters, sort, first/last letters, first/last n letters of
                      each word, add a word at the start/end, first/last n words
  char_ops            remove / replace / count a letter, add a letter to each word, keep or drop the words
                      containing a letter
  selection_counting  smallest, largest, sum, count, count above k, the item at position i, longest word
  classification      "answer <a> if <rule with k>, otherwise answer <b>": the labels themselves vary by task
  composition         "<list operation>, then <any operation>"
(Case changes are left out on purpose: the SNI metrics lowercase, so they would score like copying.)

Why it is built this way:
* Instruction dependence. All tasks of an input kind draw their instances from one shared pool of inputs, so
  the same input appears in many tasks with different answers; instances on which an operation changes
  nothing are rejected and classification tasks are balanced. An instruction-blind predictor is therefore
  capped far below one that follows the instruction (tests/test_synthetic.py measures the gap).
* Generalisation. Unseen tasks use parameter values never paired with that operation in training (k,
  letters, words, positions), label words never paired in training, and operation pairs never composed in
  training, phrased with the same templates, so a model that learned to read the definition can transfer.
* Tiny models. Inputs <= 40 bytes, answers <= 24 bytes, definitions <= 150 bytes, the instruction with two
  positive examples <= 300 bytes: learnable by a small byte-level T5 trained from scratch in minutes.
* Disjoint instances. Inputs are split once into a train pool, a test pool and an example pool; seen tasks
  train on the first and are evaluated on the second, unseen tasks are evaluated on the second.

The features are formatted by tasks/sni.py's Tk-Instruct formatter, exactly like Super-NaturalInstructions,
so the same model code reads both. `build_suite` is pure Python (tasks, instances, `parse_definition`);
`register_synthetic` registers SeqIO tasks and mixtures. Nothing is computed at import time.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
import string
from typing import Callable, Iterable, Mapping, Sequence

NUMBERS, WORDS = "numbers", "words"
KINDS = (NUMBERS, WORDS)

CATEGORIES = (
    "number_list",
    "word_transform",
    "char_ops",
    "selection_counting",
    "classification",
    "composition",
)

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


# ---------------------------------------------------------------------------------------------------------------
# Tk-Instruct text: the features come from tasks.sni.tk_instruct_texts (one formatter for both suites); this
# pure-Python mirror only sizes instructions at build time (tests check the two agree).
# ---------------------------------------------------------------------------------------------------------------


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


SETTINGS = ("def", "def_pos2")


def num_positive_examples(setting: str, num_pos: int = 2) -> int:
    """Positive examples the instruction shows: 'def' -> 0, 'def_pos2' -> num_pos (as in tasks/sni.py)."""
    if setting == "def_pos2_neg2":
        raise ValueError("synthetic: setting 'def_pos2_neg2' is not available (no negative examples here)")
    if setting not in SETTINGS:
        raise ValueError(f"synthetic: setting must be one of {SETTINGS}, got {setting!r}")
    if not 0 <= num_pos <= NUM_POSITIVE_EXAMPLES:
        raise ValueError(f"synthetic: num_pos must be in [0, {NUM_POSITIVE_EXAMPLES}], got {num_pos}")
    return 0 if setting == "def" else num_pos


# ---------------------------------------------------------------------------------------------------------------
# Input pools (shared by all tasks of a kind: the same input appears in many tasks)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Pools:
    """Disjoint input pools per kind: `train` (seen-task training), `test` (evaluation), `examples` (shown)."""

    train: Mapping[str, tuple[str, ...]]
    test: Mapping[str, tuple[str, ...]]
    examples: Mapping[str, tuple[str, ...]]

    def get(self, kind: str, split: str) -> tuple[str, ...]:
        return {TRAIN: self.train, TEST: self.test, "examples": self.examples}[split][kind]


def _random_input(rng: random.Random, kind: str, short: bool) -> str:
    if kind == NUMBERS:
        n = rng.randint(3, 4) if short else rng.randint(3, 5)
        return " ".join(str(x) for x in rng.sample(range(NUMBER_RANGE[0], NUMBER_RANGE[1] + 1), n))
    n = rng.randint(2, 3) if short else rng.randint(2, 4)
    return " ".join(rng.sample(LEXICON, n))


def build_pools(seed: int, train_size: int, test_size: int, examples_size: int = 200) -> Pools:
    """Sample disjoint pools of distinct inputs for each kind, deterministically from `seed`."""
    out: dict[str, dict[str, tuple[str, ...]]] = {"train": {}, "test": {}, "examples": {}}
    for kind in KINDS:
        seen: set[str] = set()
        for split, size, short in (("examples", examples_size, True), ("train", train_size, False),
                                   ("test", test_size, False)):
            # One stream per split: a pool's first inputs do not depend on the other pools' sizes.
            rng = random.Random(f"synthetic/{seed}/pools/{kind}/{split}")
            items: list[str] = []
            while len(items) < size:
                text = _random_input(rng, kind, short)
                if text not in seen:
                    seen.add(text)
                    items.append(text)
            out[split][kind] = tuple(items)
    return Pools(**out)


# ---------------------------------------------------------------------------------------------------------------
# Tasks and the suite
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task: its text (SNI-style), its identity (kind + steps) and a seeded instance generator."""

    name: str
    definition: str
    category: str
    kind: str
    steps: tuple[Step, ...]
    positive_examples: tuple[Mapping[str, str], ...]
    seen: bool
    pools: Pools = dataclasses.field(repr=False, compare=False)
    seed: int = 0

    @property
    def identity(self) -> tuple:
        """What makes two tasks the same task: the input kind and every (operation, parameter, labels) step."""
        return (self.kind,) + tuple((s.op, s.param, s.labels) for s in self.steps)

    @property
    def is_classification(self) -> bool:
        return self.steps[-1].operation.out == "label"

    def as_sni(self) -> dict:
        """The task in natural-instructions' JSON shape (what tasks/sni.py formats)."""
        return {
            "Definition": [self.definition],
            "Positive Examples": [dict(ex) for ex in self.positive_examples],
            "Negative Examples": [],
            "Categories": [self.category],
        }

    def answer(self, text: str) -> str | None:
        return execute(self.kind, self.steps, text)

    def instances(self, split: str, n: int, seed: int = 0) -> list[dict]:
        """Up to `n` SNI-shaped instances {"id", "input", "output": [answer]} from the split's input pool.

        Deterministic in (suite seed, task, split, seed). Classification tasks alternate labels (balanced).
        Split 'train' exists only for seen tasks; 'test' inputs never occur in any task's 'train' split.
        All tasks of a kind walk one shuffled order of the pool, so inputs recur across tasks with different
        answers: 'test' from its start (evaluation inputs shared by as many tasks as possible), 'train' from
        a task-specific offset, wrapping around (each training input in a good fraction of the tasks, and
        training as a whole covering the pool).
        """
        if split not in (TRAIN, TEST):
            raise ValueError(f"task {self.name}: unknown split {split!r} (expected 'train' or 'test')")
        if split == TRAIN and not self.seen:
            raise ValueError(f"task {self.name} is an unseen task: it has only the 'test' split")
        pool = list(self.pools.get(self.kind, split))
        random.Random(f"synthetic/{self.seed}/{self.kind}/{split}/{seed}").shuffle(pool)
        if split == TRAIN:
            start = random.Random(f"synthetic/{self.seed}/{self.name}/{split}/{seed}").randrange(len(pool))
            pool = pool[start:] + pool[:start]
        chosen = _take_valid(self, pool, n)
        return [{"id": f"{self.name}-{split}-{i}", "input": x, "output": [y]} for i, (x, y) in enumerate(chosen)]


def _take_valid(task: SyntheticTask, pool: Iterable[str], n: int) -> list[tuple[str, str]]:
    """The first `n` valid (input, answer) pairs of `pool`; for classification, labels alternate a, b, a, ..."""
    if not task.is_classification:
        out = []
        for x in pool:
            if len(out) == n:
                break
            y = task.answer(x)
            if y is not None:
                out.append((x, y))
        return out
    labels = task.steps[-1].labels
    by_label: dict[str, list[tuple[str, str]]] = {labels[0]: [], labels[1]: []}
    for x in pool:
        y = task.answer(x)
        if y is not None and len(by_label[y]) < n:
            by_label[y].append((x, y))
        if all(len(v) >= (n + 1) // 2 for v in by_label.values()):
            break
    a, b = by_label[labels[0]], by_label[labels[1]]
    out = []
    while len(out) < n and (a or b):
        for bucket in (a, b):
            if bucket and len(out) < n:
                out.append(bucket.pop(0))
    return out


@dataclasses.dataclass(frozen=True)
class Suite:
    """A built suite: seen (`train_tasks`) and held-out (`unseen_tasks`) tasks over shared input pools."""

    seed: int
    train_tasks: tuple[SyntheticTask, ...]
    unseen_tasks: tuple[SyntheticTask, ...]
    pools: Pools = dataclasses.field(repr=False)

    @property
    def tasks(self) -> tuple[SyntheticTask, ...]:
        return self.train_tasks + self.unseen_tasks

    @property
    def task_names(self) -> list[str]:
        """All task names, seen tasks first: the index is the task id (teacher table rows 0..n_seen-1)."""
        return [t.name for t in self.tasks]

    @property
    def categories(self) -> dict[str, str]:
        return {t.name: t.category for t in self.tasks}

    def task(self, name: str) -> SyntheticTask:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no synthetic task named {name!r}")


def _split_values(rng: random.Random, values: Sequence, fraction: float = HELD_OUT_FRACTION) -> tuple[set, set]:
    """(seen, held-out) partition of `values`; at least one value on each side when there are two or more."""
    values = list(values)
    k = max(1, round(fraction * len(values))) if len(values) > 1 else 0
    held = set(rng.sample(values, k))
    return set(values) - held, held


def _composable(op1: Operation, op2: Operation) -> bool:
    """A composition "op1, then op2" that is not the same as op2 alone or a repeat of op1."""
    if op1.out != "list" or op1.kind != op2.kind or op1.name == op2.name:
        return False
    if op1.permutes and op2.order_free:  # e.g. "reverse, then return the largest" == "return the largest"
        return False
    return True


@dataclasses.dataclass
class _Plan:
    """Which parameter values, label pairs and operation pairs are held out for unseen tasks."""

    seen_params: dict[str, list]
    held_params: dict[str, list]
    seen_labels: list
    held_labels: list
    seen_pairs: list[tuple[str, str]]
    held_pairs: list[tuple[str, str]]


def _plan(seed: int) -> _Plan:
    rng = random.Random(f"synthetic/{seed}/plan")
    seen_params, held_params = {}, {}
    for op in OPERATIONS.values():
        seen, held = _split_values(rng, op.params)
        seen_params[op.name] = [v for v in op.params if v in seen]
        held_params[op.name] = [v for v in op.params if v in held]
    seen_l, held_l = _split_values(rng, LABEL_PAIRS)
    pairs = [(a.name, b.name) for a in OPERATIONS.values() for b in OPERATIONS.values() if _composable(a, b)]
    seen_p, held_p = _split_values(rng, pairs)
    return _Plan(
        seen_params, held_params,
        [l for l in LABEL_PAIRS if l in seen_l], [l for l in LABEL_PAIRS if l in held_l],
        [p for p in pairs if p in seen_p], [p for p in pairs if p in held_p],
    )


def _draw_step(rng: random.Random, op: Operation, plan: _Plan, unseen: bool) -> Step:
    """A step of `op`; for an unseen primitive, its parameter or its label pair (or both) is held out."""
    params_seen, params_held = plan.seen_params[op.name], plan.held_params[op.name]
    labels_ok = op.out == "label"
    if not unseen:
        param = rng.choice(params_seen) if op.has_param else None
        labels = rng.choice(plan.seen_labels) if labels_ok else None
        return Step(op.name, param, labels)
    # Unseen primitive: hold out the parameter, the labels or both.
    held_param, held_labels = True, False
    if labels_ok:
        held_param, held_labels = rng.choice([(True, False), (False, True), (True, True)])
    param = (rng.choice(params_held) if held_param else rng.choice(params_seen)) if op.has_param else None
    labels = (rng.choice(plan.held_labels) if held_labels else rng.choice(plan.seen_labels)) if labels_ok else None
    return Step(op.name, param, labels)


def _candidate_groups(plan: _Plan, unseen: bool) -> dict[str, list[tuple]]:
    """category -> groups to draw from: ('op', name) for primitives, ('pair', op1, op2) for compositions."""
    groups: dict[str, list[tuple]] = {c: [] for c in CATEGORIES}
    for op in OPERATIONS.values():
        if unseen and not (plan.held_params[op.name] or op.out == "label"):
            continue  # a parameterless operation has no unseen variant of its own
        groups[op.category].append(("op", op.name))
    for pair in plan.held_pairs if unseen else plan.seen_pairs:
        groups["composition"].append(("pair",) + pair)
    return groups


def _informative(kind: str, steps: tuple[Step, ...], probe: Sequence[str]) -> bool:
    """Whether `steps` makes a task worth having, judged on the probe inputs.

    Valid on at least half of them; classification labels not too unbalanced to sample balanced instances;
    otherwise no answer on more than half of them (e.g. "count the letter k" would mostly be "0"); and for a
    composition, each step changes the answer on at least 30% of them ("keep the last 2 letters, then replace
    every letter c" would mostly ignore its second step).
    """
    answers = [execute(kind, steps, x) for x in probe]
    valid = [(x, a) for x, a in zip(probe, answers) if a is not None]
    if len(valid) < 0.5 * len(probe):
        return False
    outs = [a for _, a in valid]
    if steps[-1].operation.out == "label":
        return min(outs.count(label) for label in steps[-1].labels) >= 0.2 * len(outs)
    if max(outs.count(a) for a in set(outs)) > 0.5 * len(outs):
        return False
    if len(steps) > 1:
        for alone in ((steps[0],), (steps[1],)):
            differs = sum(_render_alone(kind, alone, x) != a for x, a in valid)
            if differs < 0.3 * len(valid):
                return False
    return True


def _render_alone(kind: str, steps: tuple[Step, ...], text: str) -> str | None:
    """The answer of `steps` without the output==input and length rules (to compare with a composition)."""
    value: object = _parse_items(kind, text)
    for step in steps:
        value = step.operation.fn(value, step.param)
        if value is None:
            return None
        if step.operation.out == "label":
            value = step.labels[0] if value else step.labels[1]
    return _render(value)


def _make_task(kind, steps, category, seen, pools, seed, rng) -> SyntheticTask | None:
    """The task for `steps`, or None if it is uninformative or its text is over the length bounds."""
    definition = definition_text(kind, steps)
    if len(definition.encode()) > MAX_DEFINITION_BYTES:
        return None
    if not _informative(kind, steps, pools.get(kind, TEST)[:200]):
        return None
    name = "_then_".join(s.slug() for s in steps)
    task = SyntheticTask(name, definition, category, kind, steps, (), seen, pools, seed)
    # Positive examples from the (short) example pool, with different answers where possible.
    shown = list(pools.get(kind, "examples"))
    rng.shuffle(shown)
    candidates = _take_valid(task, shown, 4 * NUM_POSITIVE_EXAMPLES)
    examples, outputs = [], set()
    for distinct_only in (True, False):
        for x, y in candidates:
            repeated = (x, y) in examples or (distinct_only and y in outputs)
            if len(examples) < NUM_POSITIVE_EXAMPLES and not repeated:
                examples.append((x, y))
                outputs.add(y)
    if len(examples) < NUM_POSITIVE_EXAMPLES:
        return None
    examples = [{"input": x, "output": y} for x, y in examples]
    # Keep the two-example instruction inside the byte budget: the shortest pairs first if needed.
    if len(tk_instruction(definition, examples[:2]).encode()) > MAX_HYPER_BYTES:
        examples.sort(key=lambda e: len(e["input"]) + len(e["output"]))
        if len(tk_instruction(definition, examples[:2]).encode()) > MAX_HYPER_BYTES:
            return None
    return dataclasses.replace(task, positive_examples=tuple(examples))


class _CategoryDrawer:
    """Draws distinct valid tasks of one category, cycling over its groups (operations or operation pairs)."""

    def __init__(self, rng, plan, unseen, pools, seed, taken, category, groups, quota):
        self.rng, self.plan, self.unseen, self.pools, self.seed, self.taken = rng, plan, unseen, pools, seed, taken
        self.category = category
        self.order = list(groups)
        rng.shuffle(self.order)
        # No operation takes much more than its share: ops with many parameter values would crowd the rest out.
        self.cap = max(2, math.ceil(2 * quota / max(1, len(self.order))))
        self.count = {g: 0 for g in self.order}
        self.failures = {g: 0 for g in self.order}
        self.next = 0

    def draw(self, capped: bool = True) -> SyntheticTask | None:
        while True:
            live = [g for g in self.order if self.failures[g] < 30 and (not capped or self.count[g] < self.cap)]
            if not live:
                return None
            group = live[self.next % len(live)]
            self.next += 1
            kind = OPERATIONS[group[1]].kind
            if group[0] == "op":
                steps = (_draw_step(self.rng, OPERATIONS[group[1]], self.plan, self.unseen),)
            else:  # compositions: a held-out pair of operations, each with seen parameters
                steps = (_draw_step(self.rng, OPERATIONS[group[1]], self.plan, False),
                         _draw_step(self.rng, OPERATIONS[group[2]], self.plan, False))
            key = (kind,) + tuple((s.op, s.param, s.labels) for s in steps)
            task = None
            if key not in self.taken:
                task = _make_task(kind, steps, self.category, not self.unseen, self.pools, self.seed, self.rng)
            if task is None:
                self.failures[group] += 1  # a group that keeps failing is exhausted (or never valid)
                continue
            self.taken.add(key)
            self.count[group] += 1
            return task


def _draw_tasks(
    rng: random.Random, plan: _Plan, n: int, unseen: bool, pools: Pools, seed: int, taken: set
) -> list[SyntheticTask]:
    """`n` distinct tasks spread evenly over categories, and within a category over its operations; what a
    category cannot supply is drawn round-robin from the others."""
    groups = _candidate_groups(plan, unseen)
    cats = [c for c in CATEGORIES if groups[c]]
    drawers = []
    for i, c in enumerate(cats):
        quota = n // len(cats) + (1 if i < n % len(cats) else 0)
        drawers.append((_CategoryDrawer(rng, plan, unseen, pools, seed, taken, c, groups[c], quota), quota))
    tasks: list[SyntheticTask] = []
    for drawer, quota in drawers:
        for _ in range(quota):
            task = drawer.draw()
            if task is None:
                break
            tasks.append(task)
    live = [d for d, _ in drawers]
    while len(tasks) < n and live:
        for d in list(live):
            if len(tasks) == n:
                break
            task = d.draw(capped=False)
            if task is None:
                live.remove(d)
            else:
                tasks.append(task)
    return tasks


def build_suite(
    seed: int = 0,
    num_train_tasks: int = 360,
    num_unseen_tasks: int = 90,
    train_pool_size: int = 500,
    test_pool_size: int = 300,
) -> Suite:
    """Build the suite deterministically from `seed`: seen and unseen tasks, spread evenly over categories.

    Unseen tasks never share an (operation, parameter, labels) identity with a seen task: a held-out
    parameter value or label pair for primitives, a held-out operation pair for compositions.
    """
    if num_train_tasks < 1 or num_unseen_tasks < 0:
        raise ValueError(f"build_suite: num_train_tasks={num_train_tasks}, num_unseen_tasks={num_unseen_tasks}")
    pools = build_pools(seed, train_pool_size, test_pool_size)
    plan = _plan(seed)
    rng = random.Random(f"synthetic/{seed}/tasks")
    taken: set = set()
    train = _draw_tasks(rng, plan, num_train_tasks, False, pools, seed, taken)
    unseen = _draw_tasks(rng, plan, num_unseen_tasks, True, pools, seed, taken)
    for want, got, what in ((num_train_tasks, train, "num_train_tasks"),
                            (num_unseen_tasks, unseen, "num_unseen_tasks")):
        if len(got) < want:
            raise ValueError(f"build_suite: {what}={want} but only {len(got)} distinct valid tasks exist")
    return Suite(seed, tuple(train), tuple(unseen), pools)


# ---------------------------------------------------------------------------------------------------------------
# The feature contract and SeqIO registration
# ---------------------------------------------------------------------------------------------------------------


def format_example(
    task: SyntheticTask,
    instance: Mapping,
    num_pos: int = 2,
    with_references: bool = False,
    task_name: str | None = None,
) -> dict:
    """An SNI-shaped instance as the string features of tagi_jax.features, formatted by tasks/sni.py's
    Tk-Instruct formatter; `targets` is the first answer, `references` (eval) all of them, `task_name`
    the registered name (default: the suite's name)."""
    from tagi_jax import features as F
    from tasks.sni import tk_instruct_texts

    answers = list(instance["output"])
    ex = tk_instruct_texts(task.as_sni(), instance["input"], num_pos=num_pos, num_neg=0)
    ex[F.TARGETS] = answers[0]
    ex[F.TASK_NAME] = task.name if task_name is None else task_name
    if with_references:
        ex[F.REFERENCES] = answers
    return ex


def vocabulary_text(suite: Suite, num_pos: int = 2, instances_per_task: int = 4, seed: int = 0) -> list[str]:
    """Text to train a vocabulary on: formatted training instances of the *seen* tasks (instruction, instance
    and answer, so the format's words are pieces), then every atom an instance or answer can hold (lexicon
    and label words, numbers, letters), as a real tokenizer covers the whole language.
    No unseen task's definition or instance is read."""
    from tagi_jax import features as F

    lines = []
    for task in suite.train_tasks:
        for inst in task.instances(TRAIN, instances_per_task, seed=seed):
            ex = format_example(task, inst, num_pos)
            lines += [ex[F.HYPER_INPUTS], ex[F.INPUTS], ex[F.TARGETS]]
    # Repeated so BPE merges each atom into one piece, however rarely the seen tasks use it.
    atoms = [" ".join(LEXICON), " ".join(LABEL_WORDS),
             " ".join(str(n) for n in range(100)), " ".join(string.ascii_lowercase)]
    return lines + atoms * 10 + [" ".join(str(n) for n in range(100, 1000))]


def seqio_task_name(task: SyntheticTask, prefix: str = "synthetic") -> str:
    """The registered SeqIO name (also the `task_name` feature): `<prefix>_<task name>`."""
    return f"{prefix}_{task.name}"


def suite_for(seed: int, num_train_tasks: int, num_unseen_tasks: int, train_instances_per_task: int,
              eval_instances_per_task: int) -> Suite:
    """The suite `register_synthetic` registers for these settings."""
    # Every task is valid on at least half of the inputs, so it finds its instances in pools this size; the
    # train pool is small enough that each training input recurs in about 40% of the tasks of its kind.
    return build_suite(
        seed, num_train_tasks, num_unseen_tasks,
        train_pool_size=max(200, 5 * train_instances_per_task),
        test_pool_size=max(200, 3 * eval_instances_per_task),
    )


def register_synthetic(
    vocabulary,
    seed: int = 0,
    setting: str = "def_pos2",
    num_train_tasks: int = 360,
    num_unseen_tasks: int = 90,
    train_instances_per_task: int = 100,
    eval_instances_per_task: int = 100,
    num_pos: int = 2,
    prefix: str = "synthetic",
    metric_fns: Sequence[Callable] = (),
    postprocess_fn: Callable | None = None,
    suite: Suite | None = None,
) -> dict:
    """Register one SeqIO task per synthetic task (`<prefix>_<name>`) and the mixtures `<prefix>_train`
    (the seen tasks' split 'train', read through one task `<prefix>_seen_tasks`), `<prefix>_seen_eval` (the
    same tasks; read split 'test': inputs no training instance has) and `<prefix>_unseen_eval` (unseen tasks;
    split 'test'). Test splits keep `references`. Deterministic from `seed`; nothing is read from disk or network.

    `suite` (default: `suite_for(...)` of these arguments) lets a caller that needs the suite first (to
    train a vocabulary on it) build it once.

    Returns {"suite": Suite, "task_names": registered names, seen tasks first (index = task id; the first
    len(train_task_names) are the seen tasks), "train_task_names", "unseen_task_names", "categories":
    {registered name: category}, "mixtures": {"train", "seen_eval", "unseen_eval"} -> mixture name}.
    """
    from tasks import common

    k = num_positive_examples(setting, num_pos)
    for key, n in (("train_instances_per_task", train_instances_per_task),
                   ("eval_instances_per_task", eval_instances_per_task)):
        if n < 1:
            raise ValueError(f"synthetic: {key} must be >= 1, got {n}")
    if suite is None:
        suite = suite_for(seed, num_train_tasks, num_unseen_tasks, train_instances_per_task,
                          eval_instances_per_task)
    sizes = {TRAIN: train_instances_per_task, TEST: eval_instances_per_task}

    names = {task.name: seqio_task_name(task, prefix) for task in suite.tasks}

    def task_examples(task: SyntheticTask, split: str) -> list[dict]:
        insts = task.instances(split, sizes[split], seed=seed)
        return [format_example(task, inst, k, with_references=split == TEST, task_name=names[task.name])
                for inst in insts]

    for task in suite.tasks:
        splits = (TRAIN, TEST) if task.seen else (TEST,)
        source = common.function_source(functools.partial(task_examples, task), splits=splits, eval_splits=(TEST,))
        common.register_task(names[task.name], source, vocabulary, metric_fns=metric_fns,
                             postprocess_fn=postprocess_fn)
    train_names = [names[t.name] for t in suite.train_tasks]
    unseen_names = [names[t.name] for t in suite.unseen_tasks]
    mixtures = {m: f"{prefix}_{m}" for m in ("train", "seen_eval", "unseen_eval")}

    # Training reads all seen tasks through one SeqIO task (each example keeps its own `task_name`, so task
    # ids and teachers are per task): one tf.data pipeline per task costs ~0.2 s of graph building and
    # start-up per task and stage, minutes for a few hundred tasks; every task has the same number of
    # instances, so the shuffled union samples tasks uniformly, like the equal-rate mixture would. Shuffled
    # here, not only by SeqIO's buffer: a buffer of 1000 over examples grouped by task would feed the model
    # about ten tasks at a time, one after the other.
    def all_seen_examples(split: str) -> list[dict]:
        out = [ex for task in suite.train_tasks for ex in task_examples(task, split)]
        random.Random(f"synthetic/{seed}/union/{split}").shuffle(out)
        return out

    union = f"{prefix}_seen_tasks"
    common.register_task(union, common.function_source(all_seen_examples, splits=(TRAIN,), eval_splits=()),
                         vocabulary, metric_fns=metric_fns, postprocess_fn=postprocess_fn)
    common.register_mixture(mixtures["train"], [union])
    common.register_mixture(mixtures["seen_eval"], train_names)
    if unseen_names:
        common.register_mixture(mixtures["unseen_eval"], unseen_names)
    else:
        del mixtures["unseen_eval"]
    return {
        "suite": suite,
        "task_names": train_names + unseen_names,
        "train_task_names": train_names,
        "unseen_task_names": unseen_names,
        "categories": {names[t.name]: t.category for t in suite.tasks},
        "mixtures": mixtures,
    }
