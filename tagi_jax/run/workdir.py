"""A pipeline work directory: where each stage lives, which have checkpoints, the run files saved beside them
(config.json, model_config.json, tasks.json), and loading a trained method from it (what evaluation, the API
and the export read, without the training driver)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Mapping

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
from ml_collections import config_dict

from tagi_jax.config import ConfigError
from tagi_jax.models import quantize
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run.defaults import default_config, tagi_config
from tagi_jax.run.stages import STAGES, backbone_kernel, check_method, stage_init_for
from tagi_jax.trainer import checkpoints

CONFIG_FILE, MODEL_CONFIG_FILE, TASKS_FILE = "config.json", "model_config.json", "tasks.json"
RUN_FILE = "run.json"  # what the run wrote: config.json's hash (hand edits are detected) and the changes it allowed
# Settings a resumed run may change whatever has been trained: how long, how often to log and save, what to
# evaluate and on which devices. `stages.<s>.*` may also change while stage <s> has no checkpoint yet.
HARMLESS_KEYS = ("pipeline.stages", "pipeline.evaluate", "eval.", "mesh.", "distributed.")
BACKBONE_KEY = "model.backbone_weights"
HARMLESS_TRAIN_KEYS = ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "eval_every", "progress_bar")
# Loss settings only the stages that use them depend on (the others, z_loss and label smoothing, every stage's CE).
LOSS_STAGES = {"lambda_kl": ("finetune",), "lambda_ins": ("finetune",), "temperature": ("finetune",),
               "alignment": ("finetune",), "alignment_reduction": ("finetune",), "kl_teacher": ("finetune",)}


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, stage)


def has_checkpoint(workdir: str, stage: str) -> bool:
    return checkpoints.has_checkpoint(stage_dir(workdir, stage))


def training_progress(workdir: str, method: str, config: config_dict.ConfigDict) -> dict:
    """{} when the stage holding `method` was trained to its `train.steps`, else {"complete": False, "step":
    the newest checkpoint's step, "steps": the configured steps} (e.g. a run stopped halfway)."""
    stage = check_method(method).stage
    steps = checkpoints.saved_steps(stage_dir(workdir, stage))
    target = int(config.stages[stage].train.steps)
    if steps and steps[-1] >= target:
        return {}
    return {"complete": False, "step": steps[-1] if steps else 0, "steps": target}


def _config_text(config: config_dict.ConfigDict) -> str:
    return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _harmless(key: str, started: set[str]) -> bool:
    if key.startswith(HARMLESS_KEYS):
        return True
    parts = key.split(".")
    if parts[0] == "stages" and len(parts) > 2:
        return parts[1] not in started or (parts[2] == "train" and parts[-1] in HARMLESS_TRAIN_KEYS)
    if parts[0] == "loss" and len(parts) == 2:
        return not set(LOSS_STAGES.get(parts[1], STAGES)) & started
    return False


def check_resume(workdir: str, config: config_dict.ConfigDict) -> dict[str, list]:
    """Before a run writes anything into an existing work directory: the settings it changes, {key: [saved,
    new]}. A `ConfigError` lists the keys that contradict what is already trained there (shapes, data,
    objectives of started stages), and reports a config.json edited by hand since the run wrote it."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        saved_text = f.read()
    record = _read_record(workdir)
    if record.get("config_sha256") not in (None, _sha256(saved_text)):
        raise ConfigError(f"{path} was changed by hand after the run wrote it: put the file back, or pass the "
                          "settings as --config.key=value overrides, or start a new work directory")
    try:
        saved = _flat(json.loads(saved_text))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}): restore it or start a new work directory") from None
    new = _flat(json.loads(_config_text(config)))
    changed = {k: [saved.get(k), new.get(k)] for k in sorted(set(saved) | set(new)) if saved.get(k) != new.get(k)}
    started = {s for s in STAGES if has_checkpoint(workdir, s)}
    # The backbone's storage is a property of each stage's checkpoint (later stages convert what they read), so
    # it may change unless a stage this run trains is already started.
    rerun = set(config.pipeline.stages) & started
    blocking = [k for k in changed if not _harmless(k, started) and (k != BACKBONE_KEY or rerun)] if started else []
    if blocking:
        shown = ", ".join(f"{k} ({changed[k][0]!r} -> {changed[k][1]!r})" for k in blocking[:6])
        more = f" and {len(blocking) - 6} more" if len(blocking) > 6 else ""
        raise ConfigError(f"work directory {workdir} was trained with other settings: {shown}{more}; use a new "
                          "--workdir, or run with the saved settings (its config.json)")
    return changed


def _read_record(workdir: str) -> dict:
    path = os.path.join(workdir, RUN_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError:
        raise ConfigError(f"{path} is not valid JSON: restore it or start a new work directory") from None


def write_run_files(workdir: str, config: config_dict.ConfigDict, model_cfg: tagi_lib.TAGIConfig,
                    train_task_names, teachers_per: str, teacher_keys, categories: Mapping[str, str],
                    changed: Mapping[str, list] | None = None) -> None:
    """The files a trained method is loaded from: the run config, the backbone config (it may come from an
    imported checkpoint) and the teacher table's rows; plus `run.json` (config.json's hash and the history of
    `check_resume`'s allowed changes). Process 0 only."""
    if jax.process_index() != 0:
        return
    text = _config_text(config)
    record = _read_record(workdir)
    history = list(record.get("history", []))
    if changed:
        history.append({"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                        "changed": dict(changed)})
    _write_atomically(os.path.join(workdir, MODEL_CONFIG_FILE),
                      json.dumps(model_cfg.t5.to_dict(), indent=1, sort_keys=True))
    _write_atomically(os.path.join(workdir, CONFIG_FILE), text)
    _write_atomically(os.path.join(workdir, RUN_FILE),
                      json.dumps({"config_sha256": _sha256(text), "history": history}, indent=1))
    _write_atomically(os.path.join(workdir, TASKS_FILE), json.dumps(
        {"train_task_names": list(train_task_names), "teachers_per": teachers_per,
         "teacher_keys": list(teacher_keys), "categories": dict(categories)}, indent=1))


def _write_atomically(path: str, text: str) -> None:
    """Other hosts of a multi-host run read these files (`check_resume`, `load_trained`) while process 0 may be
    writing them: they see the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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


def load_trained(workdir: str, method: str, backbone_weights: str | None = None):
    """(config, model, params) of a trained method in a pipeline work directory (params = its TAGI tree).
    `backbone_weights` "int8"/"float" stores the backbone's matmul kernels so after loading, whatever the run
    trained with (None: as saved; e.g. a float-trained model evaluated with an int8 backbone)."""
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
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(stage_init_for(config, stage, model_cfg)(r)),
                              jax.random.key(0))
    # This process's own first device: jax.devices()[0] belongs to process 0, which another host cannot address.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    # Read each kernel in the storage the checkpoint holds it in (a run may have changed model.backbone_weights
    # between stages, or the stage may be loaded by an older default).
    saved = checkpoints.saved_param_paths(stage_dir(workdir, stage))
    abstract = traverse_util.unflatten_dict(quantize.as_stored(traverse_util.flatten_dict(abstract), saved))
    params = checkpoints.load_params(stage_dir(workdir, stage), abstract)
    if stage == "finetune":
        params = params["student"]
    if backbone_weights == "int8":
        params = quantize.quantize_params(params, backbone_kernel)
    elif backbone_weights == "float":
        params = quantize.dequantize_params(params)
    elif backbone_weights is not None:
        raise ValueError(f"backbone_weights must be 'float' or 'int8', got {backbone_weights!r}")
    bad = [path for path, x in jax.tree_util.tree_flatten_with_path(params)[0] if not bool(jnp.all(jnp.isfinite(x)))]
    if bad:  # it would only predict empty strings
        raise ValueError(f"{stage_dir(workdir, stage)}: the checkpoint of method '{method}' holds NaN/Inf parameters "
                         f"({jax.tree_util.keystr(bad[0])}, {len(bad)} in all): retrain the stage")
    return config, model, params
