"""One training objective per stage, `loss_fn(params, batch, rng) -> (loss, metrics)`, in the `OBJECTIVES` table:
pure functions the trainer compiles, built from the model's pure functions and `tagi_jax.losses`."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tagi_jax import features as F
from tagi_jax import losses
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.run.defaults import lambda_ins
from tagi_jax.trainer.steps import LOSS_WEIGHT, BatchNormalizedLoss, LossFn


def _ce(config, logits, batch):
    ce, z, ntok = losses.cross_entropy(logits, batch[F.DECODER_TARGET_TOKENS], batch[F.DECODER_LOSS_WEIGHTS],
                                       z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing)
    return ce, {"cross_entropy": ce, "z_loss": z, LOSS_WEIGHT: ntok}


def _teacher_rows(table: jax.Array | None):
    """batch -> batch with `task_id` replaced by each example's row of the teacher table.

    A task id outside the table (-1: a task that is not a training task) gets no row (-1), which the teacher
    table turns into NaN factors: the step's finiteness check then stops the stage, instead of the example silently
    reading another task's teacher (the pipeline also refuses such batches on the host, with their task)."""
    def with_rows(batch):
        if table is None:
            return batch
        tid = batch[F.TASK_ID]
        known = (tid >= 0) & (tid < table.shape[0])
        return {**batch, F.TASK_ID: jnp.where(known, table[jnp.clip(tid, 0, table.shape[0] - 1)], -1)}
    return with_rows


def _backbone_ce(config, model, rows) -> LossFn:
    """The `backbone` stage: the plain backbone on the pretraining text's `full_inputs` (one text, never
    passages: no Fusion-in-Decoder)."""
    def loss_fn(params, batch, rng):
        return _ce(config, tagi_lib.concat_logits(model, params, batch, rng, passages=False), batch)
    return loss_fn


def _concat_ce(config, model, rows) -> LossFn:
    """The `concat` stage: the backbone on `full_inputs` (with `data.qa.num_passages`, the Fusion-in-Decoder reader)."""
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


def _alignment(config, model, generated, teacher, tbatch):
    """L_ins of generated adapters against each example's teacher row (`tbatch` has rows as task ids)."""
    t_adapters = tagi_lib.teacher_adapters(model, teacher, tbatch[F.TASK_ID])
    return losses.alignment_loss(generated, t_adapters, config.loss.alignment, config.loss.alignment_reduction)


def _distillation_terms(config, model, rows):
    """terms(params, batch, rng) -> (CE, KL or None, L_ins or None, CE metrics, generated adapters) of stage 2,
    on the {"student", "teacher"} tree; the KL teacher is the backbone with the task's LoRA teacher on
    `full_inputs` (the paper's equation) or the `concat` baseline (`loss.kl_teacher`)."""
    use_kl = float(config.loss.lambda_kl) != 0.0
    weight_ins = lambda_ins(config)
    use_ins = weight_ins == "sigmoid" or float(weight_ins) != 0.0
    kl_from_concat = config.loss.kl_teacher == "concat"

    def terms(params, batch, rng):
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
            l_ins = _alignment(config, model, generated, teacher, tbatch)
        return ce, kl, l_ins, metrics, generated
    return terms


