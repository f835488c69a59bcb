"""SeqIO registration of the synthetic suite: one task per synthetic task and the train / seen / unseen
mixtures (the only synthetic module that imports SeqIO and TensorFlow, through tasks.common).
"""
from __future__ import annotations

import functools
import random
from typing import Callable, Sequence

from tasks import common
from tasks.synthetic.operations import TEST, TRAIN
from tasks.synthetic.suite import format_example, num_positive_examples, seqio_task_name, suite_for
from tasks.synthetic.task import Suite, SyntheticTask


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
