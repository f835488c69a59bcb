"""A synthetic task (`SyntheticTask`: its text, identity and seeded instances), the input pools its instances
are drawn from, and a built `Suite` of seen and unseen tasks.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Mapping

from tasks.synthetic.operations import KINDS, LEXICON, NUMBER_RANGE, NUMBERS, TEST, TRAIN, Step, execute

# Instruction dependence: all tasks of an input kind draw their instances from one shared pool of inputs, so
# the same input appears in many tasks with different answers; instances on which an operation changes nothing
# are rejected (`execute`) and classification tasks are balanced (`take_valid`). An instruction-blind predictor
# is therefore capped far below one that follows the instruction (tests/test_synthetic.py measures the gap).
# Disjoint instances: inputs are split once into a train pool, a test pool and an example pool; seen tasks
# train on the first and are evaluated on the second, unseen tasks are evaluated on the second.


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
        """The task in natural-instructions' JSON shape (what tasks/formatting.py formats)."""
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
        chosen = take_valid(self, pool, n)
        return [{"id": f"{self.name}-{split}-{i}", "input": x, "output": [y]} for i, (x, y) in enumerate(chosen)]


def take_valid(task: SyntheticTask, pool: Iterable[str], n: int) -> list[tuple[str, str]]:
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
