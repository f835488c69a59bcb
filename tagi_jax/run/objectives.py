"""One training objective per stage, `loss_fn(params, batch, rng) -> (loss, metrics)`, in the `OBJECTIVES` table:
pure functions the trainer compiles, built from the model's pure functions and `tagi_jax.losses`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tagi_jax import features as F
from tagi_jax import losses
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.run.defaults import lambda_ins
from tagi_jax.trainer.steps import LOSS_WEIGHT, LossFn


def _ce(config, logits, batch):
    ce, z, ntok = losses.cross_entropy(logits, batch[F.DECODER_TARGET_TOKENS], batch[F.DECODER_LOSS_WEIGHTS],
                                       z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing)
    return ce, {"cross_entropy": ce, "z_loss": z, LOSS_WEIGHT: ntok}


def _teacher_rows(table: jax.Array | None):
    """batch -> batch with `task_id` replaced by each example's row of the teacher table."""
    def with_rows(batch):
        if table is None:
            return batch
        tid = batch[F.TASK_ID]
        return {**batch, F.TASK_ID: jnp.where(tid >= 0, table[jnp.maximum(tid, 0)], 0)}
    return with_rows


def _backbone_ce(config, model, rows) -> LossFn:
    """The `backbone` and `concat` stages: the plain backbone on `full_inputs`."""
    def loss_fn(params, batch, rng):
        return _ce(config, tagi_lib.concat_logits(model, params, batch, rng), batch)
    return loss_fn


def _no_instruction_ce(config, model, rows) -> LossFn:
    def loss_fn(params, batch, rng):
        return _ce(config, tagi_lib.no_instruction_logits(model, params, batch, rng), batch)
    return loss_fn


def _teachers_ce(config, model, rows) -> LossFn:
    """Stage 0: every example trains its task's LoRA teacher on `full_inputs`."""
    def loss_fn(params, batch, rng):
        return _ce(config, tagi_lib.teacher_logits(model, params, rows(batch), rng), batch)
    return loss_fn


def _student_ce(config, model, rows) -> LossFn:
    """Stage 1 (`pretrain`) and the `hint` baseline: the student's cross-entropy alone."""
    def loss_fn(params, batch, rng):
        logits, adapters = tagi_lib.student_forward(model, params, batch, rng)
        loss, metrics = _ce(config, logits, batch)
        metrics["adapter_sq_norm"] = losses.adapter_sq_norm(adapters)
        return loss, metrics
    return loss_fn


def _distillation(config, model, rows) -> LossFn:
    """Stage 2 (`finetune`): `CE + λ1·KL(teacher ‖ student) + λ2·L_ins` on the {"student", "teacher"} tree; the
    KL teacher is the backbone with the task's LoRA teacher on `full_inputs` (the paper's equation) or the
    `concat` baseline (`loss.kl_teacher`)."""
    weight_ins = lambda_ins(config)
    use_kl = float(config.loss.lambda_kl) != 0.0
    use_ins = weight_ins == "sigmoid" or float(weight_ins) != 0.0
    kl_from_concat = config.loss.kl_teacher == "concat"

    def loss_fn(params, batch, rng):
        student, teacher = params["student"], jax.lax.stop_gradient(params["teacher"])
        tbatch = rows(batch)
        logits, generated = tagi_lib.student_forward(model, student, batch, rng)
        ce, metrics = _ce(config, logits, batch)
        kl = l_ins = None
        if use_kl:
            t_logits = (tagi_lib.concat_logits(model, teacher, batch) if kl_from_concat
                        else tagi_lib.teacher_logits(model, teacher, tbatch))
            kl = losses.distillation_kl(logits, t_logits, batch[F.DECODER_LOSS_WEIGHTS], config.loss.temperature)
        if use_ins:
            t_adapters = tagi_lib.teacher_adapters(model, teacher, tbatch[F.TASK_ID])
            l_ins = losses.alignment_loss(generated, t_adapters, config.loss.alignment,
                                          config.loss.alignment_reduction)
        total, terms = losses.total_loss(ce, kl, l_ins, lambda_kl=float(config.loss.lambda_kl),
                                         lambda_ins=weight_ins)
        metrics.update({k: v for k, v in terms.items() if k != "total"})
        metrics["adapter_sq_norm"] = losses.adapter_sq_norm(generated)
        return total, metrics
    return loss_fn


OBJECTIVES = {
    "backbone": _backbone_ce,
    "concat": _backbone_ce,
    "no_instruction": _no_instruction_ce,
    "teachers": _teachers_ce,
    "pretrain": _student_ce,
    "hint": _student_ce,
    "finetune": _distillation,
}


def make_loss_fn(stage: str, config, model: tagi_lib.TAGI, task_to_teacher: np.ndarray | None) -> LossFn:
    """loss_fn(params, batch, rng) -> (loss, metrics) for one stage (pure; the trainer compiles it).
    `task_to_teacher` maps task ids to rows of the teacher table."""
    if stage not in OBJECTIVES:
        raise ValueError(f"unknown stage {stage!r}")
    table = None if task_to_teacher is None else jnp.asarray(task_to_teacher, jnp.int32)
    return OBJECTIVES[stage](config, model, _teacher_rows(table))
