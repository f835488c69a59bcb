"""The partitioned trainer on a tiny MLP: accumulation, (4, 2) mesh vs one device, exact resume, logs."""
import functools
import json
import os
import struct

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax import partitioning
from tagi_jax.trainer import optim
from tagi_jax.trainer import checkpoints
from tagi_jax.trainer import config as trainer_config
from tagi_jax.trainer import steps
from tagi_jax.trainer import distributed, trainer
from tagi_jax.trainer.train_state import TrainState

D_IN, HIDDEN, D_OUT = 4, 16, 4
BATCH = 8


class TinyMLP(nn.Module):
    """Two Dense layers with logical axis names, dropout in between (so the per-step RNG matters)."""

    dropout: float = 0.2

    @nn.compact
    def __call__(self, x, *, enable_dropout: bool = False):
        h = nn.Dense(
            HIDDEN,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.normal(0.1), ("mlp",)),
            name="encoder",
        )(x)
        h = nn.with_logical_constraint(jnp.tanh(h), ("batch", "mlp"))
        h = nn.Dropout(self.dropout, deterministic=not enable_dropout)(h)
        return nn.Dense(
            D_OUT,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", "embed")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
            name="head",
        )(h)


MODEL = TinyMLP()


def init_fn(rng):
    return MODEL.init(rng, jnp.zeros((1, D_IN)))["params"]


def loss_fn(params, batch, rng):
    """Dropout iff an rng is given (the project's convention; the trainer's eval passes None)."""
    pred = MODEL.apply({"params": params}, batch["x"], enable_dropout=rng is not None,
                       rngs={} if rng is None else {"dropout": rng})
    mse = jnp.mean((pred - batch["y"]) ** 2)
    return mse, {"mse": mse, "pred_norm": jnp.sqrt(jnp.mean(pred**2))}


def deterministic(fn):
    return lambda params, batch, rng: fn(params, batch, None)


def weighted_loss_fn(params, batch, rng):
    """A token-averaged loss: per-example weights vary, the mean is over the batch's total weight."""
    pred = MODEL.apply({"params": params}, batch["x"])
    per_example = jnp.mean((pred - batch["y"]) ** 2, axis=-1)
    total = jnp.sum(batch["w"])
    loss = jnp.sum(per_example * batch["w"]) / total
    return loss, {"loss_weight": total}


def make_batch(step, size=BATCH):
    rng = np.random.default_rng(1000 + step)
    x = rng.normal(size=(size, D_IN)).astype(np.float32)
    y = np.sin(x @ np.arange(D_IN * D_OUT, dtype=np.float32).reshape(D_IN, D_OUT) / 10)
    w = rng.integers(0, 5, size=(size,)).astype(np.float32)
    w[0] = 1.0
    return {"x": x, "y": y.astype(np.float32), "w": w}


class Data:
    """batches(start_step): the data position is a function of the step; records where it was asked to start."""

    def __init__(self):
        self.starts = []

    def __call__(self, start):
        self.starts.append(start)
        step = start
        while True:
            yield {k: v for k, v in make_batch(step).items() if k != "w"}
            step += 1


def make_config(**train):
    config = trainer_config.default_config()
    config.train.update(dict(steps=6, batch_size=BATCH, num_microbatches=1, log_every=1, checkpoint_every=3,
                             keep_checkpoints=2, eval_every=0, progress_bar=False))
    config.train.update(train)
    warmup = 2 if config.train.steps > 2 else 0
    config.optimizer.update(dict(name="adamw", learning_rate=1e-2, warmup_steps=warmup, schedule="linear",
                                 weight_decay=0.01, clip_norm=1.0))
    return config


def single_device_mesh():
    return partitioning.create_mesh(1, 1, devices=jax.devices()[:1])


def params_bytes(tree):
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(jax.device_get(tree))]


# --------------------------------------------------------------------------------------------------
# Accumulation over microbatches == one big batch
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def params0():
    return nn.meta.unbox(init_fn(jax.random.key(0)))


def _grads(params, batch, k, fn):
    compute = jax.jit(functools.partial(steps.compute_gradients, loss_fn=fn, num_microbatches=k))
    return compute(params, batch, jax.random.key(1))


