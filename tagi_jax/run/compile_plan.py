"""Ahead-of-time compilation of every stage of a run for a slice it does not have: per-chip memory, FLOPs and a
roofline step time, from abstract shapes only (no parameter is allocated, no data is read).

Each stage's train step is the trainer's own program (`StepProgram`, the run's mesh and logical axis rules laid
over the slice's devices); each evaluated method also gets its decoding program (adapters generated from the
instruction, then greedy or beam decoding with the key/value cache), the finetune stage its log-step diagnostics.
The memory figures are the compiler's (`memory_analysis()`): on abstract TPU devices the TPU compiler's.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import jax
import numpy as np
from ml_collections import config_dict

from tagi_jax import features as F
from tagi_jax import hf, partitioning
from tagi_jax.config import ConfigError
from tagi_jax.data.feature_converter import model_feature_shapes
from tagi_jax.data import batches as batches_lib
from tagi_jax.models import quantize
from tagi_jax.models import predict as predict_lib
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run.defaults import tagi_config, with_run_compute
from tagi_jax.run.objectives import make_diagnostics_fn, make_loss_fn
from tagi_jax.run.stages import (METHODS, PRETRAIN_DATA_STAGES, section_names, stage_init_for, stage_trainer_config,
                                  tree_config)
from tagi_jax.run.topologies import GIB, Topology
from tagi_jax.trainer.program import StepProgram

# Teacher rows of the paper's benchmarks when no data is at hand: SNI's default training split has 756 tasks in
# 60 categories (a task's first category), T0's training mixture 38 datasets.
TEACHER_ROWS = {("sni", "category"): 60, ("sni", "task"): 756, ("p3", "category"): 38}
TRAIN_TASKS = {"sni": 756, "p3": 38}


@dataclasses.dataclass
class ProgramReport:
    """One compiled program's per-chip figures (bytes) on one slice."""
    stage: str
    program: str  # "train", "decode" or "diagnostics"
    params: float
    opt_state: float
    batch: float
    arguments: float
    outputs: float
    aliased: float
    temporaries: float
    code: float
    flops: float  # per chip, from the compiled cost analysis
    bytes_accessed: float
    compile_seconds: float
    hbm: float
    float_params: float = 0.0  # `params` with the int8 backbone kernels in float32 (= params without int8)

    @property
    def total(self) -> float:
        """Peak bytes the program holds on a chip: live arguments and outputs (donated ones counted once),
        temporaries and the executable."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def roofline_seconds(self, topology: Topology) -> float:
        chip = topology.chip
        return max(self.flops / chip.peak_flops, self.bytes_accessed / chip.hbm_bandwidth)

    def fits(self, headroom: float) -> bool:
        return self.total <= headroom * self.hbm


def per_device_bytes(tree: Any) -> float:
    """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings (its shard of each leaf)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return float(total)


def backbone_for_plan(config: config_dict.ConfigDict, backbone: T5Config | None) -> T5Config | None:
    """The backbone architecture with the run's compute settings (dtype, dropout, rematerialisation)."""
    if backbone is None:
        return None
    return with_run_compute(config, backbone)


def read_backbone(path: str) -> T5Config:
    """The architecture in a T5 directory's config.json alone (no weight is read), tied as the file says."""
    hf_cfg, cfg_path = hf.read_hf_config(path)
    return hf.config_from_hf(hf_cfg, tied=bool(hf_cfg.get("tie_word_embeddings", True)), source=cfg_path)


def teacher_rows(config: config_dict.ConfigDict, num_teachers: int | None) -> tuple[int, int]:
    """(teacher rows, training tasks) of the run's benchmark, for the shapes of the table and the task map."""
    benchmark, per = config.data.benchmark, config.tagi.teachers_per
    tasks = TRAIN_TASKS.get(benchmark, int(config.data.synthetic.num_train_tasks))
    if num_teachers is None:
        num_teachers = TEACHER_ROWS.get((benchmark, per), tasks)
    return int(num_teachers), max(int(tasks), int(num_teachers))


def _compile(lowered) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start


def _report(stage, program, compiled, seconds, hbm, params, opt_state, batch) -> ProgramReport:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return ProgramReport(
        stage=stage, program=program, params=params, opt_state=opt_state, batch=batch,
        arguments=float(mem.argument_size_in_bytes), outputs=float(mem.output_size_in_bytes),
        aliased=float(mem.alias_size_in_bytes), temporaries=float(mem.temp_size_in_bytes),
        code=float(mem.generated_code_size_in_bytes), flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)), compile_seconds=seconds, hbm=hbm)


def _decode_program(method, stage_model: tagi_lib.TAGI, config: config_dict.ConfigDict):
    """decode(params, batch) -> tokens: what evaluating `method` runs per batch (adapter generation included)."""
    t5 = T5(stage_model.config.t5)
    eval_cfg = config.eval

    def decode(params, batch):
        if method.generates_adapters:
            inputs = tagi_lib.student_decoding_inputs(stage_model, params, batch)
        else:
            key = F.FULL_ENCODER_INPUT_TOKENS if method.encoder_input == F.FULL_INPUTS else F.ENCODER_INPUT_TOKENS
            inputs = {"encoder_input_tokens": batch[key]}
        tokens, _ = predict_lib.predict(
            t5, params["t5"], max_decode_len=int(eval_cfg.max_decode_len), beam_size=int(eval_cfg.beam_size),
            eos_id=int(stage_model.config.t5.eos_token_id),
            decoder_start_token_id=int(stage_model.config.t5.decoder_start_token_id), **inputs)
        return tokens
    return decode


