"""The pure step functions the trainer compiles: gradients (accumulated over microbatches), one update, eval.

Module-level functions of (state or params, batch, rng) with the loss function and optimizer as static
arguments, so `jax.jit` compiles each step once; `Trainer` adds the shardings and donation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tagi_jax.trainer.guards import FINITE
from tagi_jax.trainer.train_state import TrainState

Batch = Mapping[str, Any]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]]
# A loss_fn metric: the weight (e.g. real target tokens) its microbatch's loss was averaged over.
LOSS_WEIGHT = "loss_weight"


@dataclasses.dataclass(frozen=True)
class BatchNormalizedLoss:
    """A loss whose terms are normalised over the whole batch, so splitting it into microbatches leaves its
    gradient unchanged (weighting each microbatch's loss by its token count cannot do that for a loss with both
    per-token and per-example terms, or with a weight computed from the batch such as sigmoid(L_ins)).

    `context_fn(params, batch, rng)` computes, once per step on the whole batch and without gradient, what the
    normalisation needs (token and example counts, adaptive weights); `share_fn(params, microbatch, rng,
    context)` returns (that microbatch's share of the batch loss, metrics), and the shares' gradients are summed.
    Called on a whole batch (one microbatch, evaluation), it is `share_fn(..., context=None)`: the loss then
    normalises over the batch it sees, with no extra pass.
    """
    context_fn: Callable[[Any, Batch, jax.Array | None], Mapping[str, jax.Array]]
    share_fn: Callable[..., tuple[jax.Array, Mapping[str, jax.Array]]]

    def __call__(self, params, batch, rng):
        return self.share_fn(params, batch, rng, None)


def split_microbatches(batch: Batch, num_microbatches: int) -> dict[str, jax.Array]:
    """[batch, ...] -> [num_microbatches, batch / num_microbatches, ...], strided.

    Microbatch i holds examples i, i + k, i + 2k, ...: with the batch split over `data`, each device's
    rows stay on that device for every microbatch (a contiguous split would move data between devices).
    """
    k = num_microbatches

    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} examples does not split into {k} microbatches")
        x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, dict(batch))


def _metrics_dict(loss: jax.Array, metrics: Mapping[str, Any]) -> dict[str, jax.Array]:
    out = {}
    for name, value in dict(metrics).items():
        if jnp.shape(value) != ():
            raise ValueError(f"loss_fn metric '{name}' has shape {jnp.shape(value)}; metrics must be scalars")
        out[name] = jnp.asarray(value, jnp.float32)
    if jnp.shape(loss) != ():
        raise ValueError(f"loss_fn returned a loss of shape {jnp.shape(loss)}; it must be a scalar")
    out["loss"] = jnp.asarray(loss, jnp.float32)
    return out


def compute_gradients(
    params: Any,
    batch: Batch,
    rng: jax.Array,
    *,
    loss_fn: LossFn,
    trainable: Any | None = None,
    num_microbatches: int = 1,
) -> tuple[Any, dict[str, jax.Array]]:
    """(gradient tree like `params`, metrics) for one (global) batch, accumulating over microbatches.

    Only trainable parameters are differentiated (frozen ones get zero gradients and cost no backward
    pass or accumulator memory). Microbatch gradients and metrics are averaged, weighted by the
    `"loss_weight"` metric when the loss_fn reports one; a `BatchNormalizedLoss` instead gets its batch
    context first and its microbatch gradients and losses are summed (its other metrics are still averaged).
    """
    leaves, treedef = jax.tree.flatten(params)
    mask = [True] * len(leaves) if trainable is None else treedef.flatten_up_to(trainable)
    train_leaves = [leaf for leaf, m in zip(leaves, mask) if m]

    summed = isinstance(loss_fn, BatchNormalizedLoss) and num_microbatches > 1
    if summed:
        context = jax.lax.stop_gradient(loss_fn.context_fn(params, batch, jax.random.fold_in(rng, num_microbatches)))
        microbatch_loss = lambda full, mb, mb_rng: loss_fn.share_fn(full, mb, mb_rng, context)  # noqa: E731
    else:
        microbatch_loss = loss_fn

    def loss_of_trainable(train, mb, mb_rng):
        it = iter(train)
        full = treedef.unflatten([next(it) if m else leaf for leaf, m in zip(leaves, mask)])
        return microbatch_loss(full, mb, mb_rng)

    grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)

    def one(mb, mb_rng):
        (loss, aux), grads = grad_fn(train_leaves, mb, mb_rng)
        metrics = _metrics_dict(loss, aux)
        weight = metrics.pop(LOSS_WEIGHT, None)
        return grads, metrics, weight

    if num_microbatches == 1:
        grads, metrics, weight = one(batch, rng)
        if weight is not None:
            metrics[LOSS_WEIGHT] = weight
    else:
        mbs = split_microbatches(batch, num_microbatches)
        rngs = jax.random.split(rng, num_microbatches)
        _, metric_shapes, weight_shape = jax.eval_shape(one, jax.tree.map(lambda x: x[0], mbs), rngs[0])
        weighted = weight_shape is not None

        def body(carry, xs):
            g_sum, m_sum, w_sum = carry
            grads, metrics, weight = one(*xs)
            w = weight if weighted else jnp.float32(1.0)
            g_w = jnp.float32(1.0) if summed else w
            g_sum = [a + g_w * g.astype(jnp.float32) for a, g in zip(g_sum, grads)]
            m_sum = {k: m_sum[k] + (1.0 if summed and k == "loss" else w) * metrics[k] for k in m_sum}
            return (g_sum, m_sum, w_sum + w), None

        init = (
            [jnp.zeros(leaf.shape, jnp.float32) for leaf in train_leaves],
            {k: jnp.zeros((), jnp.float32) for k in metric_shapes},
            jnp.zeros((), jnp.float32),
        )
        (g_sum, m_sum, w_sum), _ = jax.lax.scan(body, init, (mbs, rngs))
        denom = jnp.where(w_sum > 0, w_sum, 1.0)
        grads = [(g if summed else g / denom).astype(leaf.dtype) for g, leaf in zip(g_sum, train_leaves)]
        metrics = {k: v if summed and k == "loss" else v / denom for k, v in m_sum.items()}
        if weighted:
            metrics[LOSS_WEIGHT] = w_sum

    it = iter(grads)
    # A frozen int8 kernel's zero gradient is float32 (the optimizer's clipping and updates are float math).
    full_grads = treedef.unflatten([next(it) if m else jnp.zeros(leaf.shape, _grad_dtype(leaf.dtype))
                                    for leaf, m in zip(leaves, mask)])
    return full_grads, metrics


def _grad_dtype(dtype):
    return jnp.float32 if jnp.issubdtype(dtype, jnp.integer) else dtype


def train_step(
    state: TrainState,
    batch: Batch,
    base_rng: jax.Array,
    *,
    loss_fn: LossFn,
    tx: optax.GradientTransformation,
    trainable: Any | None = None,
    num_microbatches: int = 1,
    schedule: optax.Schedule | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one global batch; the RNG is `fold_in(base_rng, state.step)`.

    Metrics: the loss_fn's (averaged over microbatches) plus `loss`, `grad_norm` (of the trainable gradient,
    before clipping), `param_norm` (of the trainable parameters), `learning_rate` (base schedule) and
    `all_finite` (1.0 when every other metric is finite).
    """
    rng = jax.random.fold_in(base_rng, state.step)
    grads, metrics = compute_gradients(
        state.params, batch, rng, loss_fn=loss_fn, trainable=trainable, num_microbatches=num_microbatches
    )
    metrics["grad_norm"] = optax.tree.norm(grads)  # frozen gradients are zero
    trainable_params = (
        state.params
        if trainable is None
        else [p for p, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(trainable)) if m]
    )
    metrics["param_norm"] = optax.tree.norm(trainable_params)
    if schedule is not None:
        metrics["learning_rate"] = jnp.asarray(schedule(state.step), jnp.float32)
    # One flag for the host to poll (cheap: scalars only): a NaN/Inf anywhere in the gradient shows in grad_norm.
    metrics[FINITE] = jnp.all(jnp.stack([jnp.isfinite(v) for v in metrics.values()])).astype(jnp.float32)
    return state.apply_gradients(grads, tx, trainable), metrics


def eval_step(params: Any, batch: Batch, *, loss_fn: LossFn) -> dict[str, jax.Array]:
    """The loss_fn's metrics (and `loss`) on one batch; no update. The loss_fn gets `rng=None`: the
    project's convention for "deterministic" (no dropout)."""
    loss, metrics = loss_fn(params, batch, None)
    return _metrics_dict(loss, metrics)