def _distillation(config, model, rows) -> BatchNormalizedLoss:
    """Stage 2 (`finetune`): `CE + λ1·KL(teacher ‖ student) + λ2·L_ins` (`_distillation_terms`).

    CE and KL are means over the batch's target tokens, L_ins a mean over its examples and λ2 = sigmoid(L_ins)
    a function of the whole batch, so with microbatches each one contributes its share of every term under the
    batch's normalisers and the batch's λ2 (`BatchNormalizedLoss`): the gradient is that of the whole batch.
    """
    terms_fn = _distillation_terms(config, model, rows)
    lambda_kl, weight_ins = float(config.loss.lambda_kl), lambda_ins(config)

    def context_fn(params, batch, rng):
        context = {"tokens": jnp.sum(batch[F.DECODER_LOSS_WEIGHTS].astype(jnp.float32)),
                   "examples": jnp.float32(batch[F.DECODER_LOSS_WEIGHTS].shape[0])}
        if weight_ins == "sigmoid":  # the batch's L_ins (no decoder pass): generated vs teacher adapters
            student, teacher = params["student"], params["teacher"]
            generated, _, _ = tagi_lib.generate_adapters(model, student, batch[F.HYPER_ENCODER_INPUT_TOKENS])
            context["lambda_ins"] = jax.nn.sigmoid(_alignment(config, model, generated, teacher, rows(batch)))
        return context

    def share_fn(params, batch, rng, context):
        ce, kl, l_ins, metrics, generated = terms_fn(params, batch, rng)
        weight = weight_ins if context is None or l_ins is None or "lambda_ins" not in context else context["lambda_ins"]
        total, terms = losses.total_loss(ce, kl, l_ins, lambda_kl=lambda_kl, lambda_ins=weight)
        if context is not None:  # this microbatch's share of the batch's token- and example-means
            token_share = metrics[LOSS_WEIGHT] / jnp.maximum(context["tokens"], 1.0)
            example_share = batch[F.DECODER_LOSS_WEIGHTS].shape[0] / context["examples"]
            per_token = terms["cross_entropy"] + (terms["lambda_kl"] * terms["kl"] if kl is not None else 0.0)
            per_example = terms["lambda_ins"] * terms["l_ins"] if l_ins is not None else 0.0
            total = token_share * per_token + example_share * per_example
        metrics.update({k: v for k, v in terms.items() if k != "total"})
        metrics["adapter_sq_norm"] = losses.adapter_sq_norm(generated)
        return total, metrics
    return BatchNormalizedLoss(context_fn, share_fn)


def term_gradient_norms(config, model, rows) -> LossFn:
    """diagnostics(params, batch, rng) -> {"hypernet_grad_norm/<term>": ‖∂ term / ∂ hypernetwork‖} for the
    weighted terms CE, λ1·KL and λ2·L_ins of stage 2: how hard each pulls on the generator (one forward, one
    backward per term; the trainer runs it at log steps only)."""
    terms_fn = _distillation_terms(config, model, rows)
    names = ("ce", "kl", "l_ins")

    def diagnostics(params, batch, rng):
        def weighted(hypernet):
            student = {**params["student"], "hypernet": hypernet}
            ce, kl, l_ins, _, _ = terms_fn({**params, "student": student}, batch, rng)
            _, terms = losses.total_loss(ce, kl, l_ins, lambda_kl=float(config.loss.lambda_kl),
                                         lambda_ins=lambda_ins(config))
            zero = jnp.zeros((), jnp.float32)
            return jnp.stack([terms["cross_entropy"],
                              terms["lambda_kl"] * terms["kl"] if "kl" in terms else zero,
                              terms["lambda_ins"] * terms["l_ins"] if "l_ins" in terms else zero])
        jacobian = jax.jacrev(weighted)(params["student"]["hypernet"])  # every leaf [3, ...]
        return {f"hypernet_grad_norm/{name}": optax.tree.norm(jax.tree.map(lambda g, i=i: g[i], jacobian))
                for i, name in enumerate(names)}
    return diagnostics


OBJECTIVES = {
    "backbone": _backbone_ce,
    "concat": _concat_ce,
    "no_instruction": _no_instruction_ce,
    "teachers": _teachers_ce,
    "pretrain": _student_ce,
    "hint": _student_ce,
    "finetune": _distillation,
}


# What the trainer computes at log steps besides the loss: stage -> diagnostics builder.
DIAGNOSTICS = {"finetune": term_gradient_norms}


def make_loss_fn(stage: str, config, model: tagi_lib.TAGI, task_to_teacher: np.ndarray | None) -> LossFn:
    """loss_fn(params, batch, rng) -> (loss, metrics) for one stage (pure; the trainer compiles it).
    `task_to_teacher` maps task ids to rows of the teacher table."""
    if stage not in OBJECTIVES:
        raise ValueError(f"unknown stage {stage!r}")
    table = None if task_to_teacher is None else jnp.asarray(task_to_teacher, jnp.int32)
    return OBJECTIVES[stage](config, model, _teacher_rows(table))


def make_diagnostics_fn(stage: str, config, model: tagi_lib.TAGI, task_to_teacher: np.ndarray | None):
    """diagnostics(params, batch, rng) -> scalars for the stage's log steps, or None."""
    if stage not in DIAGNOSTICS:
        return None
    table = None if task_to_teacher is None else jnp.asarray(task_to_teacher, jnp.int32)
    return DIAGNOSTICS[stage](config, model, _teacher_rows(table))
