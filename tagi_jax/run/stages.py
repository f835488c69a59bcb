"""The stage and method tables: what each stage trains, starts from and freezes, the parameter tree it holds, the
trainer's view of its config, and which stage holds each evaluated method.

Stages (each a `Trainer` run in `<workdir>/<stage>/`, resumable, whose output seeds later stages):

  backbone        plain T5 on the pretraining text (`full_inputs` = a|b -> c); only for runs that start from
                  scratch without a `concat` backbone. Real runs import a Hugging Face checkpoint instead.
  teachers        stage 0: one LoRA teacher per task (or category) on the frozen backbone, reading `full_inputs`.
  pretrain        stage 1: hypernetwork pretraining on a | b | c (a -> hypernetwork, b -> model, c target).
  finetune        stage 2: `CE + λ1·KL(teacher ‖ student) + λ2·L_ins` (`tagi_jax.run.objectives`).
  concat          baseline: instruction concatenation (Tk-Instruct style) on `full_inputs`.
  no_instruction  baseline: multitask training on `inputs` only.
  hint            baseline: the hypernetwork without distillation (CE only, HINT-like), from stage 1.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import jax
from ml_collections import config_dict

from tagi_jax import features as F
from tagi_jax.models import quantize
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.t5 import FUSION_ATTENTION, FUSION_NORM, is_encoder_fusion_param

STAGES = ("backbone", "teachers", "pretrain", "finetune", "concat", "no_instruction", "hint")


@dataclasses.dataclass(frozen=True)
class Method:
    """An evaluated method: the stage whose checkpoint holds it, the text its encoder reads, and whether it
    generates adapters from the instruction (`hyper_inputs`)."""

    stage: str
    encoder_input: str
    generates_adapters: bool


METHODS = {
    "tagi": Method("finetune", F.INPUTS, True),
    "hint": Method("hint", F.INPUTS, True),
    "concat": Method("concat", F.FULL_INPUTS, False),
    "no_instruction": Method("no_instruction", F.INPUTS, False),
}


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return METHODS[method]


# What each stage starts from: the stage whose output it continues ("": fresh or the imported checkpoint).
DEFAULT_INIT_FROM = {
    "backbone": "",
    "teachers": "backbone",
    "pretrain": "backbone",
    "finetune": "pretrain",
    "concat": "backbone",
    "no_instruction": "backbone",
    "hint": "pretrain",
}
# How much of the backbone the TAGI student stages (`pretrain`, `finetune`) train, `tagi.train_backbone`: the
# paper keeps the LLM frozen ("none"); the original code trains the norms and the shared embedding
# ("norms_embeddings"); IAG's code also trains the feed-forward blocks ("ffn_norms_embeddings": 139 M of
# T5-Base's 220 M, which IAG found necessary for closed-book QA); "all" trains every backbone weight. The
# baselines and HINT always train all of it.
BACKBONE_POLICIES = ("none", "norms_embeddings", "ffn_norms_embeddings", "all")
POLICY_STAGES = ("pretrain", "finetune")
_STUDENT = ("fusion", "hypernet", "hyper_encoder")
_BACKBONE = {"none": (), "norms_embeddings": ("norms_embeddings",),
             "ffn_norms_embeddings": ("ffn", "norms_embeddings"), "all": ("t5", "ffn", "norms_embeddings")}
# Which parameter subtrees each stage trains (everything else is frozen: no optimizer state). "fusion" is the
# encoder-fusion blocks inside "t5", "norms_embeddings" its RMS-norm scales and shared embedding, "ffn" its
# feed-forward blocks, "t5" the rest (attention and the output projection).
STAGE_TRAINS = {
    "backbone": _BACKBONE["all"],
    "teachers": ("teachers",),
    "pretrain": _BACKBONE["all"] + _STUDENT,
    "finetune": _BACKBONE["all"] + _STUDENT,
    "concat": _BACKBONE["all"],
    "no_instruction": _BACKBONE["all"],
    "hint": _BACKBONE["all"] + _STUDENT,
}
# Stages whose model reads instruction states (the student): only their trees hold encoder-fusion blocks (with
# `tagi.fusion = "encoder_cross_attention"`); the baselines, the backbone and the finetune teacher never read
# instruction states. A stage that starts from a source without the blocks keeps their fresh zero-output
# initialisation, so it starts from exactly its source's function.
FUSION_STAGES = ("pretrain", "finetune", "hint")
_FUSION_PATH = rf"encoder/layers_\d+/(?:{FUSION_NORM}|{FUSION_ATTENTION})/"
_NORM_OR_EMBEDDING = r"token_embedder/|(?:encoder|decoder)/(?:layers_\d+/[a-z_]*layer_norm|encoder_norm|decoder_norm)/"
_FFN = r"(?:encoder|decoder)/layers_\d+/mlp/"
# Regexes (after the optional "student/" prefix) matching each subtree's parameter paths; they are disjoint.
SUBTREE_PATTERNS = {
    "t5": f"t5/(?!{_FUSION_PATH}|{_NORM_OR_EMBEDDING}|{_FFN})",
    "ffn": f"t5/{_FFN}",
    "norms_embeddings": f"t5/(?!{_FUSION_PATH})(?:{_NORM_OR_EMBEDDING})",
    "fusion": f"t5/{_FUSION_PATH}",
    "hypernet": "hypernet/",
    "hyper_encoder": "hyper_encoder/",
    "teachers": "teachers/",
}
PRETRAIN_DATA_STAGES = ("backbone", "pretrain")  # stages trained on the pretraining task, not the benchmark


def stage_trains(stage: str, train_backbone: str = "all") -> tuple[str, ...]:
    """The subtrees `stage` trains under the `tagi.train_backbone` policy."""
    if stage in POLICY_STAGES:
        return _BACKBONE[train_backbone] + _STUDENT
    return STAGE_TRAINS[stage]


def frozen_patterns(stage: str, train_backbone: str = "all") -> tuple[str, ...]:
    """The optimizer's `frozen` regexes that freeze what `stage` does not train (and the finetune teacher)."""
    trains = stage_trains(stage, train_backbone)
    prefix = "student/" if stage == "finetune" else ""
    # Only the stage-0 tree and the finetune teacher hold the teacher table (see TEACHER_STAGES); the latter is
    # frozen whole below, so no other tree has a table to freeze.
    names = [s for s in SUBTREE_PATTERNS if s not in trains and s != "teachers"]
    # One alternation, so a subtree the model lacks (hyper_encoder, fusion) is not a no-match error.
    frozen = (f"^{prefix}(?:{'|'.join(SUBTREE_PATTERNS[s] for s in names)})",) if names else ()
    if stage == "finetune":
        frozen += ("^teacher/",)
    return frozen


