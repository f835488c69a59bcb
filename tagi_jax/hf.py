"""Hugging Face T5 checkpoints <-> tagi_jax T5 parameters (local disk only, never the hub).

`load_t5(path)` reads a `transformers` T5 directory (``config.json`` plus ``model.safetensors``, a sharded
``model.safetensors.index.json``, or ``pytorch_model.bin`` [sharded or not] when torch is installed) and returns
``(T5Config, params)`` for `tagi_jax.models.t5.T5`: names are mapped and ``nn.Linear`` weights
([out, in]) transposed to our kernels ([in, out]). `save_t5_hf` writes the reverse, loadable by
``T5ForConditionalGeneration.from_pretrained``. `hf_module_name` names the HF module an adapter target
modifies (PEFT adapters are exported with these names).

The output projection: a checkpoint is untied when it holds an ``lm_head.weight`` that differs from
``shared.weight`` (as transformers >= 5 decides); the decoder output is scaled by d_model**-0.5 when
``config.json``'s ``scale_decoder_outputs`` (transformers >= 5) or, failing that, ``tie_word_embeddings``
(default true) says so. That gives T5 v1.0 (tied, scaled) and v1.1 / LM-adapt / T0 (untied, unscaled).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from tagi_jax.models import lora
from tagi_jax.models.t5 import T5, is_encoder_fusion_param
from tagi_jax.models.t5_config import T5Config

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

SUPPORTED_MODEL_TYPES = ("t5", "mt5")  # mT5 is the T5 v1.1 architecture with another vocabulary
SUPPORTED_FEED_FORWARD = ("relu", "gated-gelu")
# Present in some checkpoints, never needed: copies of shared.weight, and a cross-attention bias HF ignores.
_IGNORED_KEYS = (
    "encoder.embed_tokens.weight",
    "decoder.embed_tokens.weight",
    "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",
)

PathTuple = tuple[str, ...]


# --------------------------------------------------------------------------------------------------------
# Names.
# --------------------------------------------------------------------------------------------------------

_HF_PROJ = {"q": "q", "k": "k", "v": "v", "o": "o", "wi": "wi", "wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"}


def hf_module_name(target: str, layer: int) -> str:
    """HF module of an adapter target, e.g. ('decoder_cross.v', 1) -> 'decoder.block.1.layer.1.EncDecAttention.v'."""
    block, proj = lora.split_target(target)
    stack = "encoder" if block.startswith("encoder") else "decoder"
    if block in ("encoder_self", "decoder_self"):
        sub = "layer.0.SelfAttention"
    elif block == "decoder_cross":
        sub = "layer.1.EncDecAttention"
    else:  # FFN: layer.1 in the encoder, layer.2 in the decoder (after cross-attention)
        sub = f"layer.{1 if stack == 'encoder' else 2}.DenseReluDense"
    return f"{stack}.block.{layer}.{sub}.{_HF_PROJ[proj]}"


def hf_name_map(config: T5Config) -> dict[PathTuple, tuple[str, bool]]:
    """{our parameter path: (HF state-dict name, transpose?)} for every parameter of `T5(config)`."""
    out: dict[PathTuple, tuple[str, bool]] = {("token_embedder", "embedding"): ("shared.weight", False)}
    ffn = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    attn = {"query": "q", "key": "k", "value": "v", "out": "o"}

    def attention(prefix: PathTuple, hf_prefix: str):
        for ours, theirs in attn.items():
            out[prefix + (ours, "kernel")] = (f"{hf_prefix}.{theirs}.weight", True)

    def mlp(prefix: PathTuple, hf_prefix: str):
        for name in ffn:
            out[prefix + (name, "kernel")] = (f"{hf_prefix}.{name}.weight", True)

    for stack, n_layers in (("encoder", config.num_encoder_layers), ("decoder", config.num_decoder_layers)):
        out[(stack, "relpos_bias", "rel_embedding")] = (
            f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight", True)
        for i in range(n_layers):
            p, h = (stack, f"layers_{i}"), f"{stack}.block.{i}.layer"
            if stack == "encoder":
                out[p + ("pre_attention_layer_norm", "scale")] = (f"{h}.0.layer_norm.weight", False)
                attention(p + ("attention",), f"{h}.0.SelfAttention")
                out[p + ("pre_mlp_layer_norm", "scale")] = (f"{h}.1.layer_norm.weight", False)
                mlp(p + ("mlp",), f"{h}.1.DenseReluDense")
            else:
                out[p + ("pre_self_attention_layer_norm", "scale")] = (f"{h}.0.layer_norm.weight", False)
                attention(p + ("self_attention",), f"{h}.0.SelfAttention")
                out[p + ("pre_cross_attention_layer_norm", "scale")] = (f"{h}.1.layer_norm.weight", False)
                attention(p + ("encoder_decoder_attention",), f"{h}.1.EncDecAttention")
                out[p + ("pre_mlp_layer_norm", "scale")] = (f"{h}.2.layer_norm.weight", False)
                mlp(p + ("mlp",), f"{h}.2.DenseReluDense")
        norm = "encoder_norm" if stack == "encoder" else "decoder_norm"
        out[(stack, norm, "scale")] = (f"{stack}.final_layer_norm.weight", False)
    if not config.tie_word_embeddings:
        out[("decoder", "logits_dense", "kernel")] = ("lm_head.weight", True)
    return out


def param_shapes(config: T5Config) -> dict[PathTuple, tuple[int, ...]]:
    """Shapes of every parameter of `T5(config)` (abstract init: nothing is allocated)."""
    dummy = jnp.ones((1, 1), jnp.int32)
    abstract = jax.eval_shape(lambda: nn.meta.unbox(T5(config).init(jax.random.PRNGKey(0), dummy, dummy, dummy)))
    return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract["params"]).items()}


# --------------------------------------------------------------------------------------------------------
# Config.
# --------------------------------------------------------------------------------------------------------


def config_from_hf(hf: Mapping[str, Any], *, tied: bool, source: str = CONFIG_FILE, dtype: Optional[str] = None,
                   param_dtype: str = "float32") -> T5Config:
    """T5Config from a transformers config.json dict; `tied`: whether the checkpoint has no separate lm_head."""
    model_type = hf.get("model_type")
    if model_type is None:
        archs = hf.get("architectures") or []
        model_type = "t5" if any(a.startswith("T5") for a in archs) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} (architectures "
                         f"{hf.get('architectures')}) is not a T5; supported: {SUPPORTED_MODEL_TYPES}")
    ffp = hf.get("feed_forward_proj", "relu")
    if ffp not in SUPPORTED_FEED_FORWARD:
        raise ValueError(f"{source}: feed_forward_proj {ffp!r} is not supported (expected one of "
                         f"{SUPPORTED_FEED_FORWARD})")
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers"):
        if key not in hf:
            raise ValueError(f"{source}: missing key {key!r}")
    num_layers = int(hf["num_layers"])
    eos = hf.get("eos_token_id", 1)
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    decoder_start = hf.get("decoder_start_token_id")
    pad = hf.get("pad_token_id")
    scale = hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True))
    return T5Config(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["d_model"]),
        d_kv=int(hf["d_kv"]),
        d_ff=int(hf["d_ff"]),
        num_heads=int(hf["num_heads"]),
        num_encoder_layers=num_layers,
        num_decoder_layers=int(hf.get("num_decoder_layers") or num_layers),
        relative_attention_num_buckets=int(hf.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(hf.get("relative_attention_max_distance", 128)),
        dropout_rate=float(hf.get("dropout_rate", 0.1)),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=ffp,
        tie_word_embeddings=bool(tied),
        scale_decoder_outputs=bool(scale),
        dtype=dtype or "float32",
        param_dtype=param_dtype,
        pad_token_id=int(0 if pad is None else pad),
        eos_token_id=int(1 if eos is None else eos),
        decoder_start_token_id=int(0 if decoder_start is None else decoder_start),
    )


def config_to_hf(config: T5Config) -> dict[str, Any]:
    """The config.json transformers needs to rebuild `config`."""
    return {
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size,
        "d_model": config.d_model,
        "d_kv": config.d_kv,
        "d_ff": config.d_ff,
        "num_heads": config.num_heads,
        "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate,
        "layer_norm_epsilon": config.layer_norm_epsilon,
        "feed_forward_proj": config.feed_forward_proj,
        "dense_act_fn": "gelu_new" if config.is_gated else "relu",
        "is_gated_act": config.is_gated,
        "is_encoder_decoder": True,
        "tie_word_embeddings": config.tie_word_embeddings,
        "scale_decoder_outputs": config.logits_scaled,
        "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id,
        "decoder_start_token_id": config.decoder_start_token_id,
    }


# --------------------------------------------------------------------------------------------------------
# Reading tensors.
# --------------------------------------------------------------------------------------------------------


class _TensorSource:
    """Lazy name -> numpy array access over one or several checkpoint files."""

    def __init__(self, names_to_files: Mapping[str, str], reader: Callable[[str], Mapping[str, Any]]):
        self._where = dict(names_to_files)
        self._reader = reader
        self._open: dict[str, Mapping[str, Any]] = {}

    def keys(self):
        return self._where.keys()

    def __contains__(self, name):
        return name in self._where

    def file_of(self, name: str) -> str:
        return self._where[name]

    def get(self, name: str) -> np.ndarray:
        path = self._where[name]
        if path not in self._open:
            self._open[path] = self._reader(path)
        return self._open[path][name]


def _read_safetensors(path: str) -> Mapping[str, Any]:
    class _Lazy(dict):
        def __missing__(self, name):
            with safe_open(path, framework="np") as f:
                return f.get_tensor(name)

    return _Lazy()


def _safetensors_keys(path: str) -> list[str]:
    with safe_open(path, framework="np") as f:
        return list(f.keys())


class _TorchFile(dict):
    """A pytorch_model.bin state dict (mmap'ed), tensors converted to numpy on access."""

    def __init__(self, path: str):
        super().__init__()
        try:
            import torch
        except ImportError as e:  # pragma: no cover - torch is in the test extra
            raise ImportError(f"{path}: reading {TORCH_FILE} needs torch (pip install torch), or convert the "
                              f"checkpoint to {SAFETENSORS_FILE}") from e
        self._torch = torch
        self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.names = list(self._state.keys())

    def __missing__(self, name):
        t = self._state[name]
        if t.dtype == self._torch.bfloat16:
            return t.view(self._torch.int16).numpy().view(_bf16())
        return t.numpy()


def _open_checkpoint(path: str) -> _TensorSource:
    def index(index_file: str, reader) -> _TensorSource:
        full = os.path.join(path, index_file)
        try:
            with open(full) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{full}: not a valid checkpoint index (needs a 'weight_map')") from e
        files = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not os.path.isfile(shard):
                raise FileNotFoundError(f"{shard}: missing checkpoint shard listed in {full}")
        return _TensorSource(files, reader)

    st = os.path.join(path, SAFETENSORS_FILE)
    if os.path.isfile(st):
        return _TensorSource({k: st for k in _safetensors_keys(st)}, _read_safetensors)
    if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)):
        return index(SAFETENSORS_INDEX, _read_safetensors)
    pt = os.path.join(path, TORCH_FILE)
    if os.path.isfile(pt):
        return _TensorSource({k: pt for k in _TorchFile(pt).names}, _TorchFile)
    if os.path.isfile(os.path.join(path, TORCH_INDEX)):
        return index(TORCH_INDEX, _TorchFile)
    raise FileNotFoundError(f"{path}: no {SAFETENSORS_FILE}, {SAFETENSORS_INDEX}, {TORCH_FILE} or {TORCH_INDEX} "
                            "found (a transformers T5 directory saved with save_pretrained)")


