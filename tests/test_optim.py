"""Schedules, parameter labels, freezing and learning-rate groups (tagi_jax/optim.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.trainer import optim, train_state
from tagi_jax.config import ConfigError


def _opt_cfg(**overrides):
    cfg = optim.default_config()
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _params():
    rng = np.random.default_rng(0)
    params = {
        "t5": {"encoder": {"kernel": rng.normal(size=(4, 3)).astype(np.float32)},
               "norm": {"scale": rng.normal(size=(3,)).astype(np.float32)}},
        "hypernet": {"proj": {"kernel": rng.normal(size=(3, 2)).astype(np.float32)}},
        "head": {"kernel": rng.normal(size=(2, 2)).astype(np.float32)},
    }
    params["t5"]["encoder"]["kernel"][0, 0] = -0.0  # p + 0.0 would turn this into +0.0
    return jax.tree.map(jnp.asarray, params)


def _grads(params, seed=1):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)


# --------------------------------------------------------------------------------------------------
# Schedules: values at chosen steps against hand computation (lr 0.1, warmup 4, decay over 20 steps)
# --------------------------------------------------------------------------------------------------

HAND = {
    # step: value
    "constant": {0: 0.0, 1: 0.025, 3: 0.075, 4: 0.1, 19: 0.1, 100: 0.1},
    # linear: 0.1 * (20 - s) / 16 after warmup
    "linear": {0: 0.0, 2: 0.05, 4: 0.1, 12: 0.05, 18: 0.0125, 20: 0.0, 30: 0.0},
    # rsqrt: 0.1 * sqrt(4 / s) after warmup
    "rsqrt": {2: 0.05, 4: 0.1, 16: 0.05, 64: 0.025},
    # cosine: 0.1 * 0.5 * (1 + cos(pi * (s - 4) / 16))
    "cosine": {2: 0.05, 4: 0.1, 12: 0.05, 20: 0.0, 8: 0.05 * (1 + np.sqrt(0.5))},
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_schedule_values_match_hand_computation(name):
    schedule = optim.learning_rate_schedule(name, 0.1, warmup_steps=4, decay_steps=20)
    for step, expected in HAND[name].items():
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-7), (name, step)


def test_schedule_without_warmup_starts_at_peak():
    assert float(optim.learning_rate_schedule("constant", 0.3, 0, 10)(0)) == pytest.approx(0.3)
    assert float(optim.learning_rate_schedule("rsqrt", 0.3, 0, 10)(4)) == pytest.approx(0.15)


def test_unknown_schedule_is_named():
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        optim.learning_rate_schedule("cosine_restarts", 0.1, 0, 10)


def test_adamw_with_warmup_and_clipping_matches_torch():
    """Independent reference: torch.optim.AdamW + HF's linear warmup/decay lambda + clip_grad_norm_."""
    torch = pytest.importorskip("torch")
    lr, warmup, total, wd, clip = 0.01, 2, 6, 0.1, 1.0
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32))}
    grads_per_step = [_grads(params, seed=s) for s in range(4)]

    cfg = _opt_cfg(learning_rate=lr, warmup_steps=warmup, schedule="linear", weight_decay=wd, clip_norm=clip)
    labels = optim.parameter_labels(params)
    tx, _ = optim.make_optimizer(cfg, labels, total_steps=total)
    state = train_state.TrainState.create(params, tx)
    for g in grads_per_step:
        state = state.apply_gradients(g, tx)

    w = torch.nn.Parameter(torch.tensor(np.asarray(params["w"])))
    opt = torch.optim.AdamW([w], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    hf_lambda = lambda s: s / warmup if s < warmup else max(0.0, (total - s) / (total - warmup))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, hf_lambda)
    for g in grads_per_step:
        w.grad = torch.tensor(np.asarray(g["w"]))
        torch.nn.utils.clip_grad_norm_([w], clip)
        opt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(state.params["w"]), w.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert int(state.step) == 4


# --------------------------------------------------------------------------------------------------
# Labels, freezing, groups
# --------------------------------------------------------------------------------------------------


def test_labels_frozen_wins_over_groups_and_default_elsewhere():
    labels = optim.parameter_labels(
        _params(), frozen=("^t5/",), groups={"hyper": {"pattern": "^hypernet/|encoder", "lr_scale": 10.0}}
    )
    assert labels == {
        "t5": {"encoder": {"kernel": "frozen"}, "norm": {"scale": "frozen"}},
        "hypernet": {"proj": {"kernel": "hyper"}},
        "head": {"kernel": "default"},
    }
    assert optim.trainable_mask(labels)["t5"]["norm"]["scale"] is False


@pytest.mark.parametrize(
    "frozen, groups, key",
    [
        (("^t5/", "^decoder/"), {}, "optimizer.frozen[1]"),
        ((), {"a": {"pattern": "^nothing"}}, "optimizer.groups.a.pattern"),
        ((), {"a": {"pattern": "kernel"}, "b": {"pattern": "^head/"}}, "optimizer.groups.a.pattern"),
        ((), {"frozen": {"pattern": "^head/"}}, "optimizer.groups.frozen"),
        (("[unclosed",), {}, "optimizer.frozen[0]"),
    ],
)
def test_label_errors_name_the_key(frozen, groups, key):
    with pytest.raises(ConfigError, match=key.replace("[", r"\[").replace("]", r"\]")):
        optim.parameter_labels(_params(), frozen=frozen, groups=groups)


