"""Generated adapters as PEFT LoRA directories, usable on the Hugging Face T5 the backbone came from, and back.

A `tagi_adapter.json` beside the PEFT files records where the adapter came from (instruction, checkpoint
fingerprint, fusion) for humans; PEFT ignores it. An adapter reproduces the student only on the backbone it
was generated for: when training moved that backbone away from the imported checkpoint, the trained backbone is
written beside it (`backbone/`, a Hugging Face T5 directory) and becomes `base_model_name_or_path`.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

from flax import traverse_util

from tagi_jax.hf import hf_module_name, save_t5_hf
from tagi_jax.models import lora
from tagi_jax.models.t5 import is_encoder_fusion_param

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TAGI_FILE = "tagi_adapter.json"
STATES_FILE = "tagi_instruction_states.safetensors"  # fusion models only; read by tagi_jax, ignored by PEFT
BACKBONE_DIR = "backbone"  # the trained backbone (HF T5 directory), when it is not the imported checkpoint
KEY_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")


class FusionNotExportable(ValueError):
    """The model uses instruction fusion, which a PEFT LoRA adapter cannot represent."""


class AdapterFormatError(ValueError):
    """An adapter directory or pytree that does not fit (message names the file/key and the expected shape)."""


# --------------------------------------------------------------------------------------------------------
# Names: our (target, layer) <-> HF module.
# --------------------------------------------------------------------------------------------------------


def _module_index(config, targets: Sequence[str] | None = None) -> dict[str, tuple[str, int]]:
    """{HF module name: (target, layer)} for every possible target of a T5 with `config` (or `targets`)."""
    if targets is None:
        gated = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
        targets = [f"{b}.{p}" for b in lora.ATTENTION_BLOCKS for p in lora.ATTENTION_PROJECTIONS]
        targets += [f"{b}.{p}" for b in lora.FFN_BLOCKS for p in gated]
    out = {}
    for target in targets:
        layers = lora.adapter_dims(config, target)[0]
        for layer in range(layers):
            out[hf_module_name(target, layer)] = (target, layer)
    return out


# --------------------------------------------------------------------------------------------------------
# Export.
# --------------------------------------------------------------------------------------------------------


def _unbatched(target: str, x: Any) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        if x.shape[0] != 1:
            raise AdapterFormatError(f"adapters[{target!r}]: holds a batch of {x.shape[0]} adapters; export one "
                                     "adapter at a time (index the batch first)")
        x = x[0]
    if x.ndim != 3:
        raise AdapterFormatError(f"adapters[{target!r}]: expected [layers, d_in, r] / [layers, r, d_out] factors, "
                                 f"got {x.ndim} dimensions")
    return x


def _alpha_value(scale: float, rank: int) -> float | int:
    alpha = float(scale) * rank
    return int(round(alpha)) if abs(alpha - round(alpha)) < 1e-9 else alpha


def to_peft_state_dict(adapters: lora.Adapters, config) -> tuple[dict[str, np.ndarray], int, float]:
    """({PEFT key: array}, rank, scale) for one adapter (factors [layers, ...] or batch 1), validated against
    the T5 `config`; float32 arrays.

    A TAGI adapter is one LoRA per (target, layer): ``W + scale·A·B`` with ``A [d_in, r]``, ``B [r, d_out]``
    (`tagi_jax.models.lora`). PEFT stores the same update for an ``nn.Linear(d_in, d_out)`` as
    ``lora_A.weight [r, d_in]`` and ``lora_B.weight [d_out, r]`` and multiplies by ``lora_alpha / r``, so

        lora_A.weight = Aᵀ,   lora_B.weight = Bᵀ,   lora_alpha = scale · r,

    under the key ``base_model.model.<HF module>.lora_{A,B}.weight`` (``tagi_jax.hf.hf_module_name``; peft
    0.21.2's `save_pretrained` format). `adapter_config.json` lists the exact HF modules as `target_modules`,
    so PEFT wraps those and nothing else.
    """
    lora.check_adapters(config, adapters)
    if not adapters:
        raise AdapterFormatError("adapters: empty (nothing to export)")
    ranks, scales, tensors = {}, {}, {}
    for target, entry in adapters.items():
        a, b = _unbatched(target, entry["A"]), _unbatched(target, entry["B"])
        ranks[target] = a.shape[-1]
        scales[target] = float(np.asarray(entry.get("scale", 1.0)))
        for layer in range(a.shape[0]):
            module = hf_module_name(target, layer)
            tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(a[layer].T)
            tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(b[layer].T)
    if len(set(ranks.values())) != 1:
        raise AdapterFormatError(f"adapters: targets have different ranks {ranks}; a PEFT export needs one rank")
    if max(scales.values()) - min(scales.values()) > 1e-12 * max(1.0, max(scales.values())):
        raise AdapterFormatError(f"adapters: targets have different scales {scales}; a PEFT export needs one scale")
    return tensors, next(iter(ranks.values())), next(iter(scales.values()))


_FUSION_READERS = {"prepend": "the decoder", "encoder_cross_attention": "every encoder layer"}


def check_fusion(uses_fusion: bool, allow_fusion_loss: bool = False, fusion: str | None = None) -> None:
    """Raise `FusionNotExportable` for a fusion model (or only warn when `allow_fusion_loss`); `fusion`, the
    model's fusion kind, only makes the message precise.

    Instruction fusion (the decoder, with fusion "prepend", or every encoder layer, with fusion
    "encoder_cross_attention", also cross-attending to the encoded instruction) is not a weight update and
    cannot be carried by a PEFT adapter; a model without fusion exports exactly.
    """
    if not uses_fusion:
        return
    reader = _FUSION_READERS.get(fusion, "the decoder or the encoder")
    kind = f"fusion {fusion!r}: " if fusion else ""
    message = (f"this model uses instruction fusion ({kind}{reader} also attends to the encoded instruction), "
               "which a PEFT LoRA adapter cannot carry: the exported adapter alone will NOT reproduce the "
               "model's predictions")
    if not allow_fusion_loss:
        raise FusionNotExportable(f"export: {message}; pass allow_fusion_loss=True (--allow_fusion_loss) to "
                                  "export the LoRA part anyway, or use a model trained with fusion 'none'")
    warnings.warn(f"export: {message}. Exporting the LoRA part only (allow_fusion_loss=True).", stacklevel=3)


def export_peft_adapter(
    adapters: lora.Adapters,
    out_dir: str,
    config,
    *,
    base_model_name_or_path: str | None = None,
    uses_fusion: bool = False,
    allow_fusion_loss: bool = False,
    fusion: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    instruction_states: Any = None,
    instruction_mask: Any = None,
    backbone_params: Mapping[str, Any] | None = None,
) -> str:
    """Write `adapters` (one adapter) to `out_dir` as a PEFT LoRA directory; returns `out_dir`.

    Args:
      adapters: {target: {"A": [layers, d_in, r], "B": [layers, r, d_out], "scale"}} (a batch axis of 1 is ok).
      config: the backbone's `T5Config` (checks shapes, names the HF modules).
      base_model_name_or_path: written to adapter_config.json (PEFT loads that model by default).
      uses_fusion: whether the model that generated the adapter also fuses the encoded instruction (into the
        decoder or the encoder).
      allow_fusion_loss: export a fusion model's adapter anyway (with a warning) instead of raising.
      fusion: the model's fusion kind (`TAGIConfig.fusion`), for the message and tagi_adapter.json.
      metadata: extra JSON-able facts for tagi_adapter.json (instruction, checkpoint fingerprint, ...).
      instruction_states, instruction_mask: the encoded instruction [n, d_model] / [n] of a fusion model; saved
        beside the PEFT files (tagi_jax reloads them with `load_instruction_states`; PEFT cannot use them).
      backbone_params: the backbone's parameters (of `T5(config)`) when they are not those of
        `base_model_name_or_path` (a trained backbone): written to `<out_dir>/backbone` as a Hugging Face T5
        directory whose absolute path becomes `base_model_name_or_path` (encoder-fusion blocks are left out:
        only with `allow_fusion_loss`).
    """
    check_fusion(uses_fusion, allow_fusion_loss, fusion)
    tensors, rank, scale = to_peft_state_dict(adapters, config)
    if backbone_params is not None:
        flat = traverse_util.flatten_dict(dict(backbone_params))
        plain = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not is_encoder_fusion_param(k)})
        base_model_name_or_path = os.path.abspath(save_t5_hf(os.path.join(out_dir, BACKBONE_DIR), config, plain))
    elif os.path.isfile(os.path.join(out_dir, BACKBONE_DIR, "config.json")):
        shutil.rmtree(os.path.join(out_dir, BACKBONE_DIR))  # an earlier export's backbone is not this adapter's
    modules = sorted({_KEY_RE.match(k).group("module") for k in tensors})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(rank),
        "lora_alpha": _alpha_value(scale, rank),
        "lora_dropout": 0.0,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(peft_config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    states_path = os.path.join(out_dir, STATES_FILE)
    if instruction_states is not None:
        states = np.asarray(instruction_states, np.float32)
        mask = (np.ones(states.shape[:1], np.int32) if instruction_mask is None
                else np.asarray(instruction_mask).astype(np.int32))
        save_file({"states": np.ascontiguousarray(states), "mask": np.ascontiguousarray(mask)}, states_path)
    elif os.path.exists(states_path):
        os.remove(states_path)  # never leave a stale fusion file from an earlier export in this directory
    info = {
        "format": "tagi_jax generated LoRA (PEFT)",
        "targets": sorted(adapters),
        "rank": int(rank),
        "scale": scale,
        "instruction_fusion": bool(uses_fusion),
        **({"fusion": fusion} if fusion else {}),
        "backbone": BACKBONE_DIR if backbone_params is not None else base_model_name_or_path,
        **dict(metadata or {}),
    }
    with open(os.path.join(out_dir, TAGI_FILE), "w") as f:
        json.dump(info, f, indent=2, default=str)
    return out_dir


# --------------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------------


def load_peft_adapter(
    directory: str,
    config,
    *,
    rank: int | None = None,
    targets: Sequence[str] | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """A PEFT LoRA directory (ours, or any PEFT LoRA of this HF T5) -> one adapter pytree (float32 numpy,
    factors [layers, d_in, r] / [layers, r, d_out]) for a T5 with `config`.

    `rank` / `targets`, when given, must match the file (e.g. the rank and `adapter_targets` of the model the
    adapter is meant for). Every mismatch is a one-line `AdapterFormatError` naming the file and key.
    """
    cfg_path = os.path.join(directory, CONFIG_FILE)
    weights_path = os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: adapter directory not found")
    for path in (cfg_path, weights_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing (a PEFT adapter directory needs {CONFIG_FILE} and "
                                    f"{WEIGHTS_FILE})")
    try:
        with open(cfg_path) as f:
            peft_config = json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterFormatError(f"{cfg_path}: not valid JSON ({e})") from e
    if peft_config.get("peft_type") != "LORA":
        raise AdapterFormatError(f"{cfg_path}: peft_type is {peft_config.get('peft_type')!r}, expected 'LORA'")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if bool(peft_config.get(key, False)) != ok:
            raise AdapterFormatError(f"{cfg_path}: {key}={peft_config.get(key)!r} is not supported")
    if peft_config.get("bias", "none") != "none":
        raise AdapterFormatError(f"{cfg_path}: bias={peft_config['bias']!r} is not supported (LoRA factors only)")
    if peft_config.get("rank_pattern") or peft_config.get("alpha_pattern"):
        raise AdapterFormatError(f"{cfg_path}: rank_pattern/alpha_pattern are not supported (one rank and alpha)")
    file_rank = peft_config.get("r")
    if not isinstance(file_rank, int) or file_rank <= 0:
        raise AdapterFormatError(f"{cfg_path}: 'r' must be a positive int, got {file_rank!r}")
    if rank is not None and file_rank != rank:
        raise AdapterFormatError(f"{cfg_path}: adapter has rank r={file_rank} but the model expects rank {rank}")
    alpha = float(peft_config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(file_rank) if peft_config.get("use_rslora") else alpha / file_rank

    tensors = load_file(weights_path)
    modules = _module_index(config)
    found: dict[str, dict[int, dict[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            raise AdapterFormatError(f"{weights_path}: key {key!r} is not a PEFT LoRA factor "
                                     "('base_model.model.<module>.lora_A.weight' / '.lora_B.weight')")
        if m.group("module") not in modules:
            raise AdapterFormatError(f"{weights_path}: key {key!r}: no module {m.group('module')!r} in a T5 with "
                                     f"{config.num_encoder_layers}+{config.num_decoder_layers} layers "
                                     f"({config.feed_forward_proj} FFN)")
        target, layer = modules[m.group("module")]
        found.setdefault(target, {}).setdefault(layer, {})[m.group("factor")] = np.asarray(value, np.float32)
    if not found:
        raise AdapterFormatError(f"{weights_path}: no LoRA factors")
    if targets is not None and set(found) != set(targets):
        raise AdapterFormatError(f"{weights_path}: adapter targets {sorted(found)} differ from the model's "
                                 f"adapter_targets {sorted(targets)}")

    adapters = {}
    for target, layers in found.items():
        num_layers, d_in, d_out = lora.adapter_dims(config, target)
        missing = [l for l in range(num_layers) if l not in layers or len(layers[l]) != 2]
        if missing:
            raise AdapterFormatError(f"{weights_path}: target {target!r} ({hf_module_name(target, missing[0])}) "
                                     f"lacks lora_A/lora_B for layer(s) {missing}")
        a_list, b_list = [], []
        for layer in range(num_layers):
            module = hf_module_name(target, layer)
            a_t, b_t = layers[layer]["A"], layers[layer]["B"]
            if a_t.shape != (file_rank, d_in):
                raise AdapterFormatError(f"{weights_path}: {KEY_PREFIX}{module}.lora_A.weight has shape "
                                         f"{a_t.shape}, expected [r={file_rank}, d_in={d_in}]")
            if b_t.shape != (d_out, file_rank):
                raise AdapterFormatError(f"{weights_path}: {KEY_PREFIX}{module}.lora_B.weight has shape "
                                         f"{b_t.shape}, expected [d_out={d_out}, r={file_rank}]")
            if not (np.all(np.isfinite(a_t)) and np.all(np.isfinite(b_t))):
                raise AdapterFormatError(f"{weights_path}: {KEY_PREFIX}{module} holds NaN/Inf values")
            a_list.append(a_t.T)
            b_list.append(b_t.T)
        adapters[target] = {"A": np.stack(a_list), "B": np.stack(b_list), "scale": np.float32(scale)}
    return adapters


def load_instruction_states(directory: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(states [n, d_model], mask [n] bool) saved by a fusion model's export, or None."""
    path = os.path.join(directory, STATES_FILE)
    if not os.path.isfile(path):
        return None
    data = load_file(path)
    if set(data) != {"states", "mask"} or data["states"].ndim != 2 or data["mask"].shape != data["states"].shape[:1]:
        raise AdapterFormatError(f"{path}: expected 'states' [n, d_model] and 'mask' [n]")
    return data["states"], data["mask"].astype(bool)


def read_tagi_info(directory: str) -> dict:
    """The tagi_adapter.json written beside an exported adapter ({} when absent, e.g. a foreign PEFT adapter)."""
    path = os.path.join(directory, TAGI_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)
