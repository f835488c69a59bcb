"""The stage-0 teacher table: shapes, logical names, init, and joint training == per-task training."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax import partitioning
from tagi_jax.models import lora
from tagi_jax.models.t5_config import tiny_config
from tagi_jax.models.teachers import TeacherTable

T5 = tiny_config()
TARGETS = ("encoder_self.q", "decoder_cross.v", "decoder_ffn.wi_0", "encoder_self.o", "decoder_ffn.wo")
NUM_TASKS = 4


def _table(num_tasks=NUM_TASKS):
    return TeacherTable(T5, TARGETS, num_tasks, rank=3, lora_alpha=6.0)


@pytest.fixture(scope="module")
def boxed():
    return jax.jit(_table().init)(jax.random.key(0), jnp.zeros((2,), jnp.int32))["params"]


def _trained_like(params, seed=1):
    """Random B's, as after some training (B = 0 would give A no gradient)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), params)


def test_shapes_names_and_init(boxed):
    assert partitioning.unnamed_parameters(boxed) == []
    specs = partitioning.params_logical_specs(boxed)
    # The table's d_in / d_out axis is its own logical name, split over `data` (not replicated per device).
    assert tuple(specs["encoder_self.q"]["A"]) == ("tasks", "layers", "teacher_factor", "lora_rank")
    assert tuple(specs["decoder_ffn.wo"]["B"]) == ("tasks", "layers", "lora_rank", "teacher_factor")
    assert tuple(specs["encoder_self.o"]["A"]) == ("tasks", "layers", "teacher_factor", "lora_rank")
    rules = dict(partitioning.logical_axis_rules())
    assert rules["teacher_factor"] == "data" and rules.get("tasks") is None
    params = nn.meta.unbox(boxed)
    a, b = params["decoder_ffn.wi_0"]["A"], params["decoder_ffn.wi_0"]["B"]
    assert a.shape == (NUM_TASKS, T5.num_decoder_layers, T5.d_model, 3)
    assert b.shape == (NUM_TASKS, T5.num_decoder_layers, 3, T5.d_ff)
    # PEFT init: B exactly zero, A uniform within 1/sqrt(d_in), not degenerate.
    assert not np.any(np.asarray(b))
    bound = 1 / np.sqrt(T5.d_model)
    assert np.abs(np.asarray(a)).max() <= bound and np.asarray(a).std() > bound / 4


def test_gathers_each_examples_teacher(boxed):
    params = _trained_like(nn.meta.unbox(boxed))
    task_id = np.array([2, 0, 2, 3], np.int32)
    adapters = jax.jit(_table().apply)({"params": params}, task_id)
    assert set(adapters) == set(TARGETS)
    for target in TARGETS:
        for key in ("A", "B"):
            np.testing.assert_array_equal(adapters[target][key], params[target][key][task_id])
        assert float(adapters[target]["scale"]) == 2.0
        assert adapters[target]["A"].shape[0] == 4


def test_out_of_range_task_is_loud_not_another_teacher(boxed):
    # -1 is what the feature converter gives a task outside the training tasks; `take` alone would wrap it.
    ids = np.array([0, NUM_TASKS, -1], np.int32)
    adapters = jax.jit(_table().apply)({"params": nn.meta.unbox(boxed)}, ids)
    a = np.asarray(adapters["encoder_self.q"]["A"])
    assert np.all(np.isfinite(a[0])) and np.all(np.isnan(a[1])) and np.all(np.isnan(a[2]))


def _toy_per_example_loss(adapters, inputs):
    """A nonlinear per-example loss of the adapted projections of every target and layer: [batch]."""
    total = 0.0
    for target, entry in sorted(adapters.items()):
        x = inputs[target]  # [b, len, d_in]
        for layer in range(entry["A"].shape[1]):
            a, b, s = lora.layer_factors(entry, layer)
            total = total + jnp.sum(jnp.sin(lora.lora_delta(x, a, b, s) + 0.1 * layer), axis=(1, 2))
    return total


def test_joint_sgd_step_equals_per_task_steps(boxed):
    params = _trained_like(nn.meta.unbox(boxed))
    task_id = np.array([2, 0, 2, 3, 0, 3])  # task 1 is absent; 2 examples each (one compile)
    rng = np.random.default_rng(0)
    inputs = {}
    for target in TARGETS:
        d_in = params[target]["A"].shape[2]
        inputs[target] = rng.normal(size=(len(task_id), 3, d_in)).astype(np.float32)

    def summed_loss(p, ids, xs, num_tasks):
        return jnp.sum(_toy_per_example_loss(_table(num_tasks).apply({"params": p}, ids), xs))

    lr = 0.1
    grad_fn = jax.jit(jax.grad(summed_loss), static_argnums=3)
    grads = grad_fn(params, task_id, inputs, NUM_TASKS)
    grads = jax.tree.map(np.asarray, grads)
    joint = jax.tree.map(lambda p, g: p - lr * g, params, grads)

    for task in range(NUM_TASKS):
        rows = np.nonzero(task_id == task)[0]
        if len(rows) == 0:
            # Absent task: exactly zero gradient, row unchanged.
            for leaf in jax.tree.leaves(jax.tree.map(lambda g: g[task], grads)):
                assert not np.any(np.asarray(leaf))
            continue
        # The same teacher trained alone: a one-row table on its own examples.
        alone = jax.tree.map(lambda p: p[task : task + 1], params)
        own = {t: x[rows] for t, x in inputs.items()}
        g_alone = jax.tree.map(np.asarray, grad_fn(alone, np.zeros(len(rows), np.int32), own, 1))
        stepped = jax.tree.map(lambda p, g: p - lr * g, alone, g_alone)
        for target in TARGETS:
            for key in ("A", "B"):
                assert np.any(np.asarray(g_alone[target][key]))  # both factors learn
                np.testing.assert_allclose(joint[target][key][task], stepped[target][key][0], rtol=1e-5, atol=1e-6)