def section_names(stage: str) -> dict[str, str]:
    """How the trainer's sections are called in the run config (for error messages)."""
    return {"train": f"stages.{stage}.train", "optimizer": f"stages.{stage}.optimizer"}


def stage_trainer_config(config: config_dict.ConfigDict, stage: str) -> config_dict.ConfigDict:
    """The trainer's view of one stage: seed, that stage's train/optimizer sections, mesh, distributed."""
    section = config.stages[stage]
    optimizer = copy.deepcopy(section.optimizer)
    with optimizer.unlocked():
        optimizer.frozen = tuple(optimizer.frozen) + frozen_patterns(stage, config.tagi.get("train_backbone", "all"))
    return config_dict.ConfigDict({
        "seed": config.seed + STAGES.index(stage),
        "prng_impl": config.prng_impl,
        "train": copy.deepcopy(section.train),
        "optimizer": optimizer,
        "mesh": copy.deepcopy(config.mesh),
        "distributed": copy.deepcopy(config.distributed),
    })


# Stages whose model reads the teacher table: only their trees hold it (the finetune teacher's, not its student).
TEACHER_STAGES = ("teachers", "finetune")


def tree_config(model_cfg: tagi_lib.TAGIConfig, with_student: bool, with_teachers: bool) -> tagi_lib.TAGIConfig:
    """The config whose tree a model part holds: without a student, no encoder-fusion blocks (the other
    fusions add no parameters); without teachers, no teacher table."""
    if model_cfg.fusion == "encoder_cross_attention" and not with_student:
        model_cfg = model_cfg.replace(fusion="none")
    if not with_teachers:
        model_cfg = model_cfg.replace(num_teachers=0)
    return model_cfg


def backbone_kernel(path) -> bool:
    """A backbone matmul kernel `model.backbone_weights = "int8"` may store as int8 (not an encoder-fusion block)."""
    return quantize.is_backbone_kernel(path) and not is_encoder_fusion_param(tuple(path))


def int8_selector(stage: str, train_backbone: str = "all") -> Callable[[tuple], bool]:
    """The backbone kernels `stage` freezes: with `model.backbone_weights = "int8"` it holds them as int8."""
    frozen = quantize.matching(frozen_patterns(stage, train_backbone))
    return lambda path: backbone_kernel(path) and frozen(path)


def stage_init_fn(stage: str, model_cfg: tagi_lib.TAGIConfig, backbone_weights: str = "float",
                  train_backbone: str = "all") -> Callable[[jax.Array], Any]:
    """`_stage_init_fn`, with the backbone kernels the stage freezes stored as int8 when `backbone_weights` is
    "int8" (`tagi_jax.models.quantize`; shapes and logical axis names follow, so abstract init and shardings do)."""
    init = _stage_init_fn(stage, model_cfg)
    if backbone_weights != "int8":
        return init
    select = int8_selector(stage, train_backbone)
    return lambda rng: quantize.quantize_params(init(rng), select)


def stage_init_for(config, stage: str, model_cfg: tagi_lib.TAGIConfig) -> Callable[[jax.Array], Any]:
    """`stage_init_fn` under a run config's `model.backbone_weights` and `tagi.train_backbone`."""
    return stage_init_fn(stage, model_cfg, config.model.get("backbone_weights", "float"),
                         config.tagi.get("train_backbone", "all"))


def _stage_init_fn(stage: str, model_cfg: tagi_lib.TAGIConfig) -> Callable[[jax.Array], Any]:
    """The boxed parameter tree of a stage (for the trainer's abstract/sharded init, and a stage's fresh values).

    Every stage trains a `TAGI` tree (t5, hypernet; teachers in stage 0) with what it does not use frozen, except
    `finetune`, whose tree is {"student": ..., "teacher": ...} with the teacher frozen, so the KL teacher keeps
    the backbone it was trained on while the student's backbone moves. Both halves use the same rng: flax derives
    each parameter's initial value from its path, so every tree has the same fresh values where paths agree.
    """
    if stage == "finetune":
        student = tree_config(model_cfg, with_student=True, with_teachers=False)
        teacher = tree_config(model_cfg, with_student=False, with_teachers=True)
        return lambda rng: {"student": tagi_lib.init_params(student, rng), "teacher": tagi_lib.init_params(teacher, rng)}
    own = tree_config(model_cfg, with_student=stage in FUSION_STAGES, with_teachers=stage == "teachers")
    return lambda rng: tagi_lib.init_params(own, rng)
