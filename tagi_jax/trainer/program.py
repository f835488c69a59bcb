"""A run's compiled programs, built from abstract shapes only: parameter and optimizer-state shardings, the jitted
train / eval / diagnostics steps, and their ahead-of-time lowering.

`Trainer` runs these programs on real arrays; `tagi_jax.run.compile_plan` lowers the same programs for a TPU
topology it does not have (`jax.experimental.topologies`), so what it measures is exactly what a run executes.
Nothing here allocates a parameter or touches a work directory.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_dict

from tagi_jax import partitioning
from tagi_jax.config import ConfigError, rename_sections
from tagi_jax.trainer import optim
from tagi_jax.trainer.config import validate_trainer_config
from tagi_jax.trainer.steps import LossFn, eval_step, train_step
from tagi_jax.trainer.train_state import TrainState, abstract_state, check_float32, state_shardings


def seed_keys(config: config_dict.ConfigDict) -> tuple[jax.Array, jax.Array]:
    """(init key, per-step base key) of the config's seed: threefry's split of key(seed), the step key in the
    config's `prng_impl` when that is not threefry (so the impl changes no initial parameter)."""
    init_rng, step_rng = jax.random.split(jax.random.key(int(config.seed)))
    impl = config.get("prng_impl", "threefry2x32")
    if impl != "threefry2x32":
        step_rng = jax.random.key(int(config.seed), impl=impl)
    return init_rng, step_rng


class StepProgram:
    """Everything a stage's steps need that follows from the config, the model's `init_fn` and the mesh.

    Attributes: `mesh`, `rules`, `replicated`, `abstract_params` (ShapeDtypeStructs with shardings),
    `param_mesh_specs`, `param_shardings`, `labels` (optimizer label per parameter), `trainable`, `tx`,
    `schedule`, `state_shardings`, `abstract_state`, and the jitted `train_step`, `eval_step`, `diagnostics`
    (None without a `diagnostics_fn`), `init_state`, `init_params`, `init_opt_state`.
    """

    def __init__(
        self,
        config: config_dict.ConfigDict,
        *,
        init_fn: Callable[[jax.Array], Any],
        loss_fn: LossFn,
        eval_loss_fn: LossFn | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules=None,
        section_names: Mapping[str, str] | None = None,
        diagnostics_fn: LossFn | None = None,
    ):
        self.config = config
        self.mesh = mesh if mesh is not None else partitioning.create_mesh(config.mesh.data, config.mesh.model)
        self.rules = rules if rules is not None else partitioning.logical_axis_rules(bool(config.mesh.fsdp))
        validate_trainer_config(
            config, data_parallel_size=self.mesh.shape[partitioning.DATA_AXIS], section_names=section_names
        )
        self.replicated = partitioning.replicated(self.mesh)
        self.init_fn = init_fn
        init_rng = jax.eval_shape(lambda: jax.random.key(0))
        self.abstract_init_rng = jax.ShapeDtypeStruct(init_rng.shape, init_rng.dtype, sharding=self.replicated)
        rng = jax.eval_shape(lambda: seed_keys(config)[1])
        self.abstract_rng = jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=self.replicated)

        self.abstract_params, self.param_mesh_specs = partitioning.abstract_with_shardings(
            init_fn, self.mesh, self.rules, self.abstract_init_rng
        )
        check_float32(self.abstract_params)
        self.param_shardings = jax.tree.map(lambda x: x.sharding, self.abstract_params)
        opt_cfg = config.optimizer
        try:
            self.labels = optim.parameter_labels(
                self.abstract_params, tuple(opt_cfg.get("frozen", ()) or ()), opt_cfg.get("groups")
            )
        except ConfigError as e:
            raise ConfigError(rename_sections(str(e), section_names)) from None
        self.trainable = optim.trainable_mask(self.labels)
        self.tx, self.schedule = optim.make_optimizer(opt_cfg, self.labels, total_steps=config.train.steps)
        self.state_shardings = state_shardings(self.tx, self.abstract_params, self.param_shardings, self.replicated)
        self.abstract_state = abstract_state(self.tx, self.abstract_params, self.state_shardings)

        data = partitioning.data_sharding(self.mesh)  # a prefix: every batch leaf split on its first axis
        self.data_sharding = data
        step_fn = functools.partial(
            train_step, loss_fn=loss_fn, tx=self.tx, trainable=self.trainable,
            num_microbatches=int(config.train.num_microbatches), schedule=self.schedule,
        )
        self.train_step = jax.jit(
            step_fn,
            in_shardings=(self.state_shardings, data, self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            donate_argnums=(0,),
        )
        self.eval_step = jax.jit(
            functools.partial(eval_step, loss_fn=eval_loss_fn or loss_fn),
            in_shardings=(self.param_shardings, data),
            out_shardings=self.replicated,
        )
        self.diagnostics = None if diagnostics_fn is None else jax.jit(
            diagnostics_fn, in_shardings=(self.param_shardings, data, self.replicated), out_shardings=self.replicated)
        self.init_state = jax.jit(
            lambda rng: TrainState.create(nn.meta.unbox(init_fn(rng)), self.tx), out_shardings=self.state_shardings
        )
        self.init_params = jax.jit(lambda rng: nn.meta.unbox(init_fn(rng)), out_shardings=self.param_shardings)
        self.init_opt_state = jax.jit(
            self.tx.init, in_shardings=(self.param_shardings,), out_shardings=self.state_shardings.opt_state
        )

    def context(self):
        return partitioning.mesh_context(self.mesh, self.rules)

    def abstract_batch(self, shapes: Mapping[str, tuple[tuple[int, ...], Any]]) -> dict[str, jax.ShapeDtypeStruct]:
        """{feature: (shape, dtype)} -> ShapeDtypeStructs split over `data` on the batch axis, as the steps take."""
        return {name: jax.ShapeDtypeStruct(shape, np.dtype(dtype),
                                           sharding=partitioning.data_sharding(self.mesh, len(shape)))
                for name, (shape, dtype) in shapes.items()}

    def lower_train_step(self, batch: Mapping[str, jax.ShapeDtypeStruct]):
        """The train step lowered for the abstract state and `batch` (`.compile()` it for memory and cost)."""
        with self.context():
            return self.train_step.lower(self.abstract_state, dict(batch), self.abstract_rng)

    def lower_eval_step(self, batch: Mapping[str, jax.ShapeDtypeStruct]):
        with self.context():
            return self.eval_step.lower(self.abstract_params, dict(batch))
