"""The TAGI model: a T5 backbone, a hypernetwork that writes its LoRA adapters, and (optionally) the table of
stage-0 LoRA teachers, plus the pure functions of (params, batch, rng) the trainer and evaluation call.

Pure functions never jit: the trainer compiles them. Dropout is on iff an `rng` is given.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from tagi_jax import features as F
from tagi_jax.models import fid
from tagi_jax.models.hypernet import HyperNetConfig, HyperNetwork, masked_mean_pool
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import DictConfig, T5Config
from tagi_jax.models.teachers import TeacherTable

FUSIONS = ("prepend", "encoder_cross_attention", "none")
# What the hypernetwork reads: each task's instruction ("task": one adapter per task, generated once and cached
# at evaluation) or each example's own text ("instance", IAG: one adapter per example, generated inside the
# compiled evaluation step). Training generates per example either way.
INSTRUCTION_SOURCES = ("task", "instance")

Batch = Mapping[str, jax.Array]
# (adapters, instruction_states [b, n, d_model], instruction_mask [b, n]) from `generate_adapters`.
Generated = tuple[dict, jax.Array, jax.Array]


@dataclasses.dataclass(frozen=True)
class TAGIConfig(DictConfig):
    """Backbone, hypernetwork, fusion and teacher settings of one TAGI model (validated on creation)."""
    _unknown_keys_message = "tagi: unknown keys"
    t5: T5Config = dataclasses.field(default_factory=T5Config)
    hypernet: HyperNetConfig = dataclasses.field(default_factory=HyperNetConfig)
    fusion: str = "prepend"
    num_teachers: int = 0            # rows of the stage-0 teacher table (tasks or categories); 0 = none
    teacher_rank: int = 32
    teacher_alpha: float = 32.0      # teacher scale = teacher_alpha / teacher_rank
    separate_hyper_encoder: bool = False  # own T5 encoder for instructions instead of the backbone's
    instruction_source: str = "task"  # INSTRUCTION_SOURCES
    # Fusion-in-Decoder for what reads `full_encoder_input_tokens` (teachers, the concat baseline / FiD reader):
    # up to `fid_passages` EOS-terminated passages, each encoded alone in a slot of `fid_passage_length`
    # tokens (`tagi_jax.models.fid.fid_layout`); 0 = the plain encoder over the whole sequence.
    fid_passages: int = 0
    fid_passage_length: int = 0

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            raise ValueError(f"tagi.fusion: {self.fusion!r} is not one of {FUSIONS}")
        if self.instruction_source not in INSTRUCTION_SOURCES:
            raise ValueError(f"tagi.instruction_source: {self.instruction_source!r} is not one of "
                             f"{INSTRUCTION_SOURCES}")
        if self.fid_passages < 0 or (self.fid_passages > 0) != (self.fid_passage_length >= 2):
            raise ValueError(f"data.qa: num_passages ({self.fid_passages}) and passage_length "
                             f"({self.fid_passage_length}) must both be set (>= 1 and >= 2) or both be 0")
        if self.num_teachers < 0:
            raise ValueError(f"tagi.num_teachers must be >= 0, got {self.num_teachers}")
        if self.teacher_rank <= 0:
            raise ValueError(f"tagi.teacher_rank must be positive, got {self.teacher_rank}")
        if self.teacher_alpha <= 0:
            raise ValueError(f"tagi.teacher_alpha must be positive, got {self.teacher_alpha}")
        self.hypernet.validate_for(self.t5)

    @property
    def adapter_targets(self) -> tuple[str, ...]:
        """Targets of generated adapters and of teachers (one tuple: L_ins compares them target by target)."""
        return self.hypernet.adapter_targets

    @property
    def uses_instruction_states(self) -> bool:
        """Whether the student reads the encoded instruction besides the adapters (any fusion but "none")."""
        return self.fusion != "none"

    @property
    def teacher_scale(self) -> float:
        return self.teacher_alpha / self.teacher_rank

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TAGIConfig":
        cls._check_keys(d)
        d = dict(d)
        if isinstance(d.get("t5"), Mapping):
            d["t5"] = T5Config.from_dict(d["t5"])
        if isinstance(d.get("hypernet"), Mapping):
            d["hypernet"] = HyperNetConfig.from_dict(d["hypernet"])
        return cls(**d)


def fusion_kwargs(fusion: str, states: Optional[jax.Array], mask: Optional[jax.Array]) -> dict[str, Any]:
    """T5 keyword arguments (`__call__`, `predict.predict`, `predict.score_targets`) that carry the encoded
    instruction to where `fusion` reads it: the one place that routes instruction states by fusion kind.

    * "prepend" (default, the original code's): the decoder cross-attends to the encoded instruction
      prepended to the encoded input (`extra_encoder_states` of `T5.decode`);
    * "encoder_cross_attention" (the paper's): every encoder layer cross-attends to the encoded instruction
      after its self-attention (`encoder_fusion_states` of `T5.encode`). The sub-block's output projection
      starts at zero, so at initialisation the model computes what the backbone it was loaded from computed;
    * "none": the instruction reaches the model only through the generated adapters (the setting that
      exports exactly as a PEFT LoRA).
    """
    prepend, encoder = fusion == "prepend", fusion == "encoder_cross_attention"
    return {
        "extra_encoder_states": states if prepend else None,
        "extra_encoder_mask": mask if prepend else None,
        "encoder_fusion_states": states if encoder else None,
        "encoder_fusion_mask": mask if encoder else None,
    }


def _require(batch: Batch, key: str, what: str) -> jax.Array:
    if key not in batch:
        raise KeyError(f"{what}: batch has no feature {key!r} (has {sorted(batch)})")
    return batch[key]


class TAGI(nn.Module):
    """Backbone + hypernetwork (+ teacher table).

    Parameter tree (top level)::

        {"t5": <a plain T5 tree, tagi_jax.models.t5>,          # backbone; also encodes instructions by default
         "hypernet": <tagi_jax.models.hypernet.HyperNetwork>,
         "teachers": {<target>: {"A": [tasks, ...], "B": ...}},  # only if num_teachers > 0
         "hyper_encoder": {"token_embedder", "encoder"}}         # only if separate_hyper_encoder

    With fusion "encoder_cross_attention" every `t5/encoder/layers_<i>` also holds the fusion sub-block
    (`pre_instruction_attention_layer_norm`, `instruction_attention`; see `tagi_jax.models.t5`).

    `params["t5"]` is an ordinary T5 parameter tree (plus the fusion sub-blocks above, which a Hugging Face
    export refuses), so Hugging Face imports, `lora.merge_adapter` and `tagi_jax.models.predict.predict(
    T5(config.t5), params["t5"], ...)` work on it unchanged; `student_decoding_inputs` gives `predict` the
    generated adapters and the fused instruction states.
    """
    config: TAGIConfig

    def setup(self):
        cfg = self.config
        self.t5 = T5(cfg.t5)
        self.hypernet = HyperNetwork(cfg.hypernet, cfg.t5)
        # A separate encoder is a T5 of which only `encode` is ever called: only its embedding and encoder
        # get parameters.
        self.hyper_encoder = T5(cfg.t5) if cfg.separate_hyper_encoder else None
        self.teachers = (
            TeacherTable(cfg.t5, cfg.adapter_targets, cfg.num_teachers, cfg.teacher_rank, cfg.teacher_alpha)
            if cfg.num_teachers > 0 else None
        )

    def generate_adapters(self, hyper_tokens: jax.Array, enable_dropout: bool = False) -> Generated:
        """Instructions [b, n] -> (adapters pytree, instruction states [b, n, d_model], mask [b, n]).

        One encoder pass serves both the hypernetwork (padding-aware mean pool) and the fusion states. The
        backbone's encoder runs *without* adapters or fusion here: the instruction is read by the plain model.
        """
        encoder = self.hyper_encoder if self.hyper_encoder is not None else self.t5
        states = encoder.encode(hyper_tokens, adapters=None, enable_dropout=enable_dropout)
        adapters = self.hypernet(masked_mean_pool(states, hyper_tokens), enable_dropout=enable_dropout)
        return adapters, states, hyper_tokens > 0

    def student_logits(self, batch: Batch, adapters, instruction_states=None, instruction_mask=None,
                       enable_dropout: bool = False) -> jax.Array:
        """The backbone with generated adapters on `encoder_input_tokens` (the instance only), fused."""
        if self.config.uses_instruction_states and instruction_states is None:
            raise ValueError(f"student_logits: fusion={self.config.fusion!r} needs the instruction states from "
                             "generate_adapters")
        return self.t5(
            _require(batch, F.ENCODER_INPUT_TOKENS, "student"), _require(batch, F.DECODER_INPUT_TOKENS, "student"),
            batch.get(F.DECODER_TARGET_TOKENS), adapters=adapters, enable_dropout=enable_dropout,
            **fusion_kwargs(self.config.fusion, instruction_states, instruction_mask),
        )

    def student(self, batch: Batch, enable_dropout: bool = False) -> tuple[jax.Array, dict]:
        """Generate adapters from `hyper_encoder_input_tokens` and run the student: (logits, adapters)."""
        adapters, states, mask = self.generate_adapters(
            _require(batch, F.HYPER_ENCODER_INPUT_TOKENS, "student"), enable_dropout)
        return self.student_logits(batch, adapters, states, mask, enable_dropout), adapters

    def teacher_adapters(self, task_id: jax.Array) -> dict:
        """Each example's own teacher LoRA (rows of the table gathered by `task_id`)."""
        if self.teachers is None:
            raise ValueError("teacher_adapters: the model has no teacher table (set tagi.num_teachers > 0)")
        return self.teachers(task_id)

    def teacher_logits(self, batch: Batch, enable_dropout: bool = False) -> jax.Array:
        """The backbone with the task's teacher LoRA reading `full_encoder_input_tokens` (the paper's teacher)."""
        adapters = self.teacher_adapters(_require(batch, F.TASK_ID, "teacher"))
        return self.full_logits(
            _require(batch, F.FULL_ENCODER_INPUT_TOKENS, "teacher"), _require(batch, F.DECODER_INPUT_TOKENS, "teacher"),
            batch.get(F.DECODER_TARGET_TOKENS), adapters=adapters, enable_dropout=enable_dropout,
        )

    def full_logits(self, tokens, decoder_input_tokens, decoder_target_tokens=None, adapters=None,
                    enable_dropout: bool = False) -> jax.Array:
        """The backbone on full inputs: Fusion-in-Decoder over their passages when `fid_passages` is set (each
        passage encoded alone, the decoder attending to all), else the plain encoder-decoder."""
        cfg = self.config
        if not cfg.fid_passages:
            return self.t5(tokens, decoder_input_tokens, decoder_target_tokens, adapters=adapters,
                           enable_dropout=enable_dropout)
        n, length = cfg.fid_passages, cfg.fid_passage_length
        laid = fid.fid_layout(tokens, n, length, cfg.t5.eos_token_id)
        batch = laid.shape[0]
        encoded = self.t5.encode(laid.reshape(batch * n, length),
                                 adapters=fid.passage_adapters(cfg.t5, adapters, batch, n),
                                 enable_dropout=enable_dropout)
        return self.t5.decode(encoded.reshape(batch, n * length, encoded.shape[-1]), laid, decoder_input_tokens,
                              decoder_target_tokens, adapters=adapters, enable_dropout=enable_dropout)

    def backbone_logits(self, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens=None,
                        adapters=None, enable_dropout: bool = False) -> jax.Array:
        """The plain backbone (baselines): no hypernetwork, no fusion, optional given adapters."""
        return self.t5(encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, adapters=adapters,
                       enable_dropout=enable_dropout)

    def __call__(self, batch: Batch, enable_dropout: bool = False) -> jax.Array:
        """Touches every submodule (for `init`): the student, and the teachers when there are any."""
        logits, _ = self.student(batch, enable_dropout)
        if self.teachers is not None:
            self.teacher_logits(batch, enable_dropout)
        return logits


# --------------------------------------------------------------------------------------------------------
# Pure functions of (params, batch, rng).
# --------------------------------------------------------------------------------------------------------


def _rngs(rng: Optional[jax.Array]):
    return None if rng is None else {"dropout": rng}


def _fold(rng: Optional[jax.Array], i: int) -> Optional[jax.Array]:
    return None if rng is None else jax.random.fold_in(rng, i)


def dummy_batch(config: TAGIConfig, batch_shapes: Mapping[str, Any] | None = None) -> dict[str, jax.Array]:
    """Int32 inputs for `init` (parameter shapes do not depend on lengths; default batch 1, length 4).

    `batch_shapes` maps model features to shapes (tuples, arrays or ShapeDtypeStructs).
    """
    shapes = {key: (1, 4) for key in F.MODEL_FEATURES}
    shapes[F.TASK_ID] = (1,)
    for key, value in (batch_shapes or {}).items():
        shapes[key] = tuple(getattr(value, "shape", value))
    batch = {key: jnp.ones(shape, jnp.int32) for key, shape in shapes.items() if key != F.TASK_ID}
    batch[F.TASK_ID] = jnp.zeros(shapes[F.TASK_ID], jnp.int32)
    return batch


def init_params(config: TAGIConfig, rng: jax.Array, batch_shapes: Mapping[str, Any] | None = None):
    """The boxed parameter tree (`nn.LogicallyPartitioned` leaves), for `partitioning.sharded_init`:

        sharded_init(lambda r: init_params(config, r, shapes), mesh, rules, rng)
    """
    return TAGI(config).init({"params": rng}, dummy_batch(config, batch_shapes))["params"]


def generate_adapters(model: TAGI, params, hyper_tokens: jax.Array, rng: Optional[jax.Array] = None) -> Generated:
    """(adapters, instruction_states, instruction_mask) for a batch of instructions, one batched call."""
    return model.apply({"params": params}, hyper_tokens, enable_dropout=rng is not None, rngs=_rngs(rng),
                       method=TAGI.generate_adapters)


def student_logits(model: TAGI, params, batch: Batch, generated: Optional[Generated] = None,
                   rng: Optional[jax.Array] = None) -> jax.Array:
    """Logits of the backbone with generated adapters on `encoder_input_tokens` (+ fusion).

    `generated` (from `generate_adapters`) is computed here when not given.
    """
    if generated is None:
        generated = generate_adapters(model, params, _require(batch, F.HYPER_ENCODER_INPUT_TOKENS, "student"),
                                      _fold(rng, 0))
    adapters, states, mask = generated
    return model.apply({"params": params}, batch, adapters, states, mask, enable_dropout=rng is not None,
                       rngs=_rngs(_fold(rng, 1)), method=TAGI.student_logits)


def student_forward(model: TAGI, params, batch: Batch, rng: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
    """(student logits, generated adapters) in one call: what CE, KL and L_ins need."""
    return model.apply({"params": params}, batch, enable_dropout=rng is not None, rngs=_rngs(rng),
                       method=TAGI.student)


def teacher_adapters(model: TAGI, params, task_id: jax.Array) -> dict:
    """The teacher LoRA of each example's task (adapters pytree with a batch axis)."""
    return model.apply({"params": params}, task_id, method=TAGI.teacher_adapters)


def teacher_logits(model: TAGI, params, batch: Batch, rng: Optional[jax.Array] = None) -> jax.Array:
    """Backbone + the task's teacher LoRA on `full_encoder_input_tokens`. Deterministic unless `rng` (stage 0)."""
    return model.apply({"params": params}, batch, enable_dropout=rng is not None, rngs=_rngs(rng),
                       method=TAGI.teacher_logits)


def concat_logits(model: TAGI, params, batch: Batch, rng: Optional[jax.Array] = None, adapters=None,
                  passages: bool = True) -> jax.Array:
    """The instruction-concatenation baseline: backbone on `full_encoder_input_tokens`, no generated adapters
    (optionally a given shared LoRA, for the LoRA variant of the baseline); a Fusion-in-Decoder reader over
    their passages when the model sets `fid_passages` (and `passages`: False reads them as one text)."""
    return model.apply(
        {"params": params}, _require(batch, F.FULL_ENCODER_INPUT_TOKENS, "concat"),
        _require(batch, F.DECODER_INPUT_TOKENS, "concat"), batch.get(F.DECODER_TARGET_TOKENS), adapters,
        enable_dropout=rng is not None, rngs=_rngs(rng),
        method=TAGI.full_logits if passages else TAGI.backbone_logits)


def no_instruction_logits(model: TAGI, params, batch: Batch, rng: Optional[jax.Array] = None,
                          adapters=None) -> jax.Array:
    """The no-instruction baseline: backbone on `encoder_input_tokens` only."""
    return model.apply(
        {"params": params}, _require(batch, F.ENCODER_INPUT_TOKENS, "no_instruction"),
        _require(batch, F.DECODER_INPUT_TOKENS, "no_instruction"), batch.get(F.DECODER_TARGET_TOKENS), adapters,
        enable_dropout=rng is not None, rngs=_rngs(rng), method=TAGI.backbone_logits)


def student_decoding_inputs(model: TAGI, params, batch: Batch) -> dict[str, Any]:
    """Keyword arguments for `tagi_jax.models.predict.predict(T5(config.t5), params["t5"], **inputs, ...)`:
    the instance tokens, the generated adapters and the instruction states routed by `fusion_kwargs` (the
    encoder reads them once per batch under encoder fusion; under "prepend" `predict` projects their
    cross-attention keys/values once per batch, before the decoding loop; tagi_jax.eval.decode, which holds
    one row per task, once per task)."""
    adapters, states, mask = generate_adapters(
        model, params, _require(batch, F.HYPER_ENCODER_INPUT_TOKENS, "student"))
    return {
        "encoder_input_tokens": _require(batch, F.ENCODER_INPUT_TOKENS, "student"),
        "adapters": adapters,
        **fusion_kwargs(model.config.fusion, states, mask),
    }
