"""The run-config schema: every key a pipeline config may set, with its default, the model config built from
it, and the load-time checks of settings that cannot run together (each error names the key)."""
from __future__ import annotations

import copy
import dataclasses

import jax
from ml_collections import config_dict

from tagi_jax import features as F
from tagi_jax import losses
from tagi_jax import partitioning
from tagi_jax import vocab as vocab_lib
from tagi_jax.config import ConfigError, require_choice, require_int, require_path
from tagi_jax.data.benchmarks import BENCHMARKS, require_p3, require_vocabulary
from tagi_jax.data.qa_benchmarks import QA_BENCHMARKS, check_qa, fid_settings
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.tagi import FUSIONS
from tagi_jax.models import quantize
from tagi_jax.models.hypernet import HyperNetConfig
from tagi_jax.models.t5_config import ATTENTIONS, T5Config
from tagi_jax.run.stages import (BACKBONE_POLICIES, DEFAULT_INIT_FROM, METHODS, STAGES, section_names,
                                  stage_trainer_config)
from tagi_jax.trainer import config as trainer_config
from tasks import sni
from tasks.p3.datasets import MTEST11, T0_TRAIN_DATASETS
from tasks.synthetic.suite import SETTINGS as SYNTHETIC_SETTINGS

KL_TEACHERS = ("lora_teachers", "concat")


# `model` keys of the run, not of the architecture (`T5Config` takes the others).
RUN_MODEL_KEYS = ("checkpoint", "backbone_weights")


def _dataclass_section(cls) -> config_dict.ConfigDict:
    return config_dict.ConfigDict({f.name: f.default for f in dataclasses.fields(cls)})


