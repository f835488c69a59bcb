"""The T5X-style partitioned trainer: one compiled step with explicit shardings and donation, Orbax
checkpoints with exact resume, metrics; plus the multi-host helpers it needs.

Every TAGI stage (LoRA teachers, hypernetwork pretraining, finetuning, the baselines) is this trainer with a
different `loss_fn` and parameter labels. Its config sections are `tagi_jax.trainer.config.default_config()`.
Work directory layout: `checkpoints/<step>/` (Orbax), `config.json`, `model-info.txt`, `metrics.jsonl`,
`tensorboard/`. A run started in a work directory that holds checkpoints resumes from the latest one.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from ml_collections import config_dict

from tagi_jax import partitioning
from tagi_jax.trainer import guards, optim
from tagi_jax.trainer.checkpoints import checkpoint_dir
from tagi_jax.trainer.distributed import make_global_batch, put_replicated
from tagi_jax.trainer.metric_writers import MetricWriter, ProgressBar, is_writer_process
from tagi_jax.trainer.program import StepProgram, seed_keys
from tagi_jax.trainer.steps import LOSS_WEIGHT, Batch, LossFn
from tagi_jax.trainer.train_state import TrainState


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


class Trainer:
    """Builds everything a run needs from the config, then `fit(batches)`.

    Contracts with the model and data sides:

    - `init_fn(rng) -> params`: a tree of `nn.LogicallyPartitioned` leaves, e.g.
      `lambda rng: model.init(rng, *dummy_inputs)["params"]`. Only traced abstractly unless the run starts
      from scratch, then run under `jax.jit` with the parameter shardings (never a full copy on one device).
    - `loss_fn(params, batch, rng) -> (loss, metrics)`: pure and jittable; `rng` is a per-step key in training
      and None in evaluation (no rng = no dropout); `metrics` is a dict of scalars (loss terms, adapter
      norms, ...), all logged. If it holds `"loss_weight"` (e.g. the number of real target tokens the loss
      was averaged over), microbatches are combined weighted by it, which makes accumulation equal to the big
      batch for token-averaged losses; without it microbatches are averaged with equal weight.
    - `batches(start_step) -> iterator` of host-local batches (dicts of numpy arrays, leading dimension
      `batch_size / jax.process_count()`, this host's slice `host_batch_slice(batch_size)` of the global
      batch) for steps start_step, start_step + 1, ...: the data position is a function of the step, so a
      resumed run sees exactly the batches an uninterrupted one would.

    Attributes worth knowing: `mesh`, `rules`, `tx`, `schedule`, `labels` (per-parameter optimizer labels),
    `abstract_params` (ShapeDtypeStructs with shardings), `state_shardings`, `checkpoints` (the Orbax manager),
    `writer`.
    """

    def __init__(
        self,
        config: config_dict.ConfigDict,
        *,
        workdir: str,
        init_fn: Callable[[jax.Array], Any],
        loss_fn: LossFn,
        eval_loss_fn: LossFn | None = None,
        mesh: jax.sharding.Mesh | None = None,
        rules=None,
        section_names: Mapping[str, str] | None = None,
        name: str | None = None,
        diagnostics_fn: LossFn | None = None,
    ):
        """`section_names` (e.g. {"train": "stages.finetune.train", "optimizer": "stages.finetune.optimizer"})
        makes config errors name the keys as they appear in the run config; `name` (default: the work
        directory's name) names the run in messages, e.g. its pipeline stage. `diagnostics_fn(params, batch,
        rng) -> {name: scalar}` is compiled apart and run at log steps only (costly measurements, such as the
        gradient each loss term sends somewhere), its values logged with the training metrics."""
        self.config = config
        self.workdir = os.path.abspath(workdir)
        self.name = name or os.path.basename(self.workdir)
        program = StepProgram(config, init_fn=init_fn, loss_fn=loss_fn, eval_loss_fn=eval_loss_fn, mesh=mesh,
                              rules=rules, section_names=section_names, diagnostics_fn=diagnostics_fn)
        self.program = program
        self.mesh, self.rules, self.replicated, self.init_fn = program.mesh, program.rules, program.replicated, init_fn
        train = config.train
        init_rng, step_rng = seed_keys(config)
        self._init_rng = put_replicated(init_rng, self.replicated)  # multi-host: see put_replicated
        self._step_rng = put_replicated(step_rng, self.replicated)
        self.abstract_params, self.param_mesh_specs = program.abstract_params, program.param_mesh_specs
        self.param_shardings, self.labels, self.trainable = program.param_shardings, program.labels, program.trainable
        self.tx, self.schedule = program.tx, program.schedule
        self.state_shardings, self.abstract_state = program.state_shardings, program.abstract_state
        self._train_step, self._eval_step, self._diagnostics = program.train_step, program.eval_step, program.diagnostics
        self._init_state, self._init_params = program.init_state, program.init_params
        self._init_opt_state = program.init_opt_state

        keep = int(train.keep_checkpoints)
        self.checkpoints = ocp.CheckpointManager(
            checkpoint_dir(self.workdir),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep or None, create=True),
        )
        self.writer = MetricWriter(self.workdir)
        if is_writer_process():
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
            partitioning.write_model_info(self.workdir, self.abstract_params, self.param_mesh_specs)
        self.resumed_from: int | None = None

    # -- state ---------------------------------------------------------------------------------------

    def context(self) -> contextlib.AbstractContextManager:
        return partitioning.mesh_context(self.mesh, self.rules)

    def init_params(self) -> Any:
        """Fresh parameters from `init_fn` (the seed's init RNG), initialised straight into their shardings;
        e.g. to overlay imported weights on before `fit(initial_params=...)`."""
        with self.context():
            return self._init_params(self._init_rng)

    def init_state(self, initial_params: Any | Callable[[], Any] | None = None) -> TrainState:
        """A fresh state: from `init_fn` (sharded init), or from given parameters (imported weights, the
        previous stage's output: a tree like the model's, numpy or jax arrays, cast to the model's dtypes)."""
        if initial_params is None:
            with self.context():
                return self._init_state(self._init_rng)
        params = initial_params() if callable(initial_params) else initial_params
        params = self._place_params(params)
        with self.context():
            opt_state = self._init_opt_state(params)
        step = jax.device_put(jnp.zeros((), jnp.int32), self.replicated)
        return TrainState(step=step, params=params, opt_state=opt_state)

    def _place_params(self, params: Any) -> Any:
        """Check `params` against the model's parameter tree (paths, shapes), cast to its dtypes, shard."""
        expected = {optim.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(self.abstract_params)[0]}
        given = {optim.path_to_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
        missing = sorted(set(expected) - set(given))
        extra = sorted(set(given) - set(expected))
        if missing:
            raise ValueError(f"initial params lack parameter '{missing[0]}' ({len(missing)} missing)")
        if extra:
            raise ValueError(f"initial params have unexpected parameter '{extra[0]}' ({len(extra)} extra)")
        leaves = []
        for path, target in expected.items():
            x = given[path]
            if tuple(x.shape) != tuple(target.shape):
                raise ValueError(f"initial params: '{path}' has shape {tuple(x.shape)}, the model expects {target.shape}")
            if x.dtype != target.dtype:  # float32, or int8 for a quantised frozen kernel
                if jnp.issubdtype(target.dtype, jnp.integer) and not jnp.issubdtype(x.dtype, jnp.integer):
                    raise ValueError(f"initial params: '{path}' is {x.dtype}, the model stores it as {target.dtype} "
                                     "(quantise it first: tagi_jax.models.quantize)")
                x = np.asarray(x, target.dtype) if isinstance(x, np.ndarray) else jnp.asarray(x).astype(target.dtype)
            leaves.append(jax.device_put(x, target.sharding))
        return jax.tree.unflatten(jax.tree.structure(self.abstract_params), leaves)

    def restore_or_init(self, initial_params: Any | Callable[[], Any] | None = None) -> TrainState:
        """The newest readable checkpoint in the work directory if there is one (restored straight into sharded
        arrays; `initial_params` is then not called), else `init_state(initial_params)`. A damaged newer step is
        moved aside with a warning (`guards.restore_newest_readable`)."""
        steps = self.checkpoints.all_steps()
        if not steps:
            return self.init_state(initial_params)
        step, state = guards.restore_newest_readable(
            steps, lambda s: self.checkpoints.restore(s, args=ocp.args.StandardRestore(self.abstract_state)),
            self.checkpoints.directory, move_aside=is_writer_process())
        if step != max(steps):
            self.checkpoints.reload()
        self.resumed_from = int(step)
        return state

    def save(self, state: TrainState, wait: bool = False) -> bool:
        """Checkpoint `state` at its step (no-op if that step is already saved); returns whether it saved.
        `wait`: return only once the checkpoint is complete on disk."""
        step = int(jax.device_get(state.step))
        if step in self.checkpoints.all_steps():
            return False
        saved = self.checkpoints.save(step, args=ocp.args.StandardSave(state), force=True)
        if wait:
            self.checkpoints.wait_until_finished()
        return saved

    # -- steps ---------------------------------------------------------------------------------------

    def shard_batch(self, local_batch: Batch) -> dict[str, jax.Array]:
        per_host = self.config.train.batch_size // jax.process_count()
        for name, x in dict(local_batch).items():
            if np.shape(x)[:1] != (per_host,):
                raise ValueError(
                    f"batch feature '{name}' has shape {np.shape(x)}; expected {per_host} examples per host "
                    f"(train.batch_size={self.config.train.batch_size} over {jax.process_count()} processes)"
                )
        return make_global_batch(local_batch, self.mesh)

    def train_step(self, state: TrainState, local_batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        """One compiled update (the state is donated: don't reuse the `state` passed in)."""
        batch = self.shard_batch(local_batch)
        with self.context():
            return self._train_step(state, batch, self._step_rng)

    def diagnose(self, state: TrainState, local_batch: Batch) -> dict[str, float]:
        """The `diagnostics_fn` values on one batch ({} without one); rng = the step's."""
        if self._diagnostics is None:
            return {}
        rng = jax.random.fold_in(self._step_rng, state.step)
        with self.context():
            return {k: float(v) for k, v in jax.device_get(
                self._diagnostics(state.params, self.shard_batch(local_batch), rng)).items()}

    def eval_step(self, params: Any, local_batch: Batch) -> dict[str, jax.Array]:
        batch = make_global_batch(local_batch, self.mesh)
        with self.context():
            return self._eval_step(params, batch)

    def evaluate(self, state: TrainState, batches: Iterable[Batch]) -> dict[str, float]:
        """The eval loss_fn's metrics averaged over `batches` (weighted by "loss_weight" when reported)."""
        sums: dict[str, float] = {}
        total = 0.0
        for local_batch in batches:
            metrics = jax.device_get(self.eval_step(state.params, local_batch))
            weight = float(metrics.pop(LOSS_WEIGHT, 1.0))
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + weight * float(v)
            total += weight
        return {k: v / total for k, v in sums.items()} if total > 0 else {}

    # -- the loop ------------------------------------------------------------------------------------

    def fit(
        self,
        batches: Callable[[int], Iterable[Batch]],
        *,
        state: TrainState | None = None,
        initial_params: Any | Callable[[], Any] | None = None,
        stop_at: int | None = None,
        eval_fn: Callable[[TrainState, int], Mapping[str, Any] | None] | None = None,
    ) -> TrainState:
        """Train until `train.steps` (or `stop_at`, e.g. to simulate preemption), resuming if possible.

        `batches(start_step)` gives the host-local batches from `start_step` on. `eval_fn(state, step)` runs
        every `train.eval_every` steps and after the last step of training; the scalars it returns are
        logged under `eval/`. Checkpoints every `train.checkpoint_every` steps and at the end.
        """
        train = self.config.train
        if state is None:
            state = self.restore_or_init(initial_params)
        start = int(jax.device_get(state.step))
        end = int(train.steps) if stop_at is None else min(int(stop_at), int(train.steps))
        bar = ProgressBar(total=int(train.steps), initial=start, enabled=bool(train.get("progress_bar", True)))
        if self.resumed_from is not None and start == self.resumed_from:
            bar.write(f"resuming from checkpoint at step {start} in {self.checkpoints.directory}")
        data: Iterator[Batch] = iter(batches(start))
        sums, last, count, t0 = None, None, 0, time.perf_counter()
        unchecked = None  # (step, metrics) whose finiteness is checked one step late (no sync per step)
        try:
            with guards.SignalWatcher() as signals:
                for step in range(start, end):
                    try:
                        local_batch = next(data)
                    except StopIteration:
                        raise RuntimeError(f"the data ran out at step {step} (train.steps={train.steps})") from None
                    state, metrics = self.train_step(state, local_batch)
                    done = step + 1
                    if unchecked is not None:
                        self._check_finite(*unchecked)
                    unchecked = (done, metrics)
                    is_log = done % train.log_every == 0 or done == end
                    is_save = bool(train.checkpoint_every and done % train.checkpoint_every == 0)
                    if is_log or is_save or signals.received:
                        self._check_finite(*unchecked)  # never log or save a non-finite state
                        unchecked = None
                    metrics = {k: v for k, v in metrics.items() if k != guards.FINITE}
                    sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)
                    last, count = metrics, count + 1
                    bar.update()
                    if is_log:
                        values = {k: float(v) / count for k, v in jax.device_get(sums).items()}
                        if "learning_rate" in last:
                            values["learning_rate"] = float(jax.device_get(last["learning_rate"]))
                        elapsed = max(time.perf_counter() - t0, 1e-9)
                        values["examples_per_second"] = count * train.batch_size / elapsed
                        values["steps_per_second"] = count / elapsed
                        values.update(self.diagnose(state, local_batch))
                        self.writer.write_scalars(done, values, "train")
                        bar.set_metrics(values)
                        sums, count, t0 = None, 0, time.perf_counter()
                    if is_save:
                        self.save(state)
                    if signals.received:
                        self.save(state, wait=True)
                        raise guards.Preempted(done, self.checkpoints.directory, signals.received)
                    is_last = done == int(train.steps)
                    if eval_fn is not None and ((train.eval_every and done % train.eval_every == 0) or is_last):
                        results = eval_fn(state, done)
                        if results:
                            values = self.writer.write_scalars(done, results, "eval")
                            bar.write(f"step {done} eval: " + ", ".join(f"{k}={v:.4g}" for k, v in values.items()))
                if unchecked is not None:
                    self._check_finite(*unchecked)
                self.save(state)
        finally:
            bar.close()
        self.checkpoints.wait_until_finished()
        return state

    def _check_finite(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        """Stop (`guards.NonFiniteError`) if the step's metrics hold a NaN/Inf; the state is then not saved."""
        if float(jax.device_get(metrics[guards.FINITE])) == 1.0:
            return
        self.checkpoints.wait_until_finished()
        raise guards.NonFiniteError(guards.non_finite_message(
            self.name, step, jax.device_get(dict(metrics)), self.checkpoints.latest_step(),
            self.checkpoints.directory))

    def close(self) -> None:
        self.checkpoints.wait_until_finished()
        self.checkpoints.close()
        self.writer.close()

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
