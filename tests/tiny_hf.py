"""Tiny random Hugging Face T5s for golden-value tests (shared by several test files).

Three architectures, each seeded and saved with ``save_pretrained`` (safetensors):

* ``"v1_0"``      T5 v1.0 style: ReLU FFN, tied input/output embedding, logits scaled by d_model**-0.5;
* ``"v1_1"``      T5 v1.1 / LM-adapt style: gated-GELU FFN, separate random ``lm_head``, no scaling;
* ``"odd_heads"`` gated-GELU with ``num_heads * d_kv != d_model``, other relative-position buckets and max
                  distance, and 3 encoder / 2 decoder layers (transformers' generate cache breaks with more
                  decoder than encoder layers).

Beyond transformers' initialisation, layer-norm scales and relative-position tables are randomised so that a
wrong mapping of any of them changes the outputs. vocab_size >= 259, so byte-vocabulary ids work.

Usage in a test module::

    from tiny_hf import tiny_hf_t5, make_batch

    @pytest.fixture(scope="module")
    def v1_1(tmp_path_factory):
        return tiny_hf_t5(tmp_path_factory, "v1_1")   # (directory, torch model in eval mode)
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

KINDS = ("v1_0", "v1_1", "odd_heads")

_COMMON = dict(vocab_size=300, d_model=32, d_ff=64, num_layers=2, dropout_rate=0.1, layer_norm_epsilon=1e-6,
               relative_attention_num_buckets=8, relative_attention_max_distance=20, pad_token_id=0,
               eos_token_id=1, decoder_start_token_id=0)

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "v1_0": dict(_COMMON, d_kv=8, num_heads=4, feed_forward_proj="relu", tie_word_embeddings=True),
    "v1_1": dict(_COMMON, d_kv=8, num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "odd_heads": dict(_COMMON, d_kv=6, num_heads=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                      num_layers=3, num_decoder_layers=2, relative_attention_num_buckets=16,
                      relative_attention_max_distance=32),
}

_CACHE: dict[tuple[str, int], tuple[str, Any]] = {}


def build_tiny_t5(kind: str, seed: int = 0):
    """A random `transformers.T5ForConditionalGeneration` of the given kind, float32, in eval mode."""
    import torch
    import transformers

    if kind not in HF_CONFIGS:
        raise ValueError(f"tiny_hf: unknown kind {kind!r}; expected one of {KINDS}")
    kwargs = dict(HF_CONFIGS[kind])
    tied = kwargs.pop("tie_word_embeddings")
    config = transformers.T5Config(**kwargs, tie_word_embeddings=tied)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
        if not tied:  # transformers >= 5 ties lm_head unless the weights differ: give it its own
            model.lm_head.weight = torch.nn.Parameter(
                torch.randn(model.lm_head.weight.shape, generator=gen) * config.d_model ** -0.5)
    assert (model.lm_head.weight is model.shared.weight) == tied
    return model.eval()


def save_tiny_t5(kind: str, directory: str, seed: int = 0):
    """Build and `save_pretrained` (safetensors) into `directory`; returns the model."""
    model = build_tiny_t5(kind, seed)
    model.save_pretrained(directory, safe_serialization=True)
    assert os.path.isfile(os.path.join(directory, "model.safetensors"))
    return model


def tiny_hf_t5(tmp_path_factory, kind: str = "v1_1", seed: int = 0) -> tuple[str, Any]:
    """(checkpoint directory, torch model), built once per pytest session and kind."""
    key = (kind, seed)
    if key not in _CACHE:
        directory = str(tmp_path_factory.mktemp(f"hf_t5_{kind}_{seed}"))
        _CACHE[key] = (directory, save_tiny_t5(kind, directory, seed))
    return _CACHE[key]


def make_batch(vocab_size: int = 300, *, batch: int = 3, enc_len: int = 9, dec_len: int = 7, seed: int = 0,
               min_enc: int = 3, min_dec: int = 2) -> dict[str, np.ndarray]:
    """Random right-padded int32 T5 features (EOS=1 ends each sequence, 0 pads); lengths spread from full
    (first encoder row, last decoder row) down to `min_enc` / `min_dec`.

    Returns encoder_input_tokens [batch, enc_len], decoder_target_tokens [batch, dec_len] and
    decoder_input_tokens (targets shifted right behind the start token 0).
    """
    rng = np.random.RandomState(seed)
    spread = lambda length, minimum, i: length - int(round(i * (length - minimum) / max(batch - 1, 1)))

    def tokens(length, n):
        row = np.zeros(length, np.int32)
        row[: n - 1] = rng.randint(3, vocab_size, size=n - 1)
        row[n - 1] = 1
        return row

    # Lengths spread from full to the minimum: encoder rows get shorter, decoder rows longer.
    enc = np.stack([tokens(enc_len, spread(enc_len, min_enc, i)) for i in range(batch)])
    tgt = np.stack([tokens(dec_len, spread(dec_len, min_dec, batch - 1 - i)) for i in range(batch)])
    dec = np.zeros_like(tgt)
    dec[:, 1:] = tgt[:, :-1]
    return {"encoder_input_tokens": enc, "decoder_input_tokens": dec, "decoder_target_tokens": tgt}


def hf_logits(model, batch: dict[str, np.ndarray], **kwargs) -> np.ndarray:
    """Teacher-forced logits of the torch model, masks derived from the tokens as tagi_jax does."""
    import torch

    enc = torch.as_tensor(batch["encoder_input_tokens"], dtype=torch.long)
    dec = torch.as_tensor(batch["decoder_input_tokens"], dtype=torch.long)
    tgt = torch.as_tensor(batch["decoder_target_tokens"], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=enc, attention_mask=(enc > 0).long(), decoder_input_ids=dec,
                    decoder_attention_mask=(tgt > 0).long(), **kwargs)
    return out.logits.float().numpy()


def hf_encoder_outputs(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    enc = torch.as_tensor(tokens, dtype=torch.long)
    with torch.no_grad():
        out = model.get_encoder()(input_ids=enc, attention_mask=(enc > 0).long())
    return out.last_hidden_state.float().numpy()


def random_adapters(config, targets, rank: int = 3, *, batch: int | None = None, scale: float = 2.0,
                    seed: int = 0, std: float = 0.3) -> dict:
    """Random non-zero LoRA factors for a tagi_jax T5Config (numpy: no per-shape RNG compiles on CPU).

    A ~ N(0, 1/d_in), B ~ N(0, std²); shapes per `tagi_jax.models.lora` (a leading batch axis if `batch`).
    """
    from tagi_jax.models import lora

    rng = np.random.RandomState(seed)
    lead = () if batch is None else (batch,)
    out = {}
    for target in targets:
        layers, d_in, d_out = lora.adapter_dims(config, target)
        out[target] = {
            "A": (rng.randn(*lead, layers, d_in, rank) / np.sqrt(d_in)).astype(np.float32),
            "B": (std * rng.randn(*lead, layers, rank, d_out)).astype(np.float32),
            "scale": np.float32(scale),
        }
    return out
