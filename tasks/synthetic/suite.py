"""Building the synthetic suite (`build_suite`, `suite_for`) and turning its instances into the feature contract
(`format_example`, `vocabulary_text`, the settings): pure Python, no TensorFlow, SeqIO or JAX.
"""
from __future__ import annotations

import random
import string
from typing import Mapping

from tagi_jax import features as F
from tasks.formatting import tk_instruct_texts
from tasks.synthetic.draw import draw_tasks, held_out_plan
from tasks.synthetic.operations import LABEL_WORDS, LEXICON, NUM_POSITIVE_EXAMPLES, TRAIN
from tasks.synthetic.task import Suite, SyntheticTask, build_pools

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
    plan = held_out_plan(seed)
    rng = random.Random(f"synthetic/{seed}/tasks")
    taken: set = set()
    train = draw_tasks(rng, plan, num_train_tasks, False, pools, seed, taken)
    unseen = draw_tasks(rng, plan, num_unseen_tasks, True, pools, seed, taken)
    for want, got, what in ((num_train_tasks, train, "num_train_tasks"),
                            (num_unseen_tasks, unseen, "num_unseen_tasks")):
        if len(got) < want:
            raise ValueError(f"build_suite: {what}={want} but only {len(got)} distinct valid tasks exist")
    return Suite(seed, tuple(train), tuple(unseen), pools)


def format_example(
    task: SyntheticTask,
    instance: Mapping,
    num_pos: int = 2,
    with_references: bool = False,
    task_name: str | None = None,
) -> dict:
    """An SNI-shaped instance as the string features of tagi_jax.features, formatted by tasks/formatting.py's
    Tk-Instruct formatter; `targets` is the first answer, `references` (eval) all of them, `task_name`
    the registered name (default: the suite's name)."""
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
