"""T5 architecture hyper-parameters, for both families (v1.0 and v1.1 / LM-adapt / T0)."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ATTENTIONS = ("einsum", "xla", "cudnn")  # `T5Config.attention`


class DictConfig:
    """`replace`, `to_dict` and `from_dict` (unknown keys rejected) for the frozen model-config dataclasses."""

    _unknown_keys_message = "unknown keys"  # the ValueError's text before the sorted unknown keys

    def replace(self, **kwargs):
        return dataclasses.replace(self, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _check_keys(cls, d: Mapping[str, Any]) -> None:
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls._unknown_keys_message} {unknown}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]):
        cls._check_keys(d)
        return cls(**dict(d))


@dataclasses.dataclass(frozen=True)
class T5Config(DictConfig):
    _unknown_keys_message = "model: unknown T5 config keys"

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    # "relu" (T5 v1.0) or "gated-gelu" (T5 v1.1, LM-adapt, T0, Tk-Instruct).
    feed_forward_proj: str = "gated-gelu"
    # v1.0: input/output embedding tied and logits scaled by d_model**-0.5; v1.1: separate lm_head.
    tie_word_embeddings: bool = False
    # Scale the decoder output by d_model**-0.5 before the output projection; None = tie_word_embeddings
    # (T5 v1.0). transformers >= 5 writes it explicitly (and may tie an unscaled v1.1-style model).
    scale_decoder_outputs: bool | None = None
    dtype: str = "float32"  # compute dtype, e.g. "bfloat16"
    param_dtype: str = "float32"
    # Rematerialisation of each encoder / decoder layer in training: "none", "full", "dots" or
    # "dots_with_no_batch_dims" (tagi_jax.models.t5.REMAT_POLICIES): memory for recomputation.
    remat_policy: str = "none"
    # Attention products: "einsum" (ours, dropout on the weights), or `jax.nn.dot_product_attention` with
    # implementation "xla" or "cudnn" (the fused flash kernel: GPU, bfloat16/float16; no attention dropout).
    # Attention over precomputed key/value parts (decoding with per-task fusion keys/values) stays einsum.
    attention: str = "einsum"
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0

    def __post_init__(self):
        if self.feed_forward_proj not in ("relu", "gated-gelu"):
            raise ValueError(
                f"model.feed_forward_proj: {self.feed_forward_proj!r} is not supported "
                "(expected 'relu' or 'gated-gelu')"
            )
        if self.remat_policy not in ("none", "full", "dots", "dots_with_no_batch_dims"):
            raise ValueError(f"model.remat_policy: {self.remat_policy!r} is not one of 'none', 'full', 'dots', "
                             "'dots_with_no_batch_dims'")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"model.attention: {self.attention!r} is not one of {', '.join(map(repr, ATTENTIONS))}")
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_encoder_layers",
                      "num_decoder_layers"):
            if getattr(self, field) <= 0:
                raise ValueError(f"model.{field} must be positive, got {getattr(self, field)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj == "gated-gelu"

    @property
    def logits_scaled(self) -> bool:
        """Whether logits are computed from decoder outputs scaled by d_model**-0.5."""
        if self.scale_decoder_outputs is None:
            return self.tie_word_embeddings
        return bool(self.scale_decoder_outputs)

    @property
    def inner_dim(self) -> int:
        """num_heads * d_kv: the width of q/k/v (may differ from d_model)."""
        return self.num_heads * self.d_kv

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)


def tiny_config(**overrides) -> T5Config:
    """A few-thousand-parameter T5 v1.1 for tests."""
    base = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_encoder_layers=2,
                num_decoder_layers=2, relative_attention_num_buckets=8,
                relative_attention_max_distance=20, dropout_rate=0.0)
    base.update(overrides)
    return T5Config(**base)


# The published T5 v1.1 / LM-adapt architectures (their config.json files; T0 and Tk-Instruct share them):
# size -> (d_model, d_ff, num_heads, layers per stack). All have d_kv 64, vocabulary 32128, gated GELU.
T5_V1_1_SIZES = {
    "small": (512, 1024, 6, 8),
    "base": (768, 2048, 12, 12),
    "large": (1024, 2816, 16, 24),
    "xl": (2048, 5120, 32, 24),
    "xxl": (4096, 10240, 64, 24),
}


def t5_v1_1_config(size: str, **overrides) -> T5Config:
    """The T5 v1.1 / LM-adapt architecture of `size` (shapes only: for planning memory without a checkpoint)."""
    if size not in T5_V1_1_SIZES:
        raise ValueError(f"T5 v1.1 size {size!r} is not one of {', '.join(T5_V1_1_SIZES)}")
    d_model, d_ff, heads, layers = T5_V1_1_SIZES[size]
    base = dict(vocab_size=32128, d_model=d_model, d_kv=64, d_ff=d_ff, num_heads=heads, num_encoder_layers=layers,
                num_decoder_layers=layers, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    base.update(overrides)
    return T5Config(**base)
