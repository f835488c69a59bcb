"""Losses against independent references (numpy brute force, torch), plus the bugs they must not have."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from tagi_jax import losses

# Jitted once per module (eager op-by-op dispatch is slow on a shared CPU).
cross_entropy = jax.jit(losses.cross_entropy, static_argnames=("z_loss", "label_smoothing"))
distillation_kl = jax.jit(losses.distillation_kl)
adapter_alignment = jax.jit(losses.adapter_alignment, static_argnames=("mode",))


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    b, n, v = 3, 5, 11
    targets = rng.integers(1, v, size=(b, n))
    weights = np.ones((b, n), np.float32)
    weights[0, 3:] = 0
    weights[2, 1:] = 0
    targets = np.where(weights > 0, targets, 0)
    return dict(
        student=rng.normal(size=(b, n, v)).astype(np.float32) * 2,
        teacher=rng.normal(size=(b, n, v)).astype(np.float32) * 2,
        targets=targets,
        weights=weights,
    )


# ---------------------------------------------------------------- cross-entropy
@pytest.mark.parametrize("z_loss,smoothing", [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1), (1e-3, 0.2)])
def test_cross_entropy_matches_brute_force(batch, z_loss, smoothing):
    logits, targets, weights = batch["student"], batch["targets"], batch["weights"]
    loss, z_term, num = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights),
                                             z_loss=z_loss, label_smoothing=smoothing)
    v = logits.shape[-1]
    logp = _np_log_softmax(logits.astype(np.float64))
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    soft = np.full(logits.shape, smoothing / (v - 1))
    np.put_along_axis(soft, targets[..., None], 1 - smoothing, axis=-1)
    xent = -(soft * logp).sum(-1)
    if smoothing:  # subtract the entropy of the smoothed target: a perfect prediction scores 0
        xent -= -(soft * np.log(soft)).sum(-1)
    m = weights > 0
    want_z = z_loss * (log_z[m] ** 2).mean()
    np.testing.assert_allclose(z_term, want_z, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(loss, xent[m].mean() + want_z, rtol=1e-5)
    assert float(num) == m.sum()


def test_cross_entropy_against_torch_and_padding(batch):
    logits, targets, weights = batch["student"], batch["targets"], batch["weights"]
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits).reshape(-1, logits.shape[-1]),
        torch.tensor(np.where(weights > 0, targets, -100)).reshape(-1), ignore_index=-100)
    loss, _, _ = cross_entropy(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    # Default weights come from the targets (0 = padding).
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets))[0], loss, rtol=1e-6)


# ---------------------------------------------------------------- distillation KL
def _torch_kl(student, teacher, weights, t):
    s = torch.log_softmax(torch.tensor(student, dtype=torch.float64) / t, -1)
    q = torch.log_softmax(torch.tensor(teacher, dtype=torch.float64) / t, -1)
    per_tok = torch.nn.functional.kl_div(s, q, log_target=True, reduction="none").sum(-1).numpy()
    return t * t * per_tok[weights > 0].mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kl_matches_torch(batch, temperature):
    got = distillation_kl(jnp.asarray(batch["student"]), jnp.asarray(batch["teacher"]),
                                 jnp.asarray(batch["weights"]), temperature)
    want = _torch_kl(batch["student"], batch["teacher"], batch["weights"], temperature)
    # A brute-force numpy KL too.
    p = np.exp(_np_log_softmax(batch["teacher"].astype(np.float64) / temperature))
    logq = _np_log_softmax(batch["student"].astype(np.float64) / temperature)
    brute = temperature ** 2 * (p * (np.log(p) - logq)).sum(-1)[batch["weights"] > 0].mean()
    np.testing.assert_allclose(want, brute, rtol=1e-10)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert float(got) > 0.05  # differing distributions: clearly positive, never silently zero


def test_kl_zero_iff_equal(batch):
    s, w = jnp.asarray(batch["student"]), jnp.asarray(batch["weights"])
    assert abs(float(distillation_kl(s, s, w, 2.0))) < 1e-6
    # Same distribution with shifted logits: still zero.
    assert abs(float(distillation_kl(s, s + 3.0, w, 2.0))) < 1e-5
    # A change at one real position makes it positive.
    t = s.at[1, 2, 4].add(1.0)
    assert float(distillation_kl(s, t, w, 1.0)) > 1e-4


def test_kl_ignores_padding(batch):
    s, t, w = (jnp.asarray(batch[k]) for k in ("student", "teacher", "weights"))
    base = distillation_kl(s, t, w, 2.0)
    # Appending padded positions (and a padded example) with wild logits, even inf/NaN, changes nothing.
    rng = np.random.default_rng(1)
    b, n, v = s.shape
    wild_s = rng.normal(size=(b + 1, n + 4, v)).astype(np.float32) * 50
    wild_t = rng.normal(size=(b + 1, n + 4, v)).astype(np.float32) * 50
    wild_s[-1, 0, 0], wild_t[-1, 1, 1] = np.nan, np.inf
    wild_s[:b, :n], wild_t[:b, :n] = batch["student"], batch["teacher"]
    wide_w = np.zeros((b + 1, n + 4), np.float32)
    wide_w[:b, :n] = batch["weights"]
    padded = distillation_kl(jnp.asarray(wild_s), jnp.asarray(wild_t), jnp.asarray(wide_w), 2.0)
    np.testing.assert_allclose(padded, base, rtol=1e-6)
    # Changing a padded position inside the original shape does not matter either.
    s2 = s.at[0, 4].set(100.0)
    np.testing.assert_allclose(distillation_kl(s2, t, w, 2.0), base, rtol=1e-6)
    # Gradient: zero on padded positions, finite everywhere, teacher gets none.
    gs, gt = jax.jit(jax.grad(losses.distillation_kl, argnums=(0, 1)))(jnp.asarray(wild_s), jnp.asarray(wild_t),
                                                              jnp.asarray(wide_w), 2.0)
    gs = np.asarray(gs)
    assert np.all(np.isfinite(gs)) and not np.any(gs[wide_w == 0])
    assert np.any(gs[wide_w > 0])
    assert not np.any(np.asarray(gt))


# ---------------------------------------------------------------- adapter alignment
def _random_adapters(rng, targets, batch=3, layers=2, rank=4, dims=((6, 5), (7, 4)), scale=0.5, shared=False):
    out = {}
    for target, (d_in, d_out) in zip(targets, dims):
        lead = (layers,) if shared else (batch, layers)
        out[target] = {"A": rng.normal(size=lead + (d_in, rank)).astype(np.float32),
                       "B": rng.normal(size=lead + (rank, d_out)).astype(np.float32),
                       "scale": np.float32(scale)}
    return out


def _brute_delta(gen, teacher):
    total = 0.0
    for target in gen:
        g, t = gen[target], teacher[target]
        dg = g["scale"] * np.einsum("...dr,...ro->...do", g["A"].astype(np.float64), g["B"].astype(np.float64))
        dt = t["scale"] * np.einsum("...dr,...ro->...do", t["A"].astype(np.float64), t["B"].astype(np.float64))
        dg, dt = np.broadcast_arrays(dg, dt)
        total += ((dg - dt) ** 2).sum(axis=(-3, -2, -1)).mean()  # sum layers, mean batch
    return total


TARGETS = ("encoder_self.q", "decoder_cross.v")


def test_alignment_equals_brute_force_matrix_norm():
    rng = np.random.default_rng(0)
    gen = _random_adapters(rng, TARGETS, rank=4, scale=0.5)
    teacher = _random_adapters(rng, TARGETS, rank=3, scale=2.0)  # ranks may differ
    got = adapter_alignment(jax.tree.map(jnp.asarray, gen), jax.tree.map(jnp.asarray, teacher))
    np.testing.assert_allclose(got, _brute_delta(gen, teacher), rtol=1e-5)
    # A shared (batch-less) teacher broadcasts over the batch.
    shared = _random_adapters(rng, TARGETS, rank=3, scale=2.0, shared=True)
    got = adapter_alignment(jax.tree.map(jnp.asarray, gen), jax.tree.map(jnp.asarray, shared))
    np.testing.assert_allclose(got, _brute_delta(gen, shared), rtol=1e-5)
    # Zero against itself.
    assert float(adapter_alignment(gen, gen)) < 1e-3 * _brute_delta(gen, teacher)


def _full_deltas(g, t):
    """(ΔW_g, ΔW_t) = scale·A·B as full float64 matrices [batch, layers, d_in, d_out], broadcast together."""
    dg = g["scale"] * np.einsum("...dr,...ro->...do", g["A"].astype(np.float64), g["B"].astype(np.float64))
    dt = t["scale"] * np.einsum("...dr,...ro->...do", t["A"].astype(np.float64), t["B"].astype(np.float64))
    return np.broadcast_arrays(dg, dt)


def _brute_per_target(gen, teacher):
    """{target: (‖ΔW_g − ΔW_t‖² [batch], ‖ΔW_t‖² [batch], layers·d_in·d_out)} in float64, from full matrices."""
    out = {}
    for target in gen:
        dg, dt = _full_deltas(gen[target], teacher[target])
        out[target] = (((dg - dt) ** 2).sum(axis=(-3, -2, -1)), (dt ** 2).sum(axis=(-3, -2, -1)), dg[0].size)
    return out


def _brute_relative(gen, teacher):
    """{target: batch mean of Σ_layers ‖ΔW_g − ΔW_t‖² / ‖ΔW_t‖²}, per layer from full float64 matrices."""
    out = {}
    for target in gen:
        dg, dt = _full_deltas(gen[target], teacher[target])
        out[target] = (((dg - dt) ** 2).sum(axis=(-2, -1)) / (dt ** 2).sum(axis=(-2, -1))).sum(axis=-1).mean()
    return out


def test_each_alignment_reduction_against_full_matrices():
    rng = np.random.default_rng(4)
    gen = _random_adapters(rng, TARGETS, rank=4, scale=0.5)
    teacher = _random_adapters(rng, TARGETS, rank=3, scale=2.0)
    parts = _brute_per_target(gen, teacher)
    jgen, jteacher = jax.tree.map(jnp.asarray, gen), jax.tree.map(jnp.asarray, teacher)
    expected = {
        "sum": sum(d.mean() for d, _, _ in parts.values()),
        "mean": sum(d.mean() / n for d, _, n in parts.values()),
        "relative": sum(v for v in _brute_relative(gen, teacher).values()),
    }
    for reduction, value in expected.items():
        got = losses.alignment_loss(jgen, jteacher, "delta", reduction)
        np.testing.assert_allclose(got, value, rtol=1e-5, err_msg=reduction)
    # "relative" counts the adapted matrices (2 targets x 2 layers) when nothing is generated (B = 0), whatever
    # the sizes and the teacher's scale.
    nothing = {k: {**v, "B": np.zeros_like(v["B"])} for k, v in gen.items()}
    assert float(losses.alignment_loss(nothing, jteacher, "delta", "relative")) == pytest.approx(4.0, rel=1e-5)
    bigger = {k: {**v, "scale": np.float32(100.0)} for k, v in teacher.items()}
    assert float(losses.alignment_loss(nothing, bigger, "delta", "relative")) == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ValueError, match="alignment_reduction"):
        losses.alignment_loss(jgen, jteacher, "delta", "median")


def test_alignment_invariant_to_refactorisation():
    rng = np.random.default_rng(1)
    gen = _random_adapters(rng, TARGETS)
    teacher = _random_adapters(rng, TARGETS)
    base = adapter_alignment(gen, teacher)
    moved = {}
    for target, e in gen.items():
        g = rng.normal(size=(4, 4)) + 3 * np.eye(4)  # well-conditioned, invertible
        moved[target] = {"A": (e["A"] @ g).astype(np.float32),
                         "B": (np.linalg.inv(g) @ e["B"]).astype(np.float32), "scale": e["scale"]}
    np.testing.assert_allclose(adapter_alignment(moved, teacher), base, rtol=1e-4)
    # ... whereas factor-wise MSE is not invariant.
    assert abs(float(adapter_alignment(moved, teacher, "factor"))
               - float(adapter_alignment(gen, teacher, "factor"))) > 1e-2


def test_factor_mode_and_errors():
    rng = np.random.default_rng(2)
    gen = _random_adapters(rng, TARGETS)
    teacher = _random_adapters(rng, TARGETS)
    want = sum(((gen[t]["A"] - teacher[t]["A"]) ** 2).mean() + ((gen[t]["B"] - teacher[t]["B"]) ** 2).mean()
               for t in TARGETS)
    np.testing.assert_allclose(adapter_alignment(gen, teacher, mode="factor"), want, rtol=1e-5)
    with pytest.raises(ValueError, match="equal ranks"):
        adapter_alignment(gen, _random_adapters(rng, TARGETS, rank=2), mode="factor")
    with pytest.raises(ValueError, match="differ in targets"):
        adapter_alignment(gen, {TARGETS[0]: teacher[TARGETS[0]]})
    with pytest.raises(ValueError, match="unknown mode"):
        adapter_alignment(gen, teacher, mode="cosine")


def test_alignment_gradients_reach_generated_not_teacher():
    rng = np.random.default_rng(3)
    gen = jax.tree.map(jnp.asarray, _random_adapters(rng, TARGETS))
    teacher = jax.tree.map(jnp.asarray, _random_adapters(rng, TARGETS))
    g_gen, g_teacher = jax.jit(jax.grad(losses.adapter_alignment, argnums=(0, 1)))(gen, teacher)
    assert all(np.any(np.asarray(g_gen[t][k])) for t in TARGETS for k in ("A", "B"))
    assert not any(np.any(np.asarray(x)) for x in jax.tree.leaves(g_teacher))


def test_delta_norms_match_brute_force():
    rng = np.random.default_rng(4)
    gen = _random_adapters(rng, TARGETS, scale=0.7)
    got = jax.jit(losses.adapter_delta_norms)(gen)
    for target, e in gen.items():
        dw = e["scale"] * np.einsum("bldr,blro->bldo", e["A"].astype(np.float64), e["B"].astype(np.float64))
        want = np.sqrt((dw ** 2).sum(axis=(1, 2, 3))).mean()
        np.testing.assert_allclose(got[target], want, rtol=1e-5)


# ---------------------------------------------------------------- total
def test_total_loss_terms_and_sigmoid_weight():
    ce, kl, l_ins = jnp.float32(2.0), jnp.float32(0.3), jnp.float32(1.5)
    total, terms = losses.total_loss(ce, kl, l_ins)
    sig = 1 / (1 + np.exp(-1.5))
    np.testing.assert_allclose(total, 2.0 + 5.0 * 0.3 + sig * 1.5, rtol=1e-6)
    for key in ("cross_entropy", "kl", "l_ins", "lambda_ins", "lambda_kl", "total"):
        assert key in terms
    np.testing.assert_allclose(terms["lambda_ins"], sig, rtol=1e-6)
    # λ2 = sigmoid(L_ins) is a stop-gradient weight: d total / d L_ins == sigmoid(L_ins).
    grad = jax.grad(lambda x: losses.total_loss(ce, kl, x)[0])(l_ins)
    np.testing.assert_allclose(grad, sig, rtol=1e-6)
    # Constant weights and missing terms (baselines).
    total, terms = losses.total_loss(ce, kl, l_ins, lambda_kl=1.0, lambda_ins=0.25)
    np.testing.assert_allclose(total, 2.0 + 0.3 + 0.25 * 1.5, rtol=1e-6)
    total, terms = losses.total_loss(ce)
    assert float(total) == 2.0 and set(terms) == {"cross_entropy", "total"}
    with pytest.raises(ValueError, match="lambda_ins"):
        losses.total_loss(ce, kl, l_ins, lambda_ins="softplus")