def plan_stage(config: config_dict.ConfigDict, stage: str, model_cfg: tagi_lib.TAGIConfig,
               task_to_teacher: np.ndarray, mesh, rules, hbm: float,
               with_diagnostics: bool = True) -> list[ProgramReport]:
    """Compile `stage`'s train step (and its methods' decoding, the finetune diagnostics) on `mesh`."""
    model = tagi_lib.TAGI(model_cfg)
    stage_cfg = stage_trainer_config(config, stage)
    diagnostics_fn = make_diagnostics_fn(stage, config, model, task_to_teacher) if with_diagnostics else None
    program = StepProgram(stage_cfg, init_fn=stage_init_for(config, stage, model_cfg),
                          loss_fn=make_loss_fn(stage, config, model, task_to_teacher), mesh=mesh, rules=rules,
                          section_names=section_names(stage), diagnostics_fn=diagnostics_fn)
    lengths = (batches_lib.pretrain_lengths(config.data) if stage in PRETRAIN_DATA_STAGES
               else batches_lib.task_lengths(config.data))
    batch = program.abstract_batch(model_feature_shapes(lengths, int(stage_cfg.train.batch_size)))
    params_bytes = per_device_bytes(program.abstract_params)
    opt_bytes = per_device_bytes(program.abstract_state.opt_state)
    batch_bytes = per_device_bytes(batch)
    compiled, seconds = _compile(program.lower_train_step(batch))
    reports = [_report(stage, "train", compiled, seconds, hbm, params_bytes, opt_bytes, batch_bytes)]
    reports[0].float_params = per_device_bytes(quantize.float_abstract(program.abstract_params))

    if program.diagnostics is not None:
        with program.context():
            lowered = program.diagnostics.lower(program.abstract_params, batch, program.abstract_rng)
        compiled, seconds = _compile(lowered)
        reports.append(_report(stage, "diagnostics", compiled, seconds, hbm, params_bytes, 0.0, batch_bytes))

    for name, method in METHODS.items():
        if method.stage != stage or name not in tuple(config.pipeline.evaluate):
            continue
        student_tree = stage == "finetune"
        params = program.abstract_params["student"] if student_tree else program.abstract_params
        tree_cfg = tree_config(model_cfg, with_student=method.generates_adapters, with_teachers=False)
        eval_batch = program.abstract_batch(model_feature_shapes(batches_lib.task_lengths(config.data),
                                                                 int(config.eval.batch_size)))
        eval_batch = {k: v for k, v in eval_batch.items()
                      if k in (F.ENCODER_INPUT_TOKENS, F.HYPER_ENCODER_INPUT_TOKENS, F.FULL_ENCODER_INPUT_TOKENS)}
        decode = jax.jit(_decode_program(method, tagi_lib.TAGI(tree_cfg), config),
                         in_shardings=(jax.tree.map(lambda x: x.sharding, params), program.data_sharding),
                         out_shardings=program.data_sharding)
        with program.context():
            lowered = decode.lower(params, eval_batch)
        compiled, seconds = _compile(lowered)
        reports.append(_report(stage, f"decode {name}", compiled, seconds, hbm, per_device_bytes(params), 0.0,
                               per_device_bytes(eval_batch)))
    return reports


def plan(config: config_dict.ConfigDict, devices: Sequence, hbm: float, *, backbone: T5Config | None = None,
         stages: Sequence[str] | None = None, num_teachers: int | None = None, on_report=None,
         with_diagnostics: bool = True) -> list[ProgramReport]:
    """Compile every stage of `config.pipeline.stages` (or `stages`) for `devices`; `on_report(report)` is called
    as each program is compiled. The backbone is `backbone` (e.g. read from a checkpoint's config.json, or a
    published architecture) or, without one, `config.model`."""
    rows, tasks = teacher_rows(config, num_teachers)
    model_cfg = tagi_config(config, num_teachers=rows, t5=backbone_for_plan(config, backbone))
    task_to_teacher = np.arange(tasks, dtype=np.int32) % rows
    try:
        mesh = partitioning.create_mesh(config.mesh.data, config.mesh.model, devices=devices)
    except ValueError as e:
        raise ConfigError(f"config keys 'mesh.data'/'mesh.model': {e}") from None
    rules = partitioning.logical_axis_rules(bool(config.mesh.fsdp))
    reports = []
    for stage in (stages or tuple(config.pipeline.stages)):
        for report in plan_stage(config, stage, model_cfg, task_to_teacher, mesh, rules, hbm, with_diagnostics):
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports


HEADER = (f"{'stage':<15} {'program':<20} {'params':>7} {'opt':>7} {'batch':>7} {'temp':>7} {'total':>7} "
          f"{'HBM':>6}  {'fits':<4} {'TFLOP':>8} {'roofline':>9} {'compile':>8}")


def format_report(r: ProgramReport, topology: Topology | None, headroom: float) -> str:
    """One table line: GiB per chip, whether it fits, TFLOP per chip per step, roofline step time."""
    g = lambda b: f"{b / GIB:7.2f}"  # noqa: E731
    roofline = f"{r.roofline_seconds(topology) * 1e3:7.1f}ms" if topology is not None else f"{'-':>9}"
    return (f"{r.stage:<15} {r.program:<20} {g(r.params)} {g(r.opt_state)} {g(r.batch)} {g(r.temporaries)} "
            f"{g(r.total)} {r.hbm / GIB:6.1f}  {'yes' if r.fits(headroom) else 'NO':<4} {r.flops / 1e12:8.2f} "
            f"{roofline} {r.compile_seconds:7.1f}s")
