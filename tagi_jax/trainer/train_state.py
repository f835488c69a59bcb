"""The train state (step, params, optimizer state) and its shardings.

The optimizer itself (an `optax.GradientTransformation`) is not part of the state: it is a static
argument of the compiled step, so the state is a plain pytree of arrays that Orbax saves and restores.
Parameters and optimizer state are float32 whatever the compute dtype (bfloat16 compute is the model's
business); `check_float32` enforces it at build time.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Sharding

from tagi_jax.trainer.optim import path_to_str


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: Any
    opt_state: Any

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation) -> "TrainState":
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

    def apply_gradients(
        self, grads: Any, tx: optax.GradientTransformation, trainable: Any | None = None
    ) -> "TrainState":
        """One optimizer update. Parameters where `trainable` is False are returned untouched (bit-identical,
        even for -0.0, which `p + 0.0` would turn into +0.0)."""
        updates, opt_state = tx.update(grads, self.opt_state, self.params)
        params = optax.apply_updates(self.params, updates)
        if trainable is not None:
            params = jax.tree.map(lambda keep, new, old: new if keep else old, trainable, params, self.params)
        return self.replace(step=self.step + 1, params=params, opt_state=opt_state)


def check_float32(abstract_params: Any) -> None:
    """Parameters must be stored in float32 (the optimizer state follows them), except the int8 kernels of a
    frozen backbone (a "kernel" with a "kernel_scale" beside it, tagi_jax.models.quantize)."""
    int8 = {path for path, _ in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
            if getattr(path[-1], "key", None) == "kernel_scale"}
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        if (np.dtype(leaf.dtype) == np.int8 and getattr(path[-1], "key", None) == "kernel"
                and path[:-1] + (jax.tree_util.DictKey("kernel_scale"),) in int8):
            continue
        if np.dtype(leaf.dtype) != np.float32:
            raise ValueError(
                f"parameter '{path_to_str(path)}' has dtype {np.dtype(leaf.dtype).name}; the trainer keeps "
                "parameters in float32 (cast activations to bfloat16 inside the model instead)"
            )


def opt_state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, replicated: Sharding
) -> Any:
    """Shardings for the optimizer state, derived from the parameters'.

    A state leaf whose key path ends with a parameter's path and has that parameter's shape (Adam's mu and
    nu, momentum, ...) gets the parameter's sharding; everything else (counts, Adafactor's factored row/column
    statistics, which are vectors) is replicated.
    """
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    by_path = {
        tuple(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0],
            jax.tree.leaves(param_shardings, is_leaf=lambda x: isinstance(x, Sharding)),
        )
    }
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def pick(path, leaf):
        path = tuple(path)
        for n in lengths:
            if n <= len(path):
                hit = by_path.get(path[len(path) - n:])
                if hit is not None and tuple(hit[0]) == tuple(leaf.shape):
                    return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, abstract_opt)


def state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, param_shardings: Any, replicated: Sharding
) -> TrainState:
    """A TrainState whose leaves are the shardings of the corresponding state arrays."""
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_state_shardings(tx, abstract_params, param_shardings, replicated),
    )


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any, shardings: TrainState) -> TrainState:
    """The state as `jax.ShapeDtypeStruct`s carrying shardings: Orbax's target for a sharded restore."""
    shapes = jax.eval_shape(lambda p: TrainState.create(p, tx), abstract_params)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
    )
