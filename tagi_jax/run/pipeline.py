"""The pipeline driver: validate and prepare a run (benchmark, model, mesh), train each configured stage with one
partitioned trainer, then evaluate the configured methods into summary.json."""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from ml_collections import config_dict

from tagi_jax import features as F
from tagi_jax import hf, partitioning
from tagi_jax.config import ConfigError
from tagi_jax.data import batches as batches_lib
from tagi_jax.data.benchmarks import Benchmark, register_benchmark
from tagi_jax.eval.runner import evaluate_methods
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.run.defaults import tagi_config, validate, with_run_compute
from tagi_jax.run.objectives import make_diagnostics_fn, make_loss_fn
from tagi_jax.run.stage_init import build_initial_params
from tagi_jax.run.stages import (PRETRAIN_DATA_STAGES, TEACHER_STAGES, section_names, stage_init_for,
                                  stage_trainer_config)
from tagi_jax.run.workdir import check_resume, has_checkpoint, stage_dir, write_run_files
from tagi_jax.trainer.distributed import host_batch_slice
from tagi_jax.trainer.trainer import Trainer


@dataclasses.dataclass
class RunContext:
    config: config_dict.ConfigDict
    workdir: str
    data: Benchmark
    model_cfg: tagi_lib.TAGIConfig
    model: tagi_lib.TAGI
    task_to_teacher: np.ndarray
    mesh: Any
    rules: Any
    hf_params: Any = None

    def fresh_params(self, stage: str):
        """The stage's tree freshly initialised straight into its shardings, from the run's one init rng: every
        stage gets the same fresh value for a parameter it shares with another (values follow paths)."""
        rng = jax.random.fold_in(jax.random.key(int(self.config.seed)), 7)
        init_fn = stage_init_for(self.config, stage, self.model_cfg)
        params, _, _ = partitioning.sharded_init(init_fn, self.mesh, self.rules, rng)
        return params


def prepare(config: config_dict.ConfigDict, workdir: str) -> RunContext:
    """Validate, register the data, build the model; write the run files into the work directory."""
    validate(config)
    changed = check_resume(workdir, config)  # before anything is written into an existing work directory
    if changed:
        print(f"note: {workdir} resumes with changed settings (recorded in run.json): "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8]), flush=True)
    os.makedirs(workdir, exist_ok=True)
    bench = register_benchmark(config.data, workdir)
    per = config.tagi.teachers_per
    rows = bench.teacher_index(per)
    task_to_teacher = np.asarray([rows[t] for t in bench.train_task_names], np.int32)
    hf_params = t5 = None
    if config.model.checkpoint:
        t5, hf_params = hf.load_t5(config.model.checkpoint, dtype=config.model.dtype)
        t5 = with_run_compute(config, t5)
    model_cfg = tagi_config(config, num_teachers=len(bench.teacher_keys(per)), t5=t5)
    if bench.vocabulary.vocab_size > model_cfg.t5.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': the model has {model_cfg.t5.vocab_size} embeddings but "
                          f"data.vocabulary has {bench.vocabulary.vocab_size} ids")
    write_run_files(workdir, config, model_cfg, bench.train_task_names, per, bench.teacher_keys(per),
                    bench.categories, changed)
    mesh = partitioning.create_mesh(config.mesh.data, config.mesh.model)
    rules = partitioning.logical_axis_rules(bool(config.mesh.fsdp))
    return RunContext(config, workdir, bench, model_cfg, tagi_lib.TAGI(model_cfg), task_to_teacher, mesh, rules,
                      hf_params)


def _with_teacher_rows(batches, stage: str):
    """Refuse, on the host, a batch with an example whose task has no teacher row (task id -1: not a training
    task) in a stage that reads the teacher table (the compiled step would only see a NaN loss)."""
    for batch in batches:
        if batch[F.TASK_ID].size and int(np.min(batch[F.TASK_ID])) < 0:
            raise batches_lib.DataError(f"stage {stage}: a training batch holds an example of a task outside the "
                                        "training tasks (task_id -1), which has no teacher")
        yield batch


def run_stage(ctx: RunContext, stage: str, stop_at: int | None = None) -> dict:
    """Train one stage to `stages.<stage>.train.steps` (resuming if it has checkpoints); returns a record."""
    config = ctx.config
    stage_cfg = stage_trainer_config(config, stage)
    loss_fn = make_loss_fn(stage, config, ctx.model, ctx.task_to_teacher)
    trainer = Trainer(stage_cfg, workdir=stage_dir(ctx.workdir, stage),
                      init_fn=stage_init_for(config, stage, ctx.model_cfg),
                      loss_fn=loss_fn, section_names=section_names(stage), mesh=ctx.mesh, rules=ctx.rules,
                      name=stage, diagnostics_fn=make_diagnostics_fn(stage, config, ctx.model, ctx.task_to_teacher))
    initial = None if has_checkpoint(ctx.workdir, stage) else build_initial_params(stage, ctx, trainer)
    is_pretrain = stage in PRETRAIN_DATA_STAGES
    mixture = ctx.data.pretrain_task if is_pretrain else ctx.data.train_mixture
    lengths = batches_lib.pretrain_lengths(config.data) if is_pretrain else batches_lib.task_lengths(config.data)
    host_bs = stage_cfg.train.batch_size // jax.process_count()
    host_slice = host_batch_slice(stage_cfg.train.batch_size)

    def batches(start_step: int):
        out = batches_lib.train_batches(mixture, lengths, stage_cfg.train.batch_size, ctx.data.train_task_names,
                                        seed=stage_cfg.seed, start_step=start_step,
                                        host_slice=host_slice if host_bs != stage_cfg.train.batch_size else None)
        return _with_teacher_rows(out, stage) if stage in TEACHER_STAGES else out

    t0 = time.time()
    state = trainer.fit(batches, initial_params=initial, stop_at=stop_at)
    seconds = time.time() - t0
    trainer.close()
    return {"stage": stage, "step": int(jax.device_get(state.step)), "seconds": seconds,
            "resumed_from": trainer.resumed_from}


def run(config: config_dict.ConfigDict, workdir: str) -> dict:
    """Run the configured stages in order, then evaluate the configured methods; returns the summary."""
    ctx = prepare(config, workdir)
    records = []
    for stage in config.pipeline.stages:
        logging.info("=== stage %s ===", stage)
        print(f"\n=== stage: {stage} ===", flush=True)
        records.append(run_stage(ctx, stage))
    summary = evaluate_methods(workdir, tuple(config.pipeline.evaluate), config, ctx.data)
    return {"stages": records, "summary": summary}