# --------------------------------------------------------------------------------------------------------
# Public API.
# --------------------------------------------------------------------------------------------------------


def read_hf_config(path: str) -> tuple[dict, str]:
    """(config.json as a dict, its path) of a transformers T5 directory; one-line errors naming the file."""
    cfg_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path}: missing (a transformers T5 directory needs config.json)")
    try:
        with open(cfg_path) as f:
            hf_cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    if isinstance(hf_cfg, dict):
        return hf_cfg, cfg_path
    raise ValueError(f"{cfg_path}: expected a JSON object")


def load_t5(path: str, dtype: Optional[str] = None, *, param_dtype: str = "float32") -> tuple[T5Config, dict]:
    """(T5Config, params) from a local transformers T5 directory.

    `dtype` is the compute dtype set on the returned config (e.g. "bfloat16"; default float32); parameters are
    host numpy arrays of `param_dtype` (device_put them with `partitioning` shardings). Fails with a one-line
    error naming the file/key on a missing file, a non-T5 or unsupported config, a missing tensor or a shape
    that does not match config.json.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: not a directory (expected a transformers T5 checkpoint directory)")
    hf_cfg, cfg_path = read_hf_config(path)
    config_from_hf(hf_cfg, tied=True, source=cfg_path)  # validate before touching the weights
    source = _open_checkpoint(path)

    shared_name = "shared.weight"
    if shared_name not in source:  # some exports keep only the per-stack copies
        for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
            if alias in source:
                shared_name = alias
                break
    tied = True
    if "lm_head.weight" in source and shared_name in source:
        tied = bool(np.array_equal(source.get("lm_head.weight"), source.get(shared_name)))
    config = config_from_hf(hf_cfg, tied=tied, source=cfg_path, dtype=dtype, param_dtype=param_dtype)

    names = hf_name_map(config)
    if shared_name != "shared.weight":
        names[("token_embedder", "embedding")] = (shared_name, False)
    shapes = param_shapes(config)
    if set(shapes) != set(names):  # an internal consistency check between the model and the name map
        raise AssertionError(f"hf_name_map and T5 parameters differ: {sorted(set(shapes) ^ set(names))}")
    used = set()
    flat = {}
    for our_path, (hf_name, transpose) in names.items():
        if hf_name not in source:
            raise KeyError(f"{path}: checkpoint has no tensor {hf_name!r} (needed for {'/'.join(our_path)})")
        value = np.asarray(source.get(hf_name))
        expected = tuple(reversed(shapes[our_path])) if transpose else shapes[our_path]
        if value.shape != expected:
            raise ValueError(f"{source.file_of(hf_name)}: tensor {hf_name} has shape {tuple(value.shape)}, "
                             f"expected {expected} from {cfg_path}")
        value = value.T if transpose else value
        flat[our_path] = np.ascontiguousarray(value.astype(_np_dtype(param_dtype)))
        used.add(hf_name)
    unexpected = sorted(set(source.keys()) - used - set(_IGNORED_KEYS) - {"lm_head.weight", "shared.weight"})
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors for a {config.feed_forward_proj} T5 with "
                         f"{config.num_encoder_layers}+{config.num_decoder_layers} layers: {unexpected[:5]}"
                         f"{' ...' if len(unexpected) > 5 else ''}")
    return config, traverse_util.unflatten_dict(flat)


def _bf16():
    import ml_dtypes

    return ml_dtypes.bfloat16


def _np_dtype(name: str):
    return _bf16() if name == "bfloat16" else np.dtype(name)


def to_hf_state_dict(config: T5Config, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """{HF name: numpy array} for `params` of `T5(config)` (the inverse of `load_t5`'s mapping). Trees with
    encoder-fusion blocks are refused: HF has no place for them."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(params))
    fused = sorted(path for path in flat if is_encoder_fusion_param(path))
    if fused:  # silently dropping them would export a model that computes something else
        raise ValueError(f"to_hf_state_dict: params hold encoder-fusion blocks ({'/'.join(fused[0])}, ...), which "
                         "a Hugging Face T5 has no place for")
    names = hf_name_map(config)
    missing = sorted(set(names) - set(flat))
    if missing:
        raise KeyError(f"to_hf_state_dict: params have no {'/'.join(missing[0])}")
    out = {}
    for our_path, (hf_name, transpose) in names.items():
        value = np.asarray(flat[our_path])
        out[hf_name] = np.ascontiguousarray(value.T if transpose else value)
    return out


def save_t5_hf(path: str, config: T5Config, params: Mapping[str, Any]) -> str:
    """Write `config.json` + `model.safetensors` that `T5ForConditionalGeneration.from_pretrained` loads."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(config), f, indent=2, sort_keys=True)
    save_file(to_hf_state_dict(config, params), os.path.join(path, SAFETENSORS_FILE), metadata={"format": "pt"})
    return path
