"""Which tasks a synthetic suite holds: the parameter values, label pairs and operation pairs held out for unseen
tasks, and the seeded drawing of distinct, informative tasks spread evenly over categories.
"""
from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

from tasks.formatting import tk_instruction
from tasks.synthetic.operations import (
    CATEGORIES,
    HELD_OUT_FRACTION,
    LABEL_PAIRS,
    MAX_DEFINITION_BYTES,
    MAX_HYPER_BYTES,
    NUM_POSITIVE_EXAMPLES,
    OPERATIONS,
    TEST,
    Operation,
    Step,
    definition_text,
    execute,
    render_alone,
)
from tasks.synthetic.task import Pools, SyntheticTask, take_valid

# Generalisation: unseen tasks use parameter values never paired with that operation in training (k, letters,
# words, positions), label words never paired in training, and operation pairs never composed in training,
# phrased with the same templates, so a model that learned to read the definition can transfer.


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


def held_out_plan(seed: int) -> _Plan:
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
            differs = sum(render_alone(kind, alone, x) != a for x, a in valid)
            if differs < 0.3 * len(valid):
                return False
    return True


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
    candidates = take_valid(task, shown, 4 * NUM_POSITIVE_EXAMPLES)
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


def draw_tasks(
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
