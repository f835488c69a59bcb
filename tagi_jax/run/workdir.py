"""A pipeline work directory: where each stage lives, which have checkpoints, the run files saved beside them
(config.json, model_config.json, tasks.json), and loading a trained method from it (what evaluation, the API
and the export read, without the training driver)."""
from __future__ import annotations

import json
import os
from typing import Mapping

import flax.linen as nn
import jax
from ml_collections import config_dict

from tagi_jax.run.defaults import default_config, tagi_config
from tagi_jax.run.stages import check_method, stage_init_fn
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.t5_config import T5Config
from tagi_jax.trainer import checkpoints

CONFIG_FILE, MODEL_CONFIG_FILE, TASKS_FILE = "config.json", "model_config.json", "tasks.json"


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def has_checkpoint(workdir: str, stage: str) -> bool:
    return checkpoints.has_checkpoint(stage_dir(workdir, stage))


def write_run_files(workdir: str, config: config_dict.ConfigDict, model_cfg: tagi_lib.TAGIConfig,
                    train_task_names, teachers_per: str, teacher_keys, categories: Mapping[str, str]) -> None:
    """The files a trained method is loaded from: the run config, the backbone config (it may come from an
    imported checkpoint) and the teacher table's rows (process 0 only)."""
    if jax.process_index() != 0:
        return
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(model_cfg.t5.to_dict(), f, indent=1, sort_keys=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    with open(os.path.join(workdir, TASKS_FILE), "w") as f:
        json.dump({"train_task_names": list(train_task_names), "teachers_per": teachers_per,
                   "teacher_keys": list(teacher_keys), "categories": dict(categories)}, f, indent=1)


def load_workdir_config(workdir: str) -> config_dict.ConfigDict:
    """The run config saved in a work directory, merged over the defaults (so new keys get defaults)."""
    with open(os.path.join(workdir, CONFIG_FILE)) as f:
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


def load_trained(workdir: str, method: str):
    """(config, model, params) of a trained method in a pipeline work directory (params = its TAGI tree)."""
    stage = check_method(method).stage
    if not os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        raise FileNotFoundError(f"{workdir}: no config.json (not a tagi_jax pipeline work directory)")
    config = load_workdir_config(workdir)
    if not has_checkpoint(workdir, stage):
        raise FileNotFoundError(f"{workdir}: method '{method}' has no checkpoint ({stage_dir(workdir, stage)})")
    with open(os.path.join(workdir, TASKS_FILE)) as f:
        num_teachers = len(json.load(f)["teacher_keys"])
    with open(os.path.join(workdir, MODEL_CONFIG_FILE)) as f:
        t5 = T5Config.from_dict(json.load(f))
    model_cfg = tagi_config(config, num_teachers=num_teachers, t5=t5)
    model = tagi_lib.TAGI(model_cfg)
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(stage_init_fn(stage, model_cfg)(r)), jax.random.key(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    params = checkpoints.load_params(stage_dir(workdir, stage), abstract)
    if stage == "finetune":
        params = params["student"]
    return config, model, params
