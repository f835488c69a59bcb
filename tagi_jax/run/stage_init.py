"""How a stage starts: the run's one fresh initialisation overlaid with earlier stages' outputs (`init_from`,
the finetune teacher's sources) and the imported Hugging Face backbone; parameters a source lacks may only be
encoder-fusion blocks, which keep their zero-output initialisation."""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from tagi_jax.config import ConfigError
from tagi_jax.models import quantize
from tagi_jax.models.t5 import is_encoder_fusion_param
from tagi_jax.run.defaults import lambda_ins
from tagi_jax.run.workdir import has_checkpoint, stage_dir
from tagi_jax.trainer import checkpoints


def _require_stage_output(workdir: str, stage: str, needed_by: str) -> None:
    if not has_checkpoint(workdir, stage):
        raise ConfigError(
            f"stage '{needed_by}' starts from stage '{stage}', which has no checkpoint in "
            f"{stage_dir(workdir, stage)}: add '{stage}' to 'pipeline.stages' or change "
            f"'stages.{needed_by}.init_from'")


def uses_teacher_table(config) -> bool:
    """Whether stage 2 reads the stage-0 teacher table: as its KL teacher, or for L_ins. IAG's setting (the
    KL from the FiD / concat reader, `loss.lambda_ins` 0) does not, so it needs no `teachers` stage (the
    finetune teacher's table then keeps its fresh values, never read)."""
    return config.loss.kl_teacher != "concat" or lambda_ins(config) != 0.0


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
        out.append((kl_src, ("t5",), ("teacher", "t5")))
        if uses_teacher_table(config):
            out.append(("teachers", ("teachers",), ("teacher", "teachers")))
        return out
    if not src:
        return []
    subtrees = ["t5"]
    if stage in ("pretrain", "hint", "teachers") and src in ("pretrain", "finetune", "hint"):
        subtrees.append("hypernet")
    if stage == "hint" and src == "pretrain" and config.tagi.separate_hyper_encoder:
        subtrees.append("hyper_encoder")
    if src == "teachers" and stage == "teachers":  # only stage 0's own tree holds a teacher table
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


def _check_missing(missing, source: str, stage: str) -> None:
    """Only encoder-fusion blocks may be missing from a source: they keep their zero-output initialisation."""
    bad = [path for path in missing if not is_encoder_fusion_param(path)]
    if bad:
        raise ConfigError(f"stage '{stage}' starts from {source}, which has no parameter '{'/'.join(bad[0])}' "
                          f"({len(bad)} missing)")
    if missing:
        logging.info("stage %s: %d encoder-fusion parameters not in %s keep their fresh (zero-output) values",
                     stage, len(missing), source)


def overlay_host(fresh, host, abstract, source: str, stage: str):
    """`fresh` (placed arrays) with every parameter of the host (numpy) tree put in its place, in the abstract
    tree's dtype and shardings (kernels the abstract tree holds as int8 quantised on the host first); parameters
    the host lacks keep their fresh value (`_check_missing`)."""
    host = _flat(quantize.match_quantization(host, abstract))
    out, abstract = _flat(fresh), _flat(abstract)
    _check_missing([path for path in abstract if path not in host], source, stage)
    for path, a in abstract.items():
        if path in host:
            out[path] = jax.device_put(np.asarray(host[path], a.dtype), a.sharding)
    return traverse_util.unflatten_dict(out)


def _to_target(restored, target_abstract):
    """`restored` quantised/dequantised where the target stores kernels otherwise, placed in its shardings."""
    converted = _flat(quantize.match_quantization(restored, target_abstract))
    flat_target = _flat(target_abstract)
    return traverse_util.unflatten_dict(
        {p: jax.device_put(x, flat_target[p].sharding) if p in flat_target else x for p, x in converted.items()})


def build_initial_params(stage: str, ctx, trainer) -> Callable[[], Any] | None:
    """A thunk giving the stage's starting parameters: the run's one fresh initialisation overlaid with earlier
    stages' outputs (and the imported Hugging Face backbone). `ctx` is the pipeline's `RunContext` (config,
    workdir, hf_params, fresh_params(stage)), `trainer` the stage's (its `abstract_params` with shardings)."""
    config, workdir, hf_params = ctx.config, ctx.workdir, ctx.hf_params
    sources = _initial_sources(stage, config)
    needs_hf = hf_params is not None and not any(t[-1] == "t5" for _, _, t in sources)
    for src, _, _ in sources:
        _require_stage_output(workdir, src, stage)

    def thunk():
        params = ctx.fresh_params(stage)
        if needs_hf:
            roots = [("student",), ("teacher",)] if stage == "finetune" else [()]
            checkpoint = f"model.checkpoint {config.model.checkpoint!r}"
            for root in roots:
                parts = [("t5", hf_params)]
                if config.tagi.separate_hyper_encoder:  # the instruction encoder starts as the imported encoder
                    parts.append(("hyper_encoder", {k: hf_params[k] for k in ("token_embedder", "encoder")}))
                for name, host in parts:
                    path = root + (name,)
                    params = _set(params, path, overlay_host(_get(params, path), host,
                                                             _get(trainer.abstract_params, path), checkpoint, stage))
        by_source: dict[str, list] = {}
        for src, sp, tp in sources:
            by_source.setdefault(src, []).append((sp, tp))
        for src, pairs in by_source.items():
            src_dir = stage_dir(workdir, src)
            saved = checkpoints.saved_param_paths(src_dir)
            abstract = {}
            for sp, tp in pairs:
                wanted = _flat(_get(trainer.abstract_params, tp))
                as_saved = quantize.as_stored(wanted, saved, sp)
                _check_missing([p for p in as_saved if sp + p not in saved], f"stage '{src}' ({src_dir})", stage)
                present = {p: a for p, a in as_saved.items() if sp + p in saved}
                abstract = _set(abstract, sp, traverse_util.unflatten_dict(present))
            restored = checkpoints.load_params(src_dir, abstract)
            for sp, tp in pairs:
                part = _to_target(_get(restored, sp), _get(trainer.abstract_params, tp))
                merged = {**_flat(_get(params, tp)), **_flat(part)}
                params = _set(params, tp, traverse_util.unflatten_dict(merged))
        return params

    return thunk
