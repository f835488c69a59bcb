"""tagi_jax's T5 against transformers' T5ForConditionalGeneration (golden values from tiny random models).

* relative-position buckets == transformers' bucket function;
* encoder outputs and teacher-forced logits (padded inputs and targets) within 1e-4, for a v1.0-style, a
  v1.1-style and a num_heads*d_kv != d_model model;
* cached one-token decoding == teacher-forced logits (plain, with adapters, with fused extra states);
  (greedy/beam search over this cache == transformers' `generate`: tests/test_decoding.py);
* dropout, bfloat16 compute;
* `attention="xla"` (`jax.nn.dot_product_attention`): the same logits as transformers, and cached decoding.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.hf import load_t5
from tagi_jax.models import lora
from tagi_jax.models.layers import relative_position_bucket
from tagi_jax.models.t5 import T5
from tiny_hf import KINDS, hf_encoder_outputs, hf_logits, make_batch, random_adapters, tiny_hf_t5

TOL = 1e-4
SHAPE = dict(batch=3, enc_len=11, dec_len=8)  # one batch shape for most tests: compiled functions are shared


@functools.lru_cache(maxsize=None)
def _jitted(config, name: str, **static):
    """One compiled `T5(config).apply` per (config, method, static kwargs): eager op-by-op is slow on CPU.

    `name` is a T5 method name, or any label when `method=` (a function of the module) is in `static`.
    """
    model = T5(config)
    method = static.pop("method", None) or getattr(T5, name)

    def fn(variables, *args, **kwargs):
        return model.apply(variables, *args, method=method, **static, **kwargs)

    return jax.jit(fn)


def _encode_and_logits(module, enc_tokens, dec_inputs, dec_targets):
    encoded = module.encode(enc_tokens)
    return encoded, module.decode(encoded, enc_tokens, dec_inputs, dec_targets)


def _apply(config, params, *args, method="__call__", **kwargs):
    return _jitted(config, method)({"params": params}, *args, **kwargs)


@pytest.fixture(scope="module", params=KINDS)
def loaded(request, tmp_path_factory):
    """(kind, torch model, T5Config, params) per tiny architecture."""
    path, torch_model = tiny_hf_t5(tmp_path_factory, request.param)
    config, params = load_t5(path)
    return request.param, torch_model, config, params


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20), (16, 32), (32, 64)])
def test_relative_position_bucket_matches_transformers(bidirectional, num_buckets, max_distance):
    import torch
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-700, 701)
    ref = T5Attention._relative_position_bucket(torch.as_tensor(rel), bidirectional=bidirectional,
                                                num_buckets=num_buckets, max_distance=max_distance).numpy()
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(ours, ref)
    # every logarithmic bucket is reached (bidirectional: bucket num_buckets/2, "+0", is never used)
    assert len(np.unique(ours)) == (num_buckets - 1 if bidirectional else num_buckets)


def test_config_matches_family(loaded):
    kind, torch_model, config, params = loaded
    assert config.feed_forward_proj == ("relu" if kind == "v1_0" else "gated-gelu")
    assert config.tie_word_embeddings == (kind == "v1_0")
    assert config.logits_scaled == (kind == "v1_0")
    assert ("logits_dense" in params["decoder"]) == (kind != "v1_0")
    hf = torch_model.config
    assert (config.num_heads * config.d_kv != config.d_model) == (kind == "odd_heads")
    assert (config.num_encoder_layers, config.num_decoder_layers) == (hf.num_layers, hf.num_decoder_layers)
    assert config.relative_attention_num_buckets == hf.relative_attention_num_buckets


def test_encoder_and_logits_match_transformers(loaded):
    kind, torch_model, config, params = loaded
    batch = make_batch(config.vocab_size, **SHAPE, seed=1)
    assert (batch["encoder_input_tokens"] == 0).any() and (batch["decoder_target_tokens"] == 0).any()
    encoded, logits = _jitted(config, "encode_and_logits", method=_encode_and_logits)(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"])
    ref_encoded = hf_encoder_outputs(torch_model, batch["encoder_input_tokens"])
    ref_logits = hf_logits(torch_model, batch)
    assert encoded.shape == ref_encoded.shape and logits.shape == ref_logits.shape
    np.testing.assert_allclose(np.asarray(encoded), ref_encoded, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=TOL, rtol=0)
    assert np.abs(ref_logits).max() > 1.0  # not a degenerate comparison


def _random_adapters(config, seed):
    targets = lora.DEFAULT_TARGETS + ("decoder_cross.k", "decoder_ffn.wo")
    return random_adapters(config, targets, rank=3, batch=3, seed=seed)


def _encode_decode_and_init_cache(module, enc_tokens, dec_inputs, cache_length, **kwargs):
    """Encoder output, teacher-forced logits (decode=False) and a fresh cache, in one compiled call."""
    encoded = module.encode(enc_tokens, adapters=kwargs.get("adapters"))
    full = module.decode(encoded, enc_tokens, dec_inputs, None, **kwargs) if dec_inputs is not None else None
    dummy = jnp.ones((enc_tokens.shape[0], cache_length), jnp.int32)
    module.decode(encoded, enc_tokens, dummy, dummy, decode=True, **kwargs)
    return encoded, full


@functools.lru_cache(maxsize=None)
def _prepare_fn(config, cache_length):
    model = T5(config)
    return jax.jit(lambda params, enc, dec, **kw: model.apply(
        {"params": params}, enc, dec, cache_length, method=_encode_decode_and_init_cache, mutable=["cache"], **kw))


@functools.lru_cache(maxsize=None)
def _step_fn(config, pass_length):
    """One cached decode step; `pass_length` also passes max_decode_length (else inferred from the cache)."""
    model = T5(config)

    def step(params, cache, encoded, enc_tokens, token, **kw):
        if pass_length:
            kw["max_decode_length"] = cache["decoder"]["layers_0"]["self_attention"]["cached_key"].shape[1]
        logits, new = model.apply({"params": params, "cache": cache}, encoded, enc_tokens, token, decode=True,
                                  mutable=["cache"], method=T5.decode, **kw)
        return logits[:, 0], new["cache"]

    return jax.jit(step)


@pytest.mark.parametrize("kind,variant", [("v1_0", "plain"), ("v1_1", "adapters+fusion"),
                                          ("odd_heads", "adapters+fusion")])
def test_cached_decoding_equals_teacher_forcing(kind, variant, tmp_path_factory):
    config, params = load_t5(tiny_hf_t5(tmp_path_factory, kind)[0])
    batch = make_batch(config.vocab_size, **SHAPE, seed=3)
    kwargs = {}
    if variant != "plain":
        kwargs["adapters"] = _random_adapters(config, seed=4)
        kwargs["extra_encoder_states"] = np.random.RandomState(5).randn(3, 4, config.d_model).astype(np.float32)
        kwargs["extra_encoder_mask"] = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    enc_tokens, dec_inputs = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    length = dec_inputs.shape[1]
    (encoded, full), variables = _prepare_fn(config, length)(params, enc_tokens, dec_inputs, **kwargs)
    cache = variables["cache"]
    k = cache["decoder"]["layers_0"]["self_attention"]["cached_key"]
    assert k.shape == (3, length, config.num_heads, config.d_kv) and not np.any(np.asarray(k))
    step = _step_fn(config, pass_length=kind != "v1_0")  # v1_0: the cache length is inferred from the cache
    for t in range(length):
        step_logits, cache = step(params, cache, encoded, enc_tokens, dec_inputs[:, t:t + 1], **kwargs)
        np.testing.assert_allclose(np.asarray(step_logits), np.asarray(full[:, t]), atol=TOL, rtol=0,
                                   err_msg=f"position {t}")
    assert int(cache["decoder"]["layers_0"]["self_attention"]["cache_index"]) == length
    with pytest.raises(ValueError, match=f"max_decode_length=5 but the cache was initialised for {length}"):
        jax.eval_shape(lambda: T5(config).apply({"params": params, "cache": cache}, encoded, enc_tokens,
                                                dec_inputs[:, :1], decode=True, max_decode_length=5,
                                                mutable=["cache"], method=T5.decode, **kwargs))
    with pytest.raises(ValueError, match=r"decode step: expected decoder_input_tokens of shape \(3, 1\)"):
        jax.eval_shape(lambda: T5(config).apply({"params": params, "cache": cache}, encoded, enc_tokens,
                                                dec_inputs[:, :2], decode=True, mutable=["cache"],
                                                method=T5.decode, **kwargs))


@pytest.fixture(scope="module")
def v1_1(tmp_path_factory):
    return load_t5(tiny_hf_t5(tmp_path_factory, "v1_1")[0])


def test_dropout_is_off_by_default_and_seeded_when_on(v1_1):
    config, params = v1_1
    config = config.replace(dropout_rate=0.3)
    batch = make_batch(config.vocab_size, **SHAPE, seed=0)
    args = (batch["encoder_input_tokens"],)  # the encoder only: dropout masks are slow to compile on CPU
    det = _apply(config, params, *args, method="encode")  # enable_dropout defaults to False: no rng needed
    drop = functools.partial(_jitted(config, "encode", enable_dropout=True), {"params": params}, *args)
    key = functools.partial(jax.random.key, impl="rbg")  # threefry dropout masks compile slowly on CPU
    a = drop(rngs={"dropout": key(1)})
    b = drop(rngs={"dropout": key(1)})
    c = drop(rngs={"dropout": key(2)})
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(det)).max() > 1e-3
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_bfloat16_compute_float32_params(v1_1):
    config, params = v1_1
    batch = make_batch(config.vocab_size, **SHAPE, seed=0)
    args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    fn = functools.partial(_jitted, name="encode_and_logits", method=_encode_and_logits)
    _, ref = fn(config)({"params": params}, *args)
    _, bf16 = fn(config.replace(dtype="bfloat16"))({"params": params}, *args)
    assert bf16.dtype == jnp.bfloat16
    assert jax.tree.reduce(lambda ok, x: ok and x.dtype == np.float32, params, True)
    # bfloat16 has ~3 significant digits: logits agree to a few percent of their range
    assert np.abs(np.asarray(bf16, np.float32) - np.asarray(ref)).max() < 0.05 * np.abs(np.asarray(ref)).max()


def test_dot_product_attention_matches_transformers_and_decodes(v1_1, tmp_path_factory):
    config, params = v1_1
    config = config.replace(attention="xla")
    torch_model = tiny_hf_t5(tmp_path_factory, "v1_1")[1]
    batch = make_batch(config.vocab_size, **SHAPE, seed=1)
    _, logits = _jitted(config, "encode_and_logits", method=_encode_and_logits)(
        {"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
        batch["decoder_target_tokens"])
    np.testing.assert_allclose(np.asarray(logits), hf_logits(torch_model, batch), atol=TOL, rtol=0)
    # the cache's step mask goes through the kernel's mask argument: each step equals teacher forcing
    enc_tokens, dec_inputs = batch["encoder_input_tokens"], batch["decoder_input_tokens"]
    (encoded, full), variables = _prepare_fn(config, dec_inputs.shape[1])(params, enc_tokens, dec_inputs)
    cache, step = variables["cache"], _step_fn(config, pass_length=True)
    for t in range(dec_inputs.shape[1]):
        step_logits, cache = step(params, cache, encoded, enc_tokens, dec_inputs[:, t:t + 1])
        np.testing.assert_allclose(np.asarray(step_logits), np.asarray(full[:, t]), atol=TOL, rtol=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention runs on a GPU only "
                    "(bench/gpu_check.sh runs this file with JAX_PLATFORMS=cuda)")
def test_cudnn_attention_matches_the_einsum_path_in_bfloat16(v1_1):
    """`attention="cudnn"` (the fused flash kernel, T5's relative bias as its bias): the einsum path's
    bfloat16 logits to bfloat16's rounding."""
    config, params = v1_1
    batch = make_batch(config.vocab_size, **SHAPE, seed=2)
    args = (batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    fn = functools.partial(_jitted, name="encode_and_logits", method=_encode_and_logits)
    bf16 = config.replace(dtype="bfloat16")
    _, ref = fn(bf16)({"params": params}, *args)
    _, fused = fn(bf16.replace(attention="cudnn"))({"params": params}, *args)
    ref, fused = np.asarray(ref, np.float32), np.asarray(fused, np.float32)
    assert np.abs(fused - ref).max() < 0.05 * np.abs(ref).max()
