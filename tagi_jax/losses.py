"""TAGI's training objective as pure functions: cross-entropy, distillation KL, adapter alignment, total.

Every function takes arrays (or adapters pytrees, see `tagi_jax.models.lora`) and returns scalars;
nothing here knows about parameters, so the trainer composes them inside one jitted step.

Normalisation, stated once:
* `cross_entropy` and `distillation_kl` average over *real* target tokens (weight > 0); padded positions
  contribute nothing and never change the value, whatever logits they carry.
* `adapter_alignment` sums over targets and layers and averages over the batch (one term per example).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Adapters = Mapping[str, Mapping[str, Any]]


def _safe_denominator(x: jax.Array) -> jax.Array:
    """Avoid 0/0 on a batch without real tokens: the sum it divides is then 0 too."""
    return jnp.where(x > 0, x, 1.0)


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    weights: jax.Array | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """T5X-style token cross-entropy, averaged over real target tokens.

    Args:
      logits: [batch, len, vocab]; targets: [batch, len] int ids; weights: [batch, len] (0 = padding;
        default: targets > 0).
      z_loss: coefficient of T5X's auxiliary `z_loss·log²(Z)` (keeps the softmax normaliser near 1).
      label_smoothing: T5X's smoothing: mass `1 - ls` on the target, `ls / (vocab - 1)` on the rest, with the
        minimal achievable value subtracted so a perfect prediction scores 0.

    Returns:
      (loss, z_loss_term, num_tokens): `loss` includes the z-loss term (as T5X does), `z_loss_term` is
      that term alone (for logging), `num_tokens` the sum of weights.
    """
    if weights is None:
        weights = (targets > 0).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab - 1) if vocab > 1 else 0.0
    normalizing_constant = -(
        confidence * jnp.log(confidence)
        + (vocab - 1) * low_confidence * jnp.log(low_confidence + 1e-20)
    ) if label_smoothing > 0 else 0.0
    soft_targets = jax.nn.one_hot(targets, vocab) * (confidence - low_confidence) + low_confidence

    log_z = jax.nn.logsumexp(logits, axis=-1)
    log_probs = logits - log_z[..., None]
    token_xent = -jnp.sum(soft_targets * log_probs, axis=-1) - normalizing_constant
    token_z = z_loss * jnp.square(log_z)

    real = weights > 0
    num_tokens = jnp.sum(weights)
    denom = _safe_denominator(num_tokens)
    z_term = jnp.sum(jnp.where(real, token_z * weights, 0.0)) / denom
    xent = jnp.sum(jnp.where(real, token_xent * weights, 0.0)) / denom
    return xent + z_term, z_term, num_tokens


def distillation_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    weights: jax.Array,
    temperature: float = 1.0,
) -> jax.Array:
    """KL(teacher ‖ student) of the softened distributions, times T², averaged over real target positions.

    `T²` keeps the gradient magnitude independent of the temperature (Hinton et al., 2015). The teacher is a
    fixed target: its logits are `stop_gradient`-ed, so this term never trains the teacher (stage 2 keeps
    teachers frozen anyway; the stop makes the loss correct whatever the optimiser's freezing says).

    Padded positions (weight 0) are excluded with `where`, not multiplied by 0, so even NaN/inf logits
    there cannot leak into the value or its gradient. Unlike the original implementation, the term is always
    on (no flag can make it silently zero).
    """
    t = jnp.asarray(temperature, jnp.float32)
    weights = weights.astype(jnp.float32)
    real = weights > 0
    # Sanitise padded rows *before* any arithmetic, so their value and gradient are exactly 0 (never NaN).
    student = jnp.where(real[..., None], student_logits.astype(jnp.float32), 0.0)
    teacher = jnp.where(real[..., None], jax.lax.stop_gradient(teacher_logits).astype(jnp.float32), 0.0)
    s_log = jax.nn.log_softmax(student / t, axis=-1)
    t_log = jax.nn.log_softmax(teacher / t, axis=-1)
    t_prob = jnp.exp(t_log)
    # 0·log 0 = 0 for teacher tokens of probability exactly 0 (e.g. -inf logits); a NaN teacher stays NaN (loud).
    per_token = jnp.sum(jnp.where(t_prob == 0, 0.0, t_prob * (t_log - s_log)), axis=-1)
    per_token = jnp.where(real, per_token * weights, 0.0)
    return jnp.square(t) * jnp.sum(per_token) / _safe_denominator(jnp.sum(weights))


def _gram_trace(a1, b1, a2, b2) -> jax.Array:
    """<A1·B1, A2·B2>_F = tr((A1ᵀA2)(B2B1ᵀ)) with r×r products only: [..., d_in, r] x [..., r, d_out]."""
    left = jnp.einsum("...dr,...ds->...rs", a1, a2)   # A1ᵀA2: [r1, r2]
    right = jnp.einsum("...so,...ro->...sr", b2, b1)  # B2B1ᵀ: [r2, r1]
    return jnp.einsum("...rs,...sr->...", left, right)


def _with_batch(x: jax.Array, rank_of_batched: int) -> jax.Array:
    """Add a leading batch axis to a shared factor ([layers, d, r] -> [1, layers, d, r])."""
    return x if x.ndim == rank_of_batched else x[None]


def _check_targets(generated: Adapters, teacher: Adapters) -> None:
    if set(generated) != set(teacher):
        raise ValueError(
            "adapter_alignment: generated and teacher adapters differ in targets: "
            f"generated {sorted(generated)} vs teacher {sorted(teacher)}"
        )


def adapter_alignment(generated: Adapters, teacher: Adapters, mode: str = "delta") -> jax.Array:
    """L_ins: how far the generated adapters are from the task's teacher adapters.

    mode="delta" (default): compares the *updates* ΔW = scale·A·B as matrices,
    ‖ΔW_gen − ΔW_teacher‖²_F = ‖P‖² + ‖Q‖² − 2⟨P, Q⟩ with ‖P‖² = tr((AᵀA)(BBᵀ)) and
    ⟨P, Q⟩ = tr((A_pᵀA_q)(B_qB_pᵀ)): only r×r products, never a d_in×d_out matrix. It is invariant to
    re-factorisations (A·G, G⁻¹·B), so it does not penalise a generator for choosing another basis of the
    same update (comparing factors does, and the original code even compared A with the teacher's B).
    Ranks of the two sides may differ. Summed over targets and layers, averaged over the batch; shared
    (batch-less) factors broadcast. The squared difference is clamped at 0 against float round-off.

    mode="factor": mean squared error between factors (A vs A, B vs B, each averaged over its elements and
    summed over targets), for faithfulness studies; requires equal shapes.

    The teacher side is a fixed target (`stop_gradient`).
    """
    _check_targets(generated, teacher)
    teacher = jax.tree.map(jax.lax.stop_gradient, teacher)
    total = jnp.zeros((), jnp.float32)
    for target in sorted(generated):
        g, t = generated[target], teacher[target]
        ga, gb = g["A"].astype(jnp.float32), g["B"].astype(jnp.float32)
        ta, tb = t["A"].astype(jnp.float32), t["B"].astype(jnp.float32)
        if mode == "factor":
            if ga.shape[-3:] != ta.shape[-3:] or gb.shape[-3:] != tb.shape[-3:]:
                raise ValueError(
                    f"adapter_alignment(mode='factor'): target {target!r} has generated factors "
                    f"{ga.shape}/{gb.shape} but teacher factors {ta.shape}/{tb.shape}; factor-wise MSE "
                    "needs equal ranks and shapes (use mode='delta')"
                )
            total = total + jnp.mean(jnp.square(ga - ta)) + jnp.mean(jnp.square(gb - tb))
            continue
        if mode != "delta":
            raise ValueError(f"adapter_alignment: unknown mode {mode!r} (expected 'delta' or 'factor')")
        sq, _ = _delta_distance(g, t)
        total = total + jnp.mean(jnp.sum(sq, axis=-1))
    return total


def _delta_distance(g: Mapping[str, Any], t: Mapping[str, Any]) -> tuple[jax.Array, jax.Array]:
    """(‖ΔW_gen − ΔW_teacher‖²_F, ‖ΔW_teacher‖²_F), each [batch, layers], from r×r products only."""
    ga, gb, ta, tb = (_with_batch(x.astype(jnp.float32), 4) for x in (g["A"], g["B"], t["A"], t["B"]))
    gs = jnp.asarray(g.get("scale", 1.0), jnp.float32)
    ts = jnp.asarray(t.get("scale", 1.0), jnp.float32)
    teacher_sq = ts * ts * _gram_trace(ta, tb, ta, tb)
    sq = gs * gs * _gram_trace(ga, gb, ga, gb) + teacher_sq - 2.0 * gs * ts * _gram_trace(ga, gb, ta, tb)
    return jnp.maximum(sq, 0.0), jnp.maximum(teacher_sq, 0.0)


ALIGNMENT_REDUCTIONS = ("relative", "mean", "sum")


def alignment_loss(generated: Adapters, teacher: Adapters, mode: str = "delta", reduction: str = "mean") -> jax.Array:
    """L_ins with a reduction (`loss.alignment_reduction`):

    * "relative": the relative error ‖ΔW_gen − ΔW_teacher‖² / ‖ΔW_teacher‖² of every adapted matrix (target and
      layer), summed over them and averaged over the batch: the number of adapted matrices whose update the
      generator misses, 0 when it matches all. Scale-free in d_model and rank (each term is a ratio); it grows
      with the number of adapted matrices, as the CE gradient that reaches the generator does, which keeps the
      two gradients within an order or two of each other at every size (tests/test_losses.py measures it at
      T5-Base shapes). A matrix whose teacher update is exactly zero counts its absolute distance.
    * "mean": each target's squared distance divided by its layers·d_in·d_out (a per-element MSE), summed over
      targets: about 2e-4 at T5-Base, too small to act.
    * "sum": `adapter_alignment` itself, the summed squared Frobenius norm: about 1e3 at T5-Base, dominant.
    Factor-wise MSE (mode="factor") is a mean already.
    """
    if reduction not in ALIGNMENT_REDUCTIONS:
        raise ValueError(f"loss.alignment_reduction: {reduction!r} is not one of {ALIGNMENT_REDUCTIONS}")
    if reduction == "sum" or mode == "factor":
        return adapter_alignment(generated, teacher, mode=mode)
    if reduction == "relative":
        _check_targets(generated, teacher)
        total = jnp.zeros((), jnp.float32)
        for target in sorted(generated):
            sq, teacher_sq = _delta_distance(generated[target], jax.lax.stop_gradient(teacher[target]))
            relative = jnp.where(teacher_sq > 0, sq / jnp.where(teacher_sq > 0, teacher_sq, 1.0), sq)
            total = total + jnp.mean(jnp.sum(relative, axis=-1))  # [batch, layers]: layers summed
        return total
    total = jnp.zeros((), jnp.float32)
    for target in sorted(generated):
        a, b = generated[target]["A"], generated[target]["B"]
        entries = a.shape[-3] * a.shape[-2] * b.shape[-1]  # layers · d_in · d_out
        total = total + adapter_alignment({target: generated[target]}, {target: teacher[target]}, mode=mode) / entries
    return total


def adapter_sq_norm(adapters: Adapters) -> jax.Array:
    """Mean over the batch of Σ_targets,layers ‖scale·A·B‖²_F (for logging): the alignment to a zero teacher."""
    return adapter_alignment(adapters, jax.tree.map(jnp.zeros_like, adapters), mode="delta")


def adapter_delta_norms(adapters: Adapters) -> dict[str, jax.Array]:
    """For logging: per target, the batch mean of ‖ΔW‖_F over all layers (sqrt of the summed squared norms
    of scale·A·B), from r×r products like `adapter_alignment`."""
    out = {}
    for target in sorted(adapters):
        e = adapters[target]
        a, b = _with_batch(e["A"].astype(jnp.float32), 4), _with_batch(e["B"].astype(jnp.float32), 4)
        s = jnp.asarray(e.get("scale", 1.0), jnp.float32)
        sq = jnp.maximum(s * s * _gram_trace(a, b, a, b), 0.0)  # [batch, layers]
        out[target] = jnp.mean(jnp.sqrt(jnp.sum(sq, axis=-1)))
    return out


def total_loss(
    ce: jax.Array,
    kl: jax.Array | None = None,
    l_ins: jax.Array | None = None,
    lambda_kl: float = 5.0,
    lambda_ins: float | str = "sigmoid",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`CE + λ1·KL + λ2·L_ins` and a dict of every term (for logging). A term given as None is left out.

    λ2 = "sigmoid" (the paper's default) means λ2 = sigmoid(stop_gradient(L_ins)): an adaptive *weight*.
    We stop its gradient so the objective's gradient is exactly λ2·∇L_ins, as the formula reads when λ2
    is a coefficient: it down-weights the alignment term as it converges (sigmoid → 1/2 at L_ins = 0)
    without the extra `L·σ'(L)` term that differentiating through the weight would add. A float gives a
    constant λ2.
    """
    terms: dict[str, jax.Array] = {"cross_entropy": jnp.asarray(ce, jnp.float32)}
    total = terms["cross_entropy"]
    if kl is not None:
        terms["kl"] = jnp.asarray(kl, jnp.float32)
        terms["lambda_kl"] = jnp.asarray(lambda_kl, jnp.float32)
        total = total + terms["lambda_kl"] * terms["kl"]
    if l_ins is not None:
        l_ins = jnp.asarray(l_ins, jnp.float32)
        if isinstance(lambda_ins, str):
            if lambda_ins != "sigmoid":
                raise ValueError(f"loss.lambda_ins: {lambda_ins!r} is not 'sigmoid' or a number")
            weight = jax.nn.sigmoid(jax.lax.stop_gradient(l_ins))
        else:
            weight = jnp.asarray(lambda_ins, jnp.float32)
        terms["l_ins"] = l_ins
        terms["lambda_ins"] = weight
        total = total + weight * l_ins
    terms["total"] = total
    return total, terms
