"""Stage 0: a table of task-specific LoRA teachers, all trained at once (each example gathers its task's row).
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax.models.lora import target_spec
from tagi_jax.models.t5_config import T5Config


def _lora_a_init(d_in: int):
    """PEFT's kaiming_uniform(a=sqrt(5)) on A, i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))."""
    bound = 1.0 / (d_in ** 0.5)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class TeacherTable(nn.Module):
    """`num_tasks` LoRA adapters for `targets`; `__call__(task_id [b])` -> adapters pytree with a batch axis.

    Parameters mirror the adapters pytree: `{<target>: {"A": [tasks, layers, d_in, r],
    "B": [tasks, layers, r, d_out]}}` with logical axes ('tasks', 'layers', 'teacher_factor', 'lora_rank') and
    ('tasks', 'layers', 'lora_rank', 'teacher_factor'): the table is split over the mesh's `data` axis along
    d_in / d_out (d_model- or d_ff-sized, divisible by any data axis in practice, unlike the task count), so
    a table of many tasks is not replicated on every device.

    Instead of one training run per task (the original code ran 60 separate ones), every task's LoRA factors
    are rows of one table, `A: [tasks, layers, d_in, r]` and `B: [tasks, layers, r, d_out]` per target, and
    each example gathers its own task's rows by `task_id`. The result is an ordinary adapters pytree with a
    batch axis (`tagi_jax.models.lora`), so the backbone needs no special path.

    How close this is to separate training: gathering is linear, so the raw gradient of a row is the sum of
    the gradients of the examples that gathered it, and rows of tasks absent from a batch get exactly zero.
    The update couples rows in three ways, so it is not the per-task runs side by side: the loss is a token
    mean over the whole batch (a task's step shrinks with the other tasks' tokens), global-norm clipping
    scales every row by the norm of all of them, and a row's Adam moments (and weight decay) still tick on
    steps where its task is absent. Adam itself is per-parameter: no row's value enters another's update.

    Initialisation is PEFT's: B = 0 (so each teacher starts as the backbone) and A kaiming-uniform with
    bound 1/sqrt(d_in).
    """
    t5: T5Config
    targets: Sequence[str]
    num_tasks: int
    rank: int = 32
    lora_alpha: float = 32.0

    @property
    def scale(self) -> float:
        return self.lora_alpha / self.rank

    @nn.compact
    def __call__(self, task_id: jax.Array) -> dict[str, dict[str, jax.Array]]:
        if self.num_tasks <= 0:
            raise ValueError(f"teachers: num_teachers must be positive, got {self.num_tasks}")
        task_id = jnp.asarray(task_id, jnp.int32)
        return {
            target: _TargetTable(self.t5, target, self.num_tasks, self.rank, self.scale, name=target)(task_id)
            for target in self.targets
        }


class _TargetTable(nn.Module):
    """The rows of one target: parameters `A`, `B`; gathers each example's task."""
    t5: T5Config
    target: str
    num_tasks: int
    rank: int
    scale: float

    @nn.compact
    def __call__(self, task_id: jax.Array) -> dict[str, jax.Array]:
        spec = target_spec(self.t5, self.target)
        pdtype = self.t5.jnp_param_dtype
        a = self.param(
            "A",
            nn.with_logical_partitioning(_lora_a_init(spec.d_in), ("tasks", "layers", "teacher_factor", "lora_rank")),
            (self.num_tasks, spec.num_layers, spec.d_in, self.rank), pdtype,
        )
        b = self.param(
            "B",
            nn.with_logical_partitioning(nn.initializers.zeros_init(), ("tasks", "layers", "lora_rank", "teacher_factor")),
            (self.num_tasks, spec.num_layers, self.rank, spec.d_out), pdtype,
        )
        # An out-of-range id (negative ones included, which `take` would wrap) gives NaN factors (loud), never
        # another task's teacher (XLA would clamp).
        task_id = jnp.where(task_id < 0, self.num_tasks, task_id)
        ga = jnp.take(a, task_id, axis=0, mode="fill", fill_value=jnp.nan)
        gb = jnp.take(b, task_id, axis=0, mode="fill", fill_value=jnp.nan)
        return {
            "A": nn.with_logical_constraint(ga, ("batch", "layers", None, "lora_rank")),
            "B": nn.with_logical_constraint(gb, ("batch", "layers", "lora_rank", None)),
            "scale": jnp.asarray(self.scale, jnp.float32),
        }