@pytest.mark.parametrize("fn", ["mean", "weighted"])
def test_microbatch_accumulation_equals_big_batch(params0, fn):
    batch = jax.tree.map(jnp.asarray, make_batch(0, size=16))
    loss = deterministic(loss_fn) if fn == "mean" else weighted_loss_fn
    g1, m1 = _grads(params0, batch, 1, loss)
    g4, m4 = _grads(params0, batch, 4, loss)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6)
    if fn == "weighted":
        np.testing.assert_allclose(m4["loss_weight"], batch["w"].sum())
        # The weighting matters here: an unweighted mean of microbatch losses is different.
        per_mb = [weighted_loss_fn(params0, jax.tree.map(lambda x: x[i::4], batch), None)[0] for i in range(4)]
        assert abs(float(np.mean(per_mb)) - float(m1["loss"])) > 1e-4


def test_train_step_with_microbatches_matches_big_batch(params0):
    config = make_config()
    labels = optim.parameter_labels(params0)
    tx, schedule = optim.make_optimizer(config.optimizer, labels, total_steps=6)
    det = deterministic(loss_fn)
    results = []
    for k in (1, 2):
        step = jax.jit(functools.partial(steps.train_step, loss_fn=det, tx=tx, num_microbatches=k, schedule=schedule))
        state = TrainState.create(params0, tx)
        for s in range(3):
            state, metrics = step(state, jax.tree.map(jnp.asarray, make_batch(s)), jax.random.key(0))
        results.append((state, metrics))
    (s1, m1), (s2, m2) = results
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(s1.step) == int(s2.step) == 3
    assert float(m1["learning_rate"]) == pytest.approx(1e-2)  # lr used at step 2 (end of warmup)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-5)


def test_non_scalar_metric_is_named(params0):
    def bad(params, batch, rng):
        return jnp.zeros(()), {"per_example": jnp.zeros((3,))}

    with pytest.raises(ValueError, match="metric 'per_example' has shape"):
        _grads(params0, jax.tree.map(jnp.asarray, make_batch(0)), 1, bad)


# --------------------------------------------------------------------------------------------------
# The Trainer: (4, 2) mesh == one device; resume == uninterrupted; logs and checkpoints
# --------------------------------------------------------------------------------------------------