def _one_update(cfg, params, grads):
    labels = optim.parameter_labels(params, tuple(cfg.frozen), cfg.groups)
    tx, _ = optim.make_optimizer(cfg, labels, total_steps=10)
    state = train_state.TrainState.create(params, tx)
    new = state.apply_gradients(grads, tx, optim.trainable_mask(labels))
    return state, new


def test_frozen_params_are_bit_identical_and_have_no_optimizer_state():
    params, grads = _params(), _grads(_params())
    cfg = _opt_cfg(frozen=("^t5/",), weight_decay=0.1)
    state, new = _one_update(cfg, params, grads)
    for _ in range(2):
        new = new.apply_gradients(grads, *_tx_and_mask(cfg, params))
    for a, b in zip(jax.tree.leaves(params["t5"]), jax.tree.leaves(new.params["t5"])):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert np.signbit(np.asarray(new.params["t5"]["encoder"]["kernel"])[0, 0])  # still -0.0
    assert not np.allclose(new.params["head"]["kernel"], params["head"]["kernel"])
    # Adam's mu/nu exist only for the trainable parameters.
    state_size = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    trainable_size = params["hypernet"]["proj"]["kernel"].size + params["head"]["kernel"].size
    assert state_size == 2 * trainable_size


def _tx_and_mask(cfg, params):
    labels = optim.parameter_labels(params, tuple(cfg.frozen), cfg.groups)
    tx, _ = optim.make_optimizer(cfg, labels, total_steps=10)
    return tx, optim.trainable_mask(labels)


def test_frozen_gradients_do_not_count_in_clipping():
    params = _params()
    grads = _grads(params)
    grads["t5"] = jax.tree.map(lambda g: 1e8 * g, grads["t5"])  # huge frozen gradient
    cfg_frozen = _opt_cfg(frozen=("^t5/",), clip_norm=1.0)
    _, with_frozen = _one_update(cfg_frozen, params, grads)
    # Same update as a model that has no t5 parameters at all.
    small = {k: v for k, v in params.items() if k != "t5"}
    small_grads = {k: v for k, v in grads.items() if k != "t5"}
    _, alone = _one_update(_opt_cfg(clip_norm=1.0), small, small_grads)
    for k in small:
        for a, b in zip(jax.tree.leaves(with_frozen.params[k]), jax.tree.leaves(alone.params[k])):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_lr_scale_group_gets_scaled_updates():
    params, grads = _params(), _grads(_params())
    base_cfg = _opt_cfg(learning_rate=1e-3, clip_norm=0.0)
    group_cfg = _opt_cfg(learning_rate=1e-3, clip_norm=0.0)
    group_cfg.groups = {"hyper": {"pattern": "^hypernet/", "lr_scale": 10.0}}
    _, base = _one_update(base_cfg, params, grads)
    _, grouped = _one_update(group_cfg, params, grads)
    delta = lambda new, path: np.asarray(new.params[path[0]][path[1]][path[2]]) - np.asarray(  # noqa: E731
        params[path[0]][path[1]][path[2]])
    hyper = ("hypernet", "proj", "kernel")
    np.testing.assert_allclose(delta(grouped, hyper), 10.0 * delta(base, hyper), rtol=1e-4)
    assert np.abs(delta(base, hyper)).max() > 1e-4
    enc = ("t5", "encoder", "kernel")
    np.testing.assert_array_equal(delta(grouped, enc), delta(base, enc))


def test_weight_decay_exclude():
    params = _params()
    zero = jax.tree.map(jnp.zeros_like, params)
    cfg = _opt_cfg(weight_decay=0.5, learning_rate=0.1, clip_norm=0.0, weight_decay_exclude=("norm/",))
    _, new = _one_update(cfg, params, zero)
    np.testing.assert_array_equal(new.params["t5"]["norm"]["scale"], params["t5"]["norm"]["scale"])
    np.testing.assert_allclose(new.params["head"]["kernel"], params["head"]["kernel"] * (1 - 0.1 * 0.5), rtol=1e-6)


def test_adafactor_builds_and_updates():
    params = {"w": jnp.ones((256, 130), jnp.float32), "b": jnp.ones((3,), jnp.float32)}
    cfg = _opt_cfg(name="adafactor", learning_rate=0.01)
    _, new = _one_update(cfg, params, _grads(params))
    assert not np.allclose(new.params["w"], params["w"])
    # Factored second moments: a row and a column vector, not a matrix.
    shapes = {x.shape for x in jax.tree.leaves(new.opt_state)}
    assert (256,) in shapes and (130,) in shapes and (256, 130) not in shapes


@pytest.mark.parametrize(
    "field, value, key",
    [
        ("name", "sgd", "optimizer.name"),
        ("schedule", "exponential", "optimizer.schedule"),
        ("learning_rate", 0.0, "optimizer.learning_rate"),
        ("warmup_steps", 10, "optimizer.warmup_steps"),
        ("groups", {"g": {"pattern": "x", "lr_scale": -1.0}}, "optimizer.groups.g.lr_scale"),
        ("groups", {"g": {"pattern": "x", "lr": 2.0}}, "optimizer.groups.g.lr"),
        ("frozen", ("(",), r"optimizer.frozen\[0\]"),
    ],
)
def test_validate_config_names_the_key(field, value, key):
    cfg = _opt_cfg(schedule="linear")
    cfg[field] = value
    with pytest.raises(ConfigError, match=key):
        optim.validate_config(cfg, total_steps=10)