def default_config() -> config_dict.ConfigDict:
    """Every key a pipeline config may set, with defaults (configs/*.py start from this)."""
    base = trainer_config.default_config()
    c = config_dict.ConfigDict()
    c.seed = 0
    c.prng_impl = base.prng_impl  # the per-step (dropout) RNG: see tagi_jax/trainer/config.py
    c.model = _dataclass_section(T5Config)
    c.model.checkpoint = ""  # a Hugging Face T5 directory to import the backbone from ("" = from scratch)
    # "int8": the backbone matmul kernels a stage freezes are stored as int8 with per-output-channel scales and
    # dequantised in the matmul (tagi_jax.models.quantize); kernels a stage trains stay float32.
    c.model.backbone_weights = "float"
    c.hypernet = _dataclass_section(HyperNetConfig)
    c.tagi = config_dict.ConfigDict({
        "fusion": "prepend",  # "prepend", "encoder_cross_attention" or "none" (tagi_jax.models.tagi)
        "separate_hyper_encoder": False,
        "teacher_rank": 32,
        "teacher_alpha": 32.0,
        "teachers_per": "task",  # "task" or "category"
        # What the TAGI stages (pretrain, finetune) train of the backbone: "none" (the paper), "norms_embeddings"
        # (the original code: RMS-norm scales and the shared embedding) or "all" (tagi_jax.run.stages).
        "train_backbone": "all",
        # "task": the hypernetwork reads each task's instruction (TAGI); "instance": each example's own
        # hyper_inputs (IAG: the question), so evaluation generates one adapter per example inside the step.
        "instruction_source": "task",
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
        # on the held-out sets at <eval_data_dir>/<dataset>/validation.jsonl (tasks/p3/, `launch/eval.py`
        # reads the same keys). Caps of 0 mean none; mixing_cap is T0's 500k (tasks.p3.register.register_p3_train).
        "p3": {"templates_dir": "", "train_data_dir": "", "eval_data_dir": "",
               "train_datasets": T0_TRAIN_DATASETS, "eval_datasets": MTEST11,
               "train_original_task_only": False, "eval_original_task_only": True,
               "max_train_examples_per_task": 0, "mixing_cap": 500_000},
        # Open-domain QA (IAG; tagi_jax.data.qa_benchmarks). `qa`: QA JSON Lines under `dir` (the layout of
        # shared/data/qa, tasks/qa.py QA_DATASETS), training rows from `train_file` (default: the dataset's train
        # split). Passages files: JSON Lines {"question", "passages": [...]}; the FiD reader (the concat stage,
        # the KL teacher with loss.kl_teacher = "concat") reads each question's first `num_passages` passages,
        # each encoded alone in `passage_length` tokens; `student_document` "imagined": the student also reads
        # the first document of `imagined_file`. Caps of 0 mean none.
        "qa": {"dir": "", "dataset": "nq_open", "train_file": "", "eval_split": "test", "passages_file": "",
               "num_passages": 0, "passage_length": 0, "imagined_file": "", "student_document": "none",
               "max_train_examples": 0, "max_eval_examples": 0},
        # The synthetic closed-book suite (tasks/synthetic_qa.py): entities whose facts the pretraining corpus
        # states (`corpus_copies` sentence orders of each entity's document); test questions ask held-out facts
        # (`test_entity_fraction` > 0: every fact of held-out entities, else `test_attributes_per_entity` of each).
        "synthetic_qa": {"seed": 0, "num_entities": 64, "test_attributes_per_entity": 1,
                         "test_entity_fraction": 0.0, "imagined_accuracy": 0.75, "corpus_copies": 4,
                         "vocab_size": 512},
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
        # "relative": ‖ΔW_gen − ΔW_teacher‖² / ‖ΔW_teacher‖² per example and target, averaged (scale-free: 1 when
        # nothing is generated); "mean": a per-element MSE per target, summed over targets (inert at real
        # shapes: ~2e-4 at T5-Base); "sum": the summed squared Frobenius norm (dominant: ~1e3). tagi_jax/losses.py.
        "alignment_reduction": "mean",
        "kl_teacher": "lora_teachers",  # or "concat": the instruction-concatenation stage's model
    })
    c.mesh = base.mesh
    c.distributed = base.distributed
    c.pipeline = config_dict.ConfigDict({
        "stages": STAGES,
        "evaluate": tuple(METHODS),
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


def with_run_compute(config: config_dict.ConfigDict, backbone: T5Config) -> T5Config:
    """An imported backbone's architecture with the run's compute settings (dtype, dropout, rematerialisation,
    attention implementation): the checkpoint says what the model is, the config how to run it."""
    return backbone.replace(dtype=config.model.dtype, dropout_rate=config.model.dropout_rate,
                            remat_policy=config.model.remat_policy, attention=config.model.attention)


def tagi_config(config: config_dict.ConfigDict, num_teachers: int, t5: T5Config | None = None
                ) -> tagi_lib.TAGIConfig:
    """The model config: backbone (`t5`, e.g. read from an imported checkpoint, else `config.model`),
    hypernetwork, fusion and teachers."""
    if t5 is None:
        model = {k: v for k, v in config.model.to_dict().items() if k not in RUN_MODEL_KEYS}
        try:
            t5 = T5Config(**model)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config key 'model': {e}") from None
    fid_passages, fid_length = fid_settings(config.data)
    try:
        hyper = HyperNetConfig(**config.hypernet.to_dict())
        return tagi_lib.TAGIConfig(
            t5=t5, hypernet=hyper, fusion=config.tagi.fusion, num_teachers=num_teachers,
            teacher_rank=config.tagi.teacher_rank, teacher_alpha=config.tagi.teacher_alpha,
            separate_hyper_encoder=config.tagi.separate_hyper_encoder,
            instruction_source=config.tagi.instruction_source, fid_passages=fid_passages,
            fid_passage_length=fid_length)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key 'hypernet'/'tagi': {e}") from None


def validate(config: config_dict.ConfigDict) -> None:
    """Stop before any work on settings that cannot run together; every message names the key."""
    stages = tuple(config.pipeline.stages)
    if not stages and not tuple(config.pipeline.evaluate):
        raise ConfigError("config keys 'pipeline.stages' and 'pipeline.evaluate' are both empty: nothing to run")
    for s in stages:
        if s not in STAGES:
            raise ConfigError(f"config key 'pipeline.stages': unknown stage {s!r} (known: {STAGES})")
    for m in config.pipeline.evaluate:
        if m not in METHODS:
            raise ConfigError(f"config key 'pipeline.evaluate': unknown method {m!r} (known: {tuple(METHODS)})")
    require_choice(config, "tagi.teachers_per", ("task", "category"))
    require_choice(config, "tagi.fusion", FUSIONS)
    require_choice(config, "tagi.instruction_source", tagi_lib.INSTRUCTION_SOURCES)
    require_choice(config, "tagi.train_backbone", BACKBONE_POLICIES)
    require_choice(config, "model.backbone_weights", quantize.BACKBONE_WEIGHTS)
    _validate_attention(config)
    _validate_data_paths(config)
    _validate_sizes(config)
    require_choice(config, "loss.alignment", ("delta", "factor"))
    require_choice(config, "loss.alignment_reduction", losses.ALIGNMENT_REDUCTIONS)
    require_choice(config, "loss.kl_teacher", KL_TEACHERS)
    lambda_ins(config)
    if config.loss.temperature <= 0:
        raise ConfigError(f"config key 'loss.temperature' must be > 0, got {config.loss.temperature}")
    if config.model.checkpoint:
        require_path(config, "model.checkpoint", kind="dir")

    for s in stages:
        section = config.stages[s]
        src = section.init_from
        if src and src not in STAGES:
            raise ConfigError(f"config key 'stages.{s}.init_from': unknown stage {src!r}")
        if s == "backbone" and config.model.checkpoint:
            raise ConfigError("config key 'pipeline.stages' runs 'backbone' (pretraining from scratch) although "
                              "'model.checkpoint' imports one; drop one of them")
        trainer_config.validate_trainer_config(stage_trainer_config(config, s), section_names=section_names(s))
    if not config.model.checkpoint:
        tagi_config(config, num_teachers=1)  # model settings are checked by the dataclasses


def _validate_attention(config) -> None:
    """`jax.nn.dot_product_attention` has no dropout on the attention weights, and cuDNN's kernel needs a GPU and
    16-bit compute: found at load time rather than as a silently different model or a kernel error."""
    attention = require_choice(config, "model.attention", ATTENTIONS)
    if attention != "einsum" and config.model.dropout_rate > 0:
        raise ConfigError(f"config key 'model.attention' is {attention!r}, which has no attention dropout, but "
                          f"'model.dropout_rate' is {config.model.dropout_rate}; set it to 0 or use 'einsum'")
    if attention == "cudnn":
        if config.model.dtype not in ("bfloat16", "float16"):
            raise ConfigError(f"config key 'model.attention' is 'cudnn', which needs 'model.dtype' bfloat16 or "
                              f"float16, not {config.model.dtype!r}")
        if jax.default_backend() != "gpu":
            raise ConfigError(f"config key 'model.attention' is 'cudnn' (a GPU kernel) but JAX runs on "
                              f"{jax.default_backend()!r}; use 'xla' or 'einsum'")


def _validate_sizes(config) -> None:
    """Lengths, suite sizes, evaluation settings and the mesh: found now rather than after training."""
    for section in ("data.lengths", "data.pretrain.lengths"):
        for name in F.TEXT_FEATURES:
            require_int(config, f"{section}.{name}", 2)  # room for a token and EOS
    for name in ("num_train_tasks", "train_instances_per_task", "eval_instances_per_task", "vocab_size"):
        require_int(config, f"data.synthetic.{name}", 1)
    require_int(config, "data.synthetic.num_unseen_tasks", 0)
    for name in ("batch_size", "max_decode_len", "beam_size", "max_examples_per_task"):
        require_int(config, f"eval.{name}", 1)
    try:
        partitioning.create_mesh(config.mesh.data, config.mesh.model)
    except ValueError as e:
        raise ConfigError(f"config keys 'mesh.data'/'mesh.model': {e}") from None


def _validate_data_paths(config) -> None:
    benchmark = require_choice(config, "data.benchmark", BENCHMARKS)
    vocab_spec = require_vocabulary(config, "data.vocabulary", benchmark)
    suite_key = "synthetic_qa" if benchmark == "synthetic_qa" else "synthetic"
    if (vocab_spec == vocab_lib.TRAINED and not config.model.checkpoint
            and config.data[suite_key].vocab_size > config.model.vocab_size):
        raise ConfigError(f"config key 'data.{suite_key}.vocab_size' ({config.data[suite_key].vocab_size}) "
                          f"exceeds 'model.vocab_size' ({config.model.vocab_size})")
    if benchmark in QA_BENCHMARKS:
        check_qa(config, benchmark)
    settings = {"synthetic": SYNTHETIC_SETTINGS, "sni": sni.SETTINGS}.get(benchmark)
    if settings is not None:
        require_choice(config, "data.setting", settings)
    if benchmark == "sni":
        require_path(config, "data.sni.dir", kind="dir")
    if benchmark == "p3":
        require_p3(config, "data.p3")
    source = config.data.pretrain.source
    if source and not source.startswith("tfds:"):
        require_path(config, "data.pretrain.source", kind="dir")
    if benchmark not in ("synthetic", "synthetic_qa") and not source and {"backbone", "pretrain"} & set(config.pipeline.stages):
        raise ConfigError("config key 'data.pretrain.source' is empty: name a text directory or 'tfds:c4/en'")


def lambda_ins(config) -> float | str:
    """λ2 as `loss.lambda_ins` sets it: "sigmoid" (λ2 = sigmoid(L_ins)) or a constant."""
    v = config.loss.lambda_ins
    if isinstance(v, (int, float)):
        return float(v)
    if v == "sigmoid":
        return v
    try:
        return float(v)
    except ValueError:
        raise ConfigError(f"config key 'loss.lambda_ins': {v!r} is neither 'sigmoid' nor a number") from None