def test_mesh_4x2_matches_one_device(tmp_path):
    final = {}
    for name, mesh, fsdp in (("one", single_device_mesh(), False), ("mesh", partitioning.create_mesh(4, 2), True)):
        config = make_config(steps=2, num_microbatches=2, checkpoint_every=0)
        config.mesh.fsdp = fsdp
        with trainer.Trainer(config, workdir=str(tmp_path / name), init_fn=init_fn, loss_fn=loss_fn, mesh=mesh,
                             rules=partitioning.logical_axis_rules(fsdp)) as t:
            state = t.fit(Data())
            final[name] = jax.device_get(state.params)
            if name == "mesh":
                kernel = state.params["encoder"]["kernel"]
                assert kernel.sharding.spec == jax.sharding.PartitionSpec("data", "model")
                assert len(kernel.addressable_shards) == 8 and kernel.addressable_shards[0].data.shape == (1, 8)
                mu = [x for x in jax.tree.leaves(state.opt_state) if getattr(x, "shape", None) == kernel.shape]
                assert mu and all(x.sharding.spec == kernel.sharding.spec for x in mu)
    for a, b in zip(jax.tree.leaves(final["one"]), jax.tree.leaves(final["mesh"])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_rbg_step_rng_keeps_the_init_and_changes_only_dropout(tmp_path):
    """`prng_impl="rbg"`: the same initial parameters as threefry (init always uses threefry), a deterministic
    run (two runs give the same bytes), and other dropout masks than threefry's, so other trained parameters."""
    final, first = {}, {}
    for name, impl in (("threefry", "threefry2x32"), ("rbg", "rbg"), ("rbg_again", "rbg")):
        config = make_config(steps=2, checkpoint_every=0)
        config.prng_impl = impl
        with trainer.Trainer(config, workdir=str(tmp_path / name), init_fn=init_fn, loss_fn=loss_fn,
                             mesh=single_device_mesh()) as t:
            first[name] = params_bytes(t.init_params())
            assert str(jax.random.key_impl(t._step_rng)) == impl
            final[name] = params_bytes(t.fit(Data()).params)
    assert first["threefry"] == first["rbg"] == first["rbg_again"]
    assert final["rbg"] == final["rbg_again"] and final["rbg"] != final["threefry"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """An uninterrupted 6-step run (checkpoints at 3 and 6) with an eval hook every 2 steps."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    evals = []

    def eval_fn(state, step):
        evals.append(step)
        return t.evaluate(state, [make_batch(100 + i) for i in range(2)])

    with trainer.Trainer(make_config(eval_every=2), workdir=workdir, init_fn=init_fn, loss_fn=loss_fn) as t:
        state = t.fit(Data(), eval_fn=eval_fn)
        steps = t.checkpoints.all_steps()
        abstract = t.abstract_params
    return {"workdir": workdir, "state": jax.device_get(state), "evals": evals, "steps": steps, "abstract": abstract}


def test_interrupt_and_resume_equals_uninterrupted(tmp_path, straight_run):
    workdir = str(tmp_path / "resumed")
    first = Data()
    with trainer.Trainer(make_config(), workdir=workdir, init_fn=init_fn, loss_fn=loss_fn) as t:
        mid = t.fit(first, stop_at=3)  # "killed" after the checkpoint at step 3
        assert int(mid.step) == 3 and t.checkpoints.all_steps() == [3]
    second = Data()
    with trainer.Trainer(make_config(), workdir=workdir, init_fn=init_fn, loss_fn=loss_fn) as t:
        resumed = t.fit(second)
        assert t.resumed_from == 3
    assert first.starts == [0] and second.starts == [3]  # the data picks up where the checkpoint was
    resumed = jax.device_get(resumed)
    assert params_bytes(resumed.params) == params_bytes(straight_run["state"].params)
    assert params_bytes(resumed.opt_state) == params_bytes(straight_run["state"].opt_state)
    # And the resumed part did train: the parameters moved after step 3.
    assert params_bytes(resumed.params) != params_bytes(jax.device_get(mid.params))


def test_checkpoints_kept_and_params_loadable(straight_run):
    assert straight_run["steps"] == [3, 6]
    params = checkpoints.load_params(straight_run["workdir"], straight_run["abstract"])
    assert params_bytes(params) == params_bytes(straight_run["state"].params)
    # What a checkpoint holds is readable without restoring it; asking for more is an error naming the path.
    flat = jax.tree_util.tree_flatten_with_path(straight_run["abstract"])[0]
    assert checkpoints.saved_param_paths(straight_run["workdir"]) == {tuple(k.key for k in p) for p, _ in flat}
    extra = {**straight_run["abstract"], "added": jax.tree.leaves(straight_run["abstract"])[0]}
    with pytest.raises(KeyError, match="has no parameter 'added'"):
        checkpoints.load_params(straight_run["workdir"], extra)


def test_a_finished_run_does_nothing_more(straight_run):
    data = Data()
    with trainer.Trainer(make_config(), workdir=straight_run["workdir"], init_fn=init_fn, loss_fn=loss_fn) as t:
        state = t.fit(data)
    assert int(state.step) == 6 and t.resumed_from == 6
    assert params_bytes(state.params) == params_bytes(straight_run["state"].params)


def _read_event_scalars(directory):
    """Parse TensorBoard event files (TFRecord framing: length, crc, payload, crc) without TensorFlow."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_metrics_written_to_jsonl_and_tensorboard(straight_run):
    workdir = straight_run["workdir"]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "mse", "pred_norm", "grad_norm", "param_norm", "learning_rate", "examples_per_second"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[0]["learning_rate"] == 0.0 and train[2]["learning_rate"] == pytest.approx(1e-2)
    assert train[0]["loss"] == pytest.approx(train[0]["mse"])
    assert straight_run["evals"] == [2, 4, 6]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 6] and all("mse" in r for r in evals)
    # Evaluation is deterministic (rng=None, no dropout): the mean over the eval batches at the final params.
    final = straight_run["state"].params
    expected = np.mean([float(loss_fn(final, make_batch(100 + i), None)[0]) for i in range(2)])
    assert evals[-1]["loss"] == pytest.approx(expected, rel=1e-5)

    scalars = _read_event_scalars(os.path.join(workdir, "tensorboard"))
    assert sorted(scalars["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert scalars["train/loss"][6] == pytest.approx(train[-1]["loss"], rel=1e-6)
    assert sorted(scalars["eval/mse"]) == [2, 4, 6]

    saved = json.load(open(os.path.join(workdir, "config.json")))
    assert saved["train"]["steps"] == 6 and saved["optimizer"]["schedule"] == "linear"
    assert "encoder/kernel" in open(os.path.join(workdir, "model-info.txt")).read()


def test_frozen_parameters_stay_put_in_training(tmp_path):
    config = make_config(steps=2, checkpoint_every=0)
    config.optimizer.frozen = ("^encoder/",)
    config.optimizer.groups = {"head": {"pattern": "^head/kernel", "lr_scale": 2.0}}
    with trainer.Trainer(config, workdir=str(tmp_path), init_fn=init_fn, loss_fn=loss_fn,
                         mesh=single_device_mesh()) as t:
        start = jax.device_get(t.init_params())
        state = jax.device_get(t.fit(Data(), state=t.init_state()))
    assert params_bytes(state.params["encoder"]) == params_bytes(start["encoder"])
    assert params_bytes(state.params["head"]) != params_bytes(start["head"])


def test_initial_params_are_checked_and_used(tmp_path, params0):
    config = make_config(steps=1, checkpoint_every=0)
    with trainer.Trainer(config, workdir=str(tmp_path), init_fn=init_fn, loss_fn=loss_fn,
                         mesh=single_device_mesh()) as t:
        given = jax.tree.map(lambda x: np.asarray(x, np.float64) + 1.0, params0)  # cast to float32 on the way in
        state = t.init_state(lambda: given)
        assert params_bytes(state.params) == params_bytes(jax.tree.map(lambda x: x.astype(np.float32), given))
        bad = jax.tree.map(np.asarray, params0)
        bad["head"]["kernel"] = np.zeros((3, 3), np.float32)
        with pytest.raises(ValueError, match="'head/kernel' has shape"):
            t.init_state(bad)
        del bad["head"]
        with pytest.raises(ValueError, match="lack parameter 'head/bias'"):
            t.init_state(bad)
        with pytest.raises(ValueError, match="batch feature 'x' has shape"):
            t.train_step(state, make_batch(0, size=3))


def test_host_batch_slice_single_process():
    assert distributed.host_batch_slice(8) == slice(0, 8)
    batch = distributed.make_global_batch(make_batch(0), partitioning.create_mesh(4, 2))
    assert batch["x"].shape == (BATCH, D_IN) and batch["x"].sharding.spec == jax.sharding.PartitionSpec("data", None)


def test_optimizer_state_shardings_follow_parameters():
    """Adam moments get their parameter's sharding; Adafactor's factored row/column statistics are replicated."""
    from tagi_jax.trainer import train_state

    mesh, rules = partitioning.create_mesh(4, 2), partitioning.logical_axis_rules(True)
    abstract, _ = partitioning.abstract_with_shardings(init_fn, mesh, rules, jax.random.key(0))
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    labels = optim.parameter_labels(abstract, frozen=("^head/bias",))
    for name in ("adamw", "adafactor"):
        cfg = optim.default_config()
        cfg.name = name
        cfg.adafactor.min_dim_size_to_factor = 4
        tx, _ = optim.make_optimizer(cfg, labels, total_steps=10)
        opt_shardings = train_state.opt_state_shardings(tx, abstract, shardings, partitioning.replicated(mesh))
        params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype, device=x.sharding), abstract)
        opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
        specs = {optim.path_to_str(p): (x.shape, x.sharding.spec)
                 for p, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]}
        kernel_spec = jax.sharding.PartitionSpec("data", "model")
        if name == "adamw":
            mu = [v for k, v in specs.items() if k.endswith("mu/encoder/kernel")]
            assert mu == [((D_IN, HIDDEN), kernel_spec)]
            assert not any("head/bias" in k for k in specs)  # frozen: no state
        else:
            factored = [v for k, v in specs.items() if "encoder/kernel" in k and len(v[0]) == 1]
            assert factored and all(spec == jax.sharding.PartitionSpec() for _, spec in factored)


def test_parameters_must_be_float32():
    from tagi_jax.trainer import train_state

    with pytest.raises(ValueError, match="parameter 'head/kernel' has dtype bfloat16"):
        train_state.check_float32({"head": {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.bfloat16)}})
