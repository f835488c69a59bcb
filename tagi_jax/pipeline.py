"""The TAGI training pipeline: every stage of the paper and every baseline, run by one partitioned trainer.

Stages (each a `Trainer` run in `<workdir>/<stage>/`, resumable, whose output seeds later stages):

  backbone        plain T5 on the pretraining text (`full_inputs` = a|b -> c); only for runs that start from
                  scratch (the demo starts from the `concat` stage instead). Real runs import a Hugging Face
                  checkpoint (`model.checkpoint`) instead.
  teachers        stage 0, "training with instance": one LoRA teacher per task (or per category) on the frozen
                  backbone, reading `full_inputs`; all teachers in one jitted step (a table indexed by task id).
  pretrain        stage 1: hypernetwork pretraining on a | b | c (a -> hypernetwork, b -> model, c target).
  finetune        stage 2: `CE + λ1·KL(teacher ‖ student) + λ2·L_ins`; the KL teacher is the backbone with the
                  task's LoRA teacher on `full_inputs` (the paper's equation) or the `concat` baseline.
  concat          baseline: instruction concatenation (Tk-Instruct style) on `full_inputs`.
  no_instruction  baseline: multitask training on `inputs` only.
  hint            baseline: the hypernetwork without distillation (CE only, HINT-like), from stage 1.

Every stage trains the same `TAGI` parameter tree (t5, hypernet, teachers) — what a stage does not use is
frozen (no optimizer state) — except `finetune`, whose tree is {"student": ..., "teacher": ...} with the teacher
frozen, so the KL teacher keeps the backbone it was trained on while the student's backbone moves.

With `tagi.fusion = "encoder_cross_attention"` the encoder-fusion blocks inside `t5/encoder/layers_<i>` exist
only in the trees of the stages that run the student (`FUSION_STAGES`; not in the finetune teacher): the
baselines and the backbone never read instruction states. They are trained as their own subtree "fusion" of
`STAGE_TRAINS`, and a stage that starts from a source without them (the backbone, concat, or a Hugging Face
import) keeps their fresh zero-output initialisation, so it starts from exactly its source's function.

Methods evaluated at the end and their stages: `METHOD_STAGE`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from ml_collections import config_dict

from tagi_jax import data as data_lib
from tagi_jax import features as F
from tagi_jax import losses
from tagi_jax import trainer as trainer_lib
from tagi_jax.config import ConfigError, require_choice
from tagi_jax.metrics import MTEST11
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.hypernet import HyperNetConfig
from tagi_jax.models.t5 import FUSION_ATTENTION, FUSION_NORM, is_encoder_fusion_param
from tagi_jax.models.t5_config import T5Config

STAGES = ("backbone", "teachers", "pretrain", "finetune", "concat", "no_instruction", "hint")
METHOD_STAGE = {"tagi": "finetune", "hint": "hint", "concat": "concat", "no_instruction": "no_instruction"}
METHODS = tuple(METHOD_STAGE)
# What each stage starts from: the stage whose output it continues (None: fresh or the imported checkpoint).
DEFAULT_INIT_FROM = {
    "backbone": "",
    "teachers": "backbone",
    "pretrain": "backbone",
    "finetune": "pretrain",
    "concat": "backbone",
    "no_instruction": "backbone",
    "hint": "pretrain",
}
# Which parameter subtrees each stage trains (everything else is frozen). "fusion" is the encoder-fusion blocks
# inside "t5" (`_SUBTREE_PATTERNS`); "t5" is the rest of the backbone.
STAGE_TRAINS = {
    "backbone": ("t5",),
    "teachers": ("teachers",),
    "pretrain": ("t5", "fusion", "hypernet", "hyper_encoder"),
    "finetune": ("t5", "fusion", "hypernet", "hyper_encoder"),
    "concat": ("t5",),
    "no_instruction": ("t5",),
    "hint": ("t5", "fusion", "hypernet", "hyper_encoder"),
}
# Stages whose model reads instruction states (the student): only their trees hold encoder-fusion blocks.
FUSION_STAGES = ("pretrain", "finetune", "hint")
_FUSION_PATH = rf"encoder/layers_\d+/(?:{FUSION_NORM}|{FUSION_ATTENTION})/"
# Regexes (after the optional "student/" prefix) matching each subtree's parameter paths.
_SUBTREE_PATTERNS = {
    "t5": f"t5/(?!{_FUSION_PATH})",
    "fusion": f"t5/{_FUSION_PATH}",
    "hypernet": "hypernet/",
    "hyper_encoder": "hyper_encoder/",
    "teachers": "teachers/",
}
PRETRAIN_DATA_STAGES = ("backbone", "pretrain")
KL_TEACHERS = ("lora_teachers", "concat")


# ------------------------------------------------------------------------------------------------ config
def _dataclass_section(cls) -> config_dict.ConfigDict:
    return config_dict.ConfigDict({f.name: f.default for f in dataclasses.fields(cls)})


def default_config() -> config_dict.ConfigDict:
    """Every key a pipeline config may set, with defaults (configs/*.py start from this)."""
    base = trainer_lib.default_config()
    c = config_dict.ConfigDict()
    c.seed = 0
    c.model = _dataclass_section(T5Config)
    c.model.checkpoint = ""  # a Hugging Face T5 directory to import the backbone from ("" = from scratch)
    c.hypernet = _dataclass_section(HyperNetConfig)
    c.tagi = config_dict.ConfigDict({
        "fusion": "prepend",  # "prepend", "encoder_cross_attention" or "none" (tagi_jax.models.tagi)
        "separate_hyper_encoder": False,
        "teacher_rank": 32,
        "teacher_alpha": 32.0,
        "teachers_per": "task",  # "task" or "category"
    })
    c.data = config_dict.ConfigDict({
        "benchmark": "synthetic",
        "vocabulary": "byte",
        "setting": "def_pos2",
        "lengths": {"inputs": 64, "hyper_inputs": 256, "full_inputs": 320, "targets": 32},
        # vocab_size: of the SentencePiece model trained on the suite when vocabulary = "synthetic_spm".
        "synthetic": {"seed": 0, "num_train_tasks": 360, "num_unseen_tasks": 90,
                      "train_instances_per_task": 100, "eval_instances_per_task": 100, "vocab_size": 1024},
        "sni": {"dir": "", "split": "default", "max_train_instances": 100, "max_test_instances": 100,
                "seed": 42, "skip_bad_tasks": False},
        # P3 (T0): training tasks = every template of each `train_datasets` entry (promptsource paths, data at
        # <train_data_dir>/<path>/train.jsonl with Hugging Face field names); evaluation = rank classification
        # on the held-out sets at <eval_data_dir>/<dataset>/validation.jsonl (tasks/p3.py, `launch/eval.py`
        # reads the same keys). Caps of 0 mean none; mixing_cap is T0's 500k (tasks.p3.register_p3_train).
        "p3": {"templates_dir": "", "train_data_dir": "", "eval_data_dir": "",
               "train_datasets": data_lib.T0_TRAIN_DATASETS, "eval_datasets": MTEST11,
               "train_original_task_only": False, "eval_original_task_only": True,
               "max_train_examples_per_task": 0, "mixing_cap": 500_000},
        "pretrain": {"source": "", "seed": 0, "min_words": 16,
                     "lengths": {"inputs": 64, "hyper_inputs": 128, "full_inputs": 192, "targets": 64}},
    })
    c.loss = config_dict.ConfigDict({
        "z_loss": 0.0,
        "label_smoothing": 0.0,
        "lambda_kl": 5.0,
        "lambda_ins": "sigmoid",  # "sigmoid" (the paper: λ2 = sigmoid(L_ins)) or a number as a string
        "temperature": 1.0,
        "alignment": "delta",  # "delta" (ΔW matrices) or "factor" (factor-wise MSE, the original code)
        # "mean": per-element mean of ‖ΔW_gen − ΔW_teacher‖² per target (an MSE, comparable across model
        # sizes), summed over targets; "sum": the summed squared Frobenius norm over layers and targets.
        "alignment_reduction": "mean",
        "kl_teacher": "lora_teachers",  # or "concat": the instruction-concatenation stage's model
    })
    c.mesh = base.mesh
    c.distributed = base.distributed
    c.pipeline = config_dict.ConfigDict({
        "stages": STAGES,
        "evaluate": METHODS,
    })
    c.stages = config_dict.ConfigDict()
    for stage in STAGES:
        c.stages[stage] = config_dict.ConfigDict({
            "init_from": DEFAULT_INIT_FROM[stage],
            "train": copy.deepcopy(base.train),
            "optimizer": copy.deepcopy(base.optimizer),
        })
    c.eval = config_dict.ConfigDict({
        "batch_size": 64,
        "max_decode_len": 128,
        "beam_size": 1,
        "max_examples_per_task": 100,
    })
    return c


def pretrained_backbone_config(hypernet_hidden_dim: int, teachers_per: str) -> config_dict.ConfigDict:
    """`default_config()` with what the paper configs (configs/sni_t5_lm.py, configs/p3_t0.py) share.

    A user-supplied T5-LM-adapt checkpoint and its spiece.model (both left empty: required), bfloat16 compute,
    dropout 0.1; rank-32 LoRA teachers and hypernetwork; hypernetwork pretraining on C4; λ1 = 5,
    λ2 = sigmoid(L_ins), KD temperature 3 against the LoRA teachers; all six stages, every one but finetune and
    hint (which continue from pretrain) starting from the checkpoint. Benchmark, steps and optimizer are theirs.
    """
    c = default_config()
    c.model.checkpoint = ""  # required: a local google/t5-<size>-lm-adapt directory (config.json + weights)
    c.model.dtype = "bfloat16"
    c.model.dropout_rate = 0.1
    c.hypernet.update(dict(rank=32, lora_alpha=32.0, hidden_dim=hypernet_hidden_dim, embed_dim=128,
                           dropout_rate=0.1))
    c.tagi.update(dict(fusion="prepend", teacher_rank=32, teacher_alpha=32.0, teachers_per=teachers_per))
    c.data.vocabulary = ""  # required: the backbone's spiece.model
    c.data.pretrain.update(dict(source="tfds:c4/en", min_words=64))
    c.data.pretrain.lengths.update(dict(inputs=512, hyper_inputs=1024, full_inputs=1024, targets=128))
    c.pipeline.stages = ("teachers", "pretrain", "finetune", "concat", "no_instruction", "hint")
    for stage in ("teachers", "pretrain", "concat", "no_instruction"):
        c.stages[stage].init_from = ""
    c.loss.update(dict(lambda_kl=5.0, lambda_ins="sigmoid", temperature=3.0, kl_teacher="lora_teachers"))
    return c


def tagi_config(config: config_dict.ConfigDict, num_teachers: int, t5: T5Config | None = None
                ) -> tagi_lib.TAGIConfig:
    """The model config: backbone (`t5`, e.g. read from an imported checkpoint, else `config.model`),
    hypernetwork, fusion and teachers."""
    if t5 is None:
        model = config.model.to_dict()
        model.pop("checkpoint", None)
        try:
            t5 = T5Config(**model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'model': {e}") from None
    try:
        hyper = HyperNetConfig(**config.hypernet.to_dict())
        return tagi_lib.TAGIConfig(
            t5=t5, hypernet=hyper, fusion=config.tagi.fusion, num_teachers=num_teachers,
            teacher_rank=config.tagi.teacher_rank, teacher_alpha=config.tagi.teacher_alpha,
            separate_hyper_encoder=config.tagi.separate_hyper_encoder)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'hypernet'/'tagi': {e}") from None


def validate(config: config_dict.ConfigDict) -> None:
    """Stop before any work on settings that cannot run together; every message names the key."""
    from tagi_jax.config import validate_trainer_config

    stages = tuple(config.pipeline.stages)
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"config key 'pipeline.stages': unknown stage {s!r} (known: {STAGES})")
    for m in config.pipeline.evaluate:
        if m not in METHODS:
            raise ConfigError(f"config key 'pipeline.evaluate': unknown method {m!r} (known: {METHODS})")
    require_choice(config, "tagi.teachers_per", ("task", "category"))
    _validate_data_paths(config)
    require_choice(config, "loss.alignment", ("delta", "factor"))
    require_choice(config, "loss.alignment_reduction", ("mean", "sum"))
    require_choice(config, "loss.kl_teacher", KL_TEACHERS)
    _lambda_ins(config)
    if config.loss.temperature <= 0:
        raise ConfigError(f"config key 'loss.temperature' must be > 0, got {config.loss.temperature}")
    if config.model.checkpoint:
        from tagi_jax.config import require_path
        require_path(config, "model.checkpoint", kind="dir")

    for s in stages:
        section = config.stages[s]
        src = section.init_from
        if src and src not in STAGES:
            raise ConfigError(f"config key 'stages.{s}.init_from': unknown stage {src!r}")
        if s == "backbone" and config.model.checkpoint:
            raise ConfigError("config key 'pipeline.stages' runs 'backbone' (pretraining from scratch) although "
                              "'model.checkpoint' imports one; drop one of them")
        validate_trainer_config(_stage_trainer_config(config, s), section_names=_section_names(s))
    if not config.model.checkpoint:
        tagi_config(config, num_teachers=1)  # model settings are checked by the dataclasses


def _validate_data_paths(config) -> None:
    from tagi_jax import vocab as vocab_lib
    from tagi_jax.config import require_path

    benchmark = require_choice(config, "data.benchmark", data_lib.BENCHMARKS)
    vocab_spec = data_lib.require_vocabulary(config, "data.vocabulary", benchmark)
    if (vocab_spec == vocab_lib.TRAINED and not config.model.checkpoint
            and config.data.synthetic.vocab_size > config.model.vocab_size):
        raise ConfigError(f"config key 'data.synthetic.vocab_size' ({config.data.synthetic.vocab_size}) "
                          f"exceeds 'model.vocab_size' ({config.model.vocab_size})")
    if benchmark == "sni":
        require_path(config, "data.sni.dir", kind="dir")
    if benchmark == "p3":
        data_lib.require_p3(config, "data.p3")
    source = config.data.pretrain.source
    if source and not source.startswith("tfds:"):
        require_path(config, "data.pretrain.source", kind="dir")
    if benchmark != "synthetic" and not source and {"backbone", "pretrain"} & set(config.pipeline.stages):
        raise ConfigError("config key 'data.pretrain.source' is empty: name a text directory or 'tfds:c4/en'")


def _lambda_ins(config) -> float | str:
    v = config.loss.lambda_ins
    if isinstance(v, (int, float)):
        return float(v)
    if v == "sigmoid":
        return v
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"config key 'loss.lambda_ins': {v!r} is neither 'sigmoid' nor a number") from None


def _stage_trainer_config(config, stage: str) -> config_dict.ConfigDict:
    """The trainer's view of one stage: seed, that stage's train/optimizer sections, mesh, distributed."""
    section = config.stages[stage]
    optimizer = copy.deepcopy(section.optimizer)
    with optimizer.unlocked():
        optimizer.frozen = tuple(optimizer.frozen) + _frozen_patterns(stage)
    return config_dict.ConfigDict({
        "seed": config.seed + STAGES.index(stage),
        "train": copy.deepcopy(section.train),
        "optimizer": optimizer,
        "mesh": copy.deepcopy(config.mesh),
        "distributed": copy.deepcopy(config.distributed),
    })


def _section_names(stage: str) -> dict[str, str]:
    """How the trainer's sections are called in the run config (for error messages)."""
    return {"train": f"stages.{stage}.train", "optimizer": f"stages.{stage}.optimizer"}


def _frozen_patterns(stage: str) -> tuple[str, ...]:
    trains = STAGE_TRAINS[stage]
    prefix = "student/" if stage == "finetune" else ""
    names = [s for s in _SUBTREE_PATTERNS if s not in trains]
    # One alternation, so a subtree the model lacks (hyper_encoder, teachers, fusion) is not a no-match error.
    frozen = (f"^{prefix}(?:{'|'.join(_SUBTREE_PATTERNS[s] for s in names)})",) if names else ()
    if stage == "finetune":
        frozen += ("^teacher/",)
    return frozen


# ------------------------------------------------------------------------------------------------ losses
def _weights(batch):
    return batch[F.DECODER_LOSS_WEIGHTS]


def _ce(config, logits, batch):
    ce, z, ntok = losses.cross_entropy(logits, batch[F.DECODER_TARGET_TOKENS], _weights(batch),
                                       z_loss=config.loss.z_loss, label_smoothing=config.loss.label_smoothing)
    return ce, {"cross_entropy": ce, "z_loss": z, trainer_lib.LOSS_WEIGHT: ntok}


def _adapter_sq_norm(adapters) -> jax.Array:
    """Mean over the batch of Σ_targets,layers ‖scale·A·B‖²_F (a zero 'teacher' in the alignment identity)."""
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    return losses.adapter_alignment(adapters, zeros, mode="delta")


def alignment_loss(generated, teacher, mode: str, reduction: str) -> jax.Array:
    """L_ins with the configured reduction (see `loss.alignment_reduction`)."""
    if reduction == "sum" or mode == "factor":
        return losses.adapter_alignment(generated, teacher, mode=mode)
    total = jnp.zeros((), jnp.float32)
    for target in sorted(generated):
        a, b = generated[target]["A"], generated[target]["B"]
        entries = a.shape[-3] * a.shape[-2] * b.shape[-1]  # layers · d_in · d_out
        total = total + losses.adapter_alignment({target: generated[target]}, {target: teacher[target]},
                                                 mode=mode) / entries
    return total


def make_loss_fn(stage: str, config, model: tagi_lib.TAGI, task_to_teacher: np.ndarray | None):
    """loss_fn(params, batch, rng) -> (loss, metrics) for one stage (pure; the trainer compiles it)."""
    table = None if task_to_teacher is None else jnp.asarray(task_to_teacher, jnp.int32)

    def with_teacher_rows(batch):
        if table is None:
            return batch
        tid = batch[F.TASK_ID]
        return {**batch, F.TASK_ID: jnp.where(tid >= 0, table[jnp.maximum(tid, 0)], 0)}

    if stage in ("backbone", "concat"):
        def loss_fn(params, batch, rng):
            return _ce(config, tagi_lib.concat_logits(model, params, batch, rng), batch)
    elif stage == "no_instruction":
        def loss_fn(params, batch, rng):
            return _ce(config, tagi_lib.no_instruction_logits(model, params, batch, rng), batch)
    elif stage == "teachers":
        def loss_fn(params, batch, rng):
            return _ce(config, tagi_lib.teacher_logits(model, params, with_teacher_rows(batch), rng), batch)
    elif stage in ("pretrain", "hint"):
        def loss_fn(params, batch, rng):
            logits, adapters = tagi_lib.student_forward(model, params, batch, rng)
            loss, metrics = _ce(config, logits, batch)
            metrics["adapter_sq_norm"] = _adapter_sq_norm(adapters)
            return loss, metrics
    elif stage == "finetune":
        lambda_ins = _lambda_ins(config)
        use_kl = float(config.loss.lambda_kl) != 0.0
        use_ins = lambda_ins == "sigmoid" or float(lambda_ins) != 0.0
        kl_from_concat = config.loss.kl_teacher == "concat"

        def loss_fn(params, batch, rng):
            student, teacher = params["student"], jax.lax.stop_gradient(params["teacher"])
            tbatch = with_teacher_rows(batch)
            logits, generated = tagi_lib.student_forward(model, student, batch, rng)
            ce, metrics = _ce(config, logits, batch)
            kl = l_ins = None
            if use_kl:
                t_logits = (tagi_lib.concat_logits(model, teacher, batch) if kl_from_concat
                            else tagi_lib.teacher_logits(model, teacher, tbatch))
                kl = losses.distillation_kl(logits, t_logits, _weights(batch), config.loss.temperature)
            if use_ins:
                t_adapters = tagi_lib.teacher_adapters(model, teacher, tbatch[F.TASK_ID])
                l_ins = alignment_loss(generated, t_adapters, config.loss.alignment,
                                       config.loss.alignment_reduction)
            total, terms = losses.total_loss(ce, kl, l_ins, lambda_kl=float(config.loss.lambda_kl),
                                             lambda_ins=lambda_ins)
            metrics.update({k: v for k, v in terms.items() if k != "total"})
            metrics["adapter_sq_norm"] = _adapter_sq_norm(generated)
            return total, metrics
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return loss_fn


# ------------------------------------------------------------------------------------------------ params
def _tree_config(model_cfg: tagi_lib.TAGIConfig, with_student: bool) -> tagi_lib.TAGIConfig:
    """The config whose tree a model part holds: without a student, no encoder-fusion blocks (the other
    fusions add no parameters)."""
    if model_cfg.fusion == "encoder_cross_attention" and not with_student:
        return model_cfg.replace(fusion="none")
    return model_cfg


def stage_init_fn(stage: str, model_cfg: tagi_lib.TAGIConfig) -> Callable[[jax.Array], Any]:
    """The boxed parameter tree of a stage (for the trainer's abstract/sharded init)."""
    own = _tree_config(model_cfg, stage in FUSION_STAGES)
    if stage == "finetune":
        teacher = _tree_config(model_cfg, False)

        def init_fn(rng):
            r1, r2 = jax.random.split(rng)
            return {"student": tagi_lib.init_params(own, r1), "teacher": tagi_lib.init_params(teacher, r2)}
        return init_fn
    return lambda rng: tagi_lib.init_params(own, rng)


def _stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def _has_checkpoint(workdir: str, stage: str) -> bool:
    d = os.path.join(_stage_dir(workdir, stage), "checkpoints")
    return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


def _require_stage_output(workdir: str, stage: str, needed_by: str) -> None:
    if not _has_checkpoint(workdir, stage):
        raise ConfigError(
            f"stage '{needed_by}' starts from stage '{stage}', which has no checkpoint in "
            f"{_stage_dir(workdir, stage)}: add '{stage}' to 'pipeline.stages' or change "
            f"'stages.{needed_by}.init_from'")


def _initial_sources(stage: str, config) -> list[tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """[(source stage, source path prefix, target path prefix)] that seed a stage's parameters."""
    src = config.stages[stage].init_from
    if stage == "finetune":
        kl_src = "concat" if config.loss.kl_teacher == "concat" else "teachers"
        out = []
        if src:
            out += [(src, ("t5",), ("student", "t5")), (src, ("hypernet",), ("student", "hypernet"))]
            if config.tagi.separate_hyper_encoder:
                out.append((src, ("hyper_encoder",), ("student", "hyper_encoder")))
        out += [(kl_src, ("t5",), ("teacher", "t5")), ("teachers", ("teachers",), ("teacher", "teachers"))]
        return out
    if not src:
        return []
    subtrees = ["t5"]
    if stage in ("pretrain", "hint", "teachers") and src in ("pretrain", "finetune", "hint"):
        subtrees.append("hypernet")
    if stage == "hint" and src == "pretrain" and config.tagi.separate_hyper_encoder:
        subtrees.append("hyper_encoder")
    if src == "teachers":
        subtrees.append("teachers")
    return [(src, (s,), (s,)) for s in subtrees]


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _set(tree[path[0]], path[1:], value)}


def _flat(tree) -> dict:
    return traverse_util.flatten_dict(tree)


def _like(tree, abstract):
    """`tree` cut to the parameters of `abstract` (a stage without a student drops the fusion blocks of the
    run's one fresh initialisation)."""
    flat = _flat(tree)
    return traverse_util.unflatten_dict({path: flat[path] for path in _flat(abstract)})


def _check_missing(missing, source: str, stage: str) -> None:
    """Only encoder-fusion blocks may be missing from a source: they keep their zero-output initialisation."""
    bad = [path for path in missing if not is_encoder_fusion_param(path)]
    if bad:
        raise ConfigError(f"stage '{stage}' starts from {source}, which has no parameter '{'/'.join(bad[0])}' "
                          f"({len(bad)} missing)")
    if missing:
        logging.info("stage %s: %d encoder-fusion parameters not in %s keep their fresh (zero-output) values",
                     stage, len(missing), source)


def _overlay_host(fresh, host, abstract, source: str, stage: str):
    """`fresh` (placed arrays) with every parameter of the host (numpy) tree put in its place, float32 with
    the abstract tree's shardings; parameters the host lacks keep their fresh value (`_check_missing`)."""
    out, host = _flat(fresh), _flat(host)
    abstract = _flat(abstract)
    _check_missing([path for path in abstract if path not in host], source, stage)
    for path, a in abstract.items():
        if path in host:
            out[path] = jax.device_put(np.asarray(host[path], np.float32), a.sharding)
    return traverse_util.unflatten_dict(out)


def build_initial_params(stage: str, ctx: "RunContext", trainer: trainer_lib.Trainer) -> Callable[[], Any] | None:
    """A thunk giving the stage's starting parameters: the run's one fresh initialisation overlaid with earlier
    stages' outputs (and the imported Hugging Face backbone), or None for a plain fresh init."""
    config, workdir, hf_params = ctx.config, ctx.workdir, ctx.hf_params
    sources = _initial_sources(stage, config)
    needs_hf = hf_params is not None and not any(t[-1] == "t5" for _, _, t in sources)
    for src, _, _ in sources:
        _require_stage_output(workdir, src, stage)

    def thunk():
        if stage == "finetune":
            params = {"student": ctx.fresh_params(), "teacher": ctx.fresh_params()}
        else:
            params = ctx.fresh_params()
        params = _like(params, trainer.abstract_params)
        if needs_hf:
            roots = [("student",), ("teacher",)] if stage == "finetune" else [()]
            checkpoint = f"model.checkpoint {config.model.checkpoint!r}"
            for root in roots:
                parts = [("t5", hf_params)]
                if config.tagi.separate_hyper_encoder:  # the instruction encoder starts as the imported encoder
                    parts.append(("hyper_encoder", {k: hf_params[k] for k in ("token_embedder", "encoder")}))
                for name, host in parts:
                    path = root + (name,)
                    params = _set(params, path, _overlay_host(_get(params, path), host,
                                                              _get(trainer.abstract_params, path), checkpoint, stage))
        by_source: dict[str, list] = {}
        for src, sp, tp in sources:
            by_source.setdefault(src, []).append((sp, tp))
        for src, pairs in by_source.items():
            src_dir = _stage_dir(workdir, src)
            saved = trainer_lib.saved_param_paths(src_dir)
            abstract = {}
            for sp, tp in pairs:
                wanted = _flat(_get(trainer.abstract_params, tp))
                _check_missing([p for p in wanted if sp + p not in saved], f"stage '{src}' ({src_dir})", stage)
                present = {p: a for p, a in wanted.items() if sp + p in saved}
                abstract = _set(abstract, sp, traverse_util.unflatten_dict(present))
            restored = trainer_lib.load_params(src_dir, abstract)
            for sp, tp in pairs:
                merged = {**_flat(_get(params, tp)), **_flat(_get(restored, sp))}
                params = _set(params, tp, traverse_util.unflatten_dict(merged))
        return params

    return thunk


# ------------------------------------------------------------------------------------------------ running
@dataclasses.dataclass
class RunContext:
    config: config_dict.ConfigDict
    workdir: str
    data: data_lib.DataInfo
    model_cfg: tagi_lib.TAGIConfig
    model: tagi_lib.TAGI
    task_to_teacher: np.ndarray
    mesh: Any
    rules: Any
    hf_params: Any = None
    _fresh: Any = None

    def fresh_params(self):
        """A copy of the run's one sharded fresh initialisation of the TAGI tree (compiled once, shared by every
        stage). A copy, because the trainer donates the state it starts from."""
        if self._fresh is None:
            from tagi_jax import partitioning

            rng = jax.random.fold_in(jax.random.key(int(self.config.seed)), 7)
            self._fresh, _, _ = partitioning.sharded_init(
                lambda r: tagi_lib.init_params(self.model_cfg, r), self.mesh, self.rules, rng)
        return jax.tree.map(lambda x: x.copy(), self._fresh)


def prepare(config: config_dict.ConfigDict, workdir: str) -> RunContext:
    """Validate, register the data, build the model; write the run config into the work directory."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    info = data_lib.register_benchmark(config.data, workdir)
    per = config.tagi.teachers_per
    rows = info.teacher_index(per)
    task_to_teacher = np.asarray([rows[t] for t in info.train_task_names], np.int32)
    hf_params = t5 = None
    if config.model.checkpoint:
        from tagi_jax import hf

        t5, hf_params = hf.load_t5(config.model.checkpoint, dtype=config.model.dtype)
        t5 = t5.replace(dropout_rate=config.model.dropout_rate)
    model_cfg = tagi_config(config, num_teachers=len(info.teacher_keys(per)), t5=t5)
    if info.vocabulary.vocab_size > model_cfg.t5.vocab_size:
        raise ConfigError(f"config key 'model.vocab_size': the model has {model_cfg.t5.vocab_size} embeddings but "
                          f"data.vocabulary has {info.vocabulary.vocab_size} ids")
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "model_config.json"), "w") as f:
            json.dump(model_cfg.t5.to_dict(), f, indent=1, sort_keys=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
        with open(os.path.join(workdir, "tasks.json"), "w") as f:
            json.dump({"train_task_names": list(info.train_task_names), "teachers_per": per,
                       "teacher_keys": list(info.teacher_keys(per)), "categories": dict(info.categories)},
                      f, indent=1)
    from tagi_jax import partitioning

    mesh = partitioning.create_mesh(config.mesh.data, config.mesh.model)
    rules = partitioning.logical_axis_rules(bool(config.mesh.fsdp))
    return RunContext(config, workdir, info, model_cfg, tagi_lib.TAGI(model_cfg), task_to_teacher, mesh, rules,
                      hf_params)


def run_stage(ctx: RunContext, stage: str, stop_at: int | None = None) -> dict:
    """Train one stage to `stages.<stage>.train.steps` (resuming if it has checkpoints); returns a record."""
    config = ctx.config
    stage_cfg = _stage_trainer_config(config, stage)
    loss_fn = make_loss_fn(stage, config, ctx.model, ctx.task_to_teacher)
    trainer = trainer_lib.Trainer(stage_cfg, workdir=_stage_dir(ctx.workdir, stage),
                                  init_fn=stage_init_fn(stage, ctx.model_cfg), loss_fn=loss_fn,
                                  section_names=_section_names(stage), mesh=ctx.mesh, rules=ctx.rules)
    initial = None if _has_checkpoint(ctx.workdir, stage) else build_initial_params(stage, ctx, trainer)
    is_pretrain = stage in PRETRAIN_DATA_STAGES
    mixture = ctx.data.pretrain_task if is_pretrain else ctx.data.train_mixture
    lengths = data_lib.pretrain_lengths(config.data) if is_pretrain else data_lib.task_lengths(config.data)
    host_bs = stage_cfg.train.batch_size // jax.process_count()
    host_slice = trainer_lib.host_batch_slice(stage_cfg.train.batch_size)

    def batches(start_step: int):
        return data_lib.train_batches(mixture, lengths, stage_cfg.train.batch_size, ctx.data.train_task_names,
                                      seed=stage_cfg.seed, start_step=start_step,
                                      host_slice=host_slice if host_bs != stage_cfg.train.batch_size else None)

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
    summary = evaluate_methods(ctx, tuple(config.pipeline.evaluate))
    return {"stages": records, "summary": summary}


# ------------------------------------------------------------------------------------------------ loading
def load_trained(workdir: str, method: str):
    """(config, model, params) of a trained method in a pipeline work directory (params = its TAGI tree)."""
    if method not in METHOD_STAGE:
        raise ValueError(f"unknown method {method!r} (known: {METHODS})")
    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{workdir}: no config.json (not a tagi_jax pipeline work directory)")
    config = load_workdir_config(workdir)
    stage = METHOD_STAGE[method]
    if not _has_checkpoint(workdir, stage):
        raise FileNotFoundError(f"{workdir}: method '{method}' has no checkpoint ({_stage_dir(workdir, stage)})")
    with open(os.path.join(workdir, "tasks.json")) as f:
        num_teachers = len(json.load(f)["teacher_keys"])
    with open(os.path.join(workdir, "model_config.json")) as f:
        t5 = T5Config.from_dict(json.load(f))
    model_cfg = tagi_config(config, num_teachers=num_teachers, t5=t5)
    model = tagi_lib.TAGI(model_cfg)
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(stage_init_fn(stage, model_cfg)(r)), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params = trainer_lib.load_params(_stage_dir(workdir, stage), abstract)
    if stage == "finetune":
        params = params["student"]
    return config, model, params


def load_workdir_config(workdir: str) -> config_dict.ConfigDict:
    """The run config saved in a work directory, merged over the defaults (so new keys get defaults)."""
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    config = default_config()
    _merge_into(config, saved)
    return config


def _merge_into(config: config_dict.ConfigDict, saved: Mapping) -> None:
    for key, value in saved.items():
        if key not in config:
            continue
        if isinstance(config[key], config_dict.ConfigDict) and isinstance(value, Mapping):
            _merge_into(config[key], value)
        else:
            current = config[key]
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            with config.unlocked():
                config[key] = value


# ------------------------------------------------------------------------------------------------ summary
def evaluate_methods(ctx: RunContext, methods: tuple[str, ...]) -> dict:
    """Each method on the benchmark's evaluation splits, written to summary.json: ROUGE-L / exact match for the
    generation benchmarks; for P3, rank-classification accuracy with the per-dataset means and the MTest11 /
    HyperT5 averages (`metrics.p3_summary`), the numbers T0 and the TAGI paper report."""
    from tagi_jax import evaluation

    config = ctx.config
    lengths = data_lib.task_lengths(config.data)
    rank = ctx.data.rank_classification
    per_task = config.eval.max_examples_per_task
    # Rank classification needs each example's answer choices and label: read every feature of the source.
    splits = {label: (evaluation.task_examples(mixture, None, per_task, ctx.data.categories) if rank
                      else data_lib.eval_examples(mixture, per_task))
              for label, mixture in ctx.data.eval_mixtures.items()}
    summary: dict[str, dict] = {}
    for method in methods:
        stage = METHOD_STAGE[method]
        if not _has_checkpoint(ctx.workdir, stage):
            logging.warning("summary: method %s has no trained stage %s; skipped", method, stage)
            continue
        _, model, params = load_trained(ctx.workdir, method)
        summary[method] = {}
        for label, examples in splits.items():
            cache = evaluation.AdapterCache(os.path.join(ctx.workdir, "adapter_cache"))
            if rank:
                records, metrics = evaluation.evaluate_rank_classification(
                    method, model, params, examples, ctx.data.vocabulary, lengths=lengths,
                    batch_size=config.eval.batch_size, cache=cache)
                summary[method][label] = {"accuracy": float(metrics["accuracy"]), **metrics.get("p3", {})}
            else:
                records, metrics = evaluation.evaluate(
                    method, model, params, examples, ctx.data.vocabulary, lengths=lengths,
                    batch_size=config.eval.batch_size, max_decode_len=config.eval.max_decode_len,
                    beam_size=config.eval.beam_size, categories=ctx.data.categories, cache=cache)
                summary[method][label] = {"rougeL": float(metrics["rougeL"]),
                                          "exact_match": float(metrics["exact_match"])}
            print(f"{method} / {label}: {evaluation.format_timing(metrics)}", flush=True)
            out_dir = os.path.join(ctx.workdir, "eval")
            os.makedirs(out_dir, exist_ok=True)
            with open(os.path.join(out_dir, f"{method}_{label}_predictions.jsonl"), "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
    if jax.process_index() == 0:
        with open(os.path.join(ctx.workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, sort_keys=True)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """The console table of summary.json: ROUGE-L / EM columns, or accuracy columns for rank classification."""
    labels = sorted({label for m in summary.values() for label in m}, key=lambda x: (x != "unseen", x))
    if any("accuracy" in m for by_label in summary.values() for m in by_label.values()):
        return _format_accuracy_summary(summary, labels)
    header = f"{'method':<16}" + "".join(f"{label + ' ROUGE-L':>16}{label + ' EM':>12}" for label in labels)
    lines = [header, "-" * len(header)]
    for method, by_label in summary.items():
        row = f"{method:<16}"
        for label in labels:
            m = by_label.get(label)
            row += f"{m['rougeL']:>16.1f}{m['exact_match']:>12.1f}" if m else f"{'-':>16}{'-':>12}"
        lines.append(row)
    return "\n".join(lines)


def _format_accuracy_summary(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], labels: list[str]) -> str:
    """Accuracy, the MTest11 / HyperT5 averages and each dataset's mean over its templates, per split label."""
    columns = []  # (header, label, getter)
    for label in labels:
        found = {ds for by_label in summary.values() for ds in (by_label.get(label) or {}).get("per_dataset", {})}
        columns += [(f"{label} acc", label, lambda m: m.get("accuracy")),
                    ("MTest11", label, lambda m: m.get("mtest11_average")),
                    ("HyperT5", label, lambda m: m.get("hypert5_average"))]
        for ds in [d for d in MTEST11 if d in found] + sorted(found - set(MTEST11)):
            columns.append((ds, label, lambda m, ds=ds: m.get("per_dataset", {}).get(ds)))
    widths = [max(9, len(h) + 2) for h, _, _ in columns]
    header = f"{'method':<16}" + "".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths))
    lines = [header, "-" * len(header)]
    for method, by_label in summary.items():
        row = f"{method:<16}"
        for (_, label, get), w in zip(columns, widths):
            value = get(by_label[label]) if label in by_label else None
            row += f"{value:>{w}.1f}" if value is not None else f"{'-':>{w}}"
        lines.append(row)
    missing = {d for by_label in summary.values() for m in by_label.values() for d in m.get("mtest11_missing", [])}
    missing = sorted(missing, key=MTEST11.index)
    if missing:
        lines.append(f"(not in the MTest11 average: {', '.join(missing)})")
    return "\n".join(lines)
