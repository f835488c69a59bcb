"""LoRA entry points of the T5 against PEFT, per-example adapters, merging, and the adapters contract."""
from __future__ import annotations

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.hf import hf_module_name, load_t5
from tagi_jax.models import lora
from tagi_jax.models.t5 import T5
from tiny_hf import hf_logits, make_batch, random_adapters, tiny_hf_t5

TOL = 1e-4
SHAPE = dict(batch=3, enc_len=11, dec_len=8)


@functools.lru_cache(maxsize=None)
def _jitted(config, name: str = "__call__", method=None):
    """One compiled apply per (config, method): eager op-by-op execution is slow on CPU."""
    model = T5(config)
    method = method or getattr(T5, name)
    return jax.jit(lambda params, *args, **kwargs: model.apply({"params": params}, *args, method=method, **kwargs))


def _forward(config, params, batch, **kwargs):
    return np.asarray(_jitted(config)(params, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                                      batch["decoder_target_tokens"], **kwargs))


def _targets_for(config, hf_modules):
    """Our target names for a PEFT `target_modules` list (PEFT matches module names by suffix)."""
    out = []
    for block in lora.ATTENTION_BLOCKS:
        out += [f"{block}.{p}" for p in lora.ATTENTION_PROJECTIONS if p in hf_modules]
    for block in lora.FFN_BLOCKS:
        out += [f"{block}.{p}" for p in lora.FFN_PROJECTIONS if p in hf_modules]
    return out


def _peft_with_random_lora(torch_model, target_modules, r, alpha, seed):
    """A PEFT copy of `torch_model` with random non-zero lora_A / lora_B."""
    import peft
    import torch

    model = peft.get_peft_model(copy.deepcopy(torch_model),
                                peft.LoraConfig(target_modules=list(target_modules), r=r, lora_alpha=alpha,
                                                lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _adapters_from_peft(peft_model, config, targets, r, alpha):
    """PEFT stores lora_A.weight [r, d_in] and lora_B.weight [d_out, r]; ours: A [layers, d_in, r], B [layers, r, d_out]."""
    modules = dict(peft_model.base_model.model.named_modules())
    adapters = {}
    for target in targets:
        layers = lora.adapter_dims(config, target)[0]
        a = [modules[hf_module_name(target, i)].lora_A["default"].weight.detach().numpy().T for i in range(layers)]
        b = [modules[hf_module_name(target, i)].lora_B["default"].weight.detach().numpy().T for i in range(layers)]
        adapters[target] = {"A": jnp.asarray(np.stack(a)), "B": jnp.asarray(np.stack(b)),
                            "scale": jnp.float32(alpha / r)}
    return adapters


PEFT_CASES = [
    ("v1_1", ("q", "v")),  # TAGI's targets
    ("v1_0", ("k", "o", "wi", "wo")),
    ("odd_heads", ("q", "k", "v", "o", "wi_0", "wi_1", "wo")),
]


@pytest.mark.parametrize("kind,target_modules", PEFT_CASES)
def test_adapters_match_peft(kind, target_modules, tmp_path_factory):
    path, torch_model = tiny_hf_t5(tmp_path_factory, kind)
    config, params = load_t5(path)
    r, alpha = 4, 8
    peft_model = _peft_with_random_lora(torch_model, target_modules, r, alpha, seed=7)
    targets = _targets_for(config, target_modules)
    if target_modules == ("q", "v"):
        assert tuple(targets) == lora.DEFAULT_TARGETS
    adapters = _adapters_from_peft(peft_model, config, targets, r, alpha)
    batch = make_batch(config.vocab_size, **SHAPE, seed=11)
    extra = np.random.RandomState(3).randn(3, 5, config.d_model).astype(np.float32)
    extra_mask = jnp.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], jnp.int32)
    ours, encoded, fused = _jitted(config, "with_fusion", method=_logits_and_fused_logits)(
        params, batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"],
        adapters, extra, extra_mask)
    ref = hf_logits(peft_model, batch)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=TOL, rtol=0)
    assert np.abs(hf_logits(torch_model, batch) - ref).max() > 1e-2  # the LoRA weights matter

    # Instruction fusion: extra states in front of the encoder output; cross-attention k/v adapters see them.
    import torch

    memory = torch.as_tensor(np.concatenate([np.asarray(extra), np.asarray(encoded)], axis=1))
    memory_mask = torch.as_tensor(np.concatenate([np.asarray(extra_mask),
                                                  batch["encoder_input_tokens"] > 0], axis=1)).long()
    with torch.no_grad():
        ref = peft_model(encoder_outputs=(memory,), attention_mask=memory_mask,
                         decoder_input_ids=torch.as_tensor(batch["decoder_input_tokens"]).long(),
                         decoder_attention_mask=torch.as_tensor(batch["decoder_target_tokens"] > 0).long()).logits
    np.testing.assert_allclose(np.asarray(fused), ref.numpy(), atol=TOL, rtol=0)


def _logits_and_fused_logits(module, enc, dec, tgt, adapters, extra, extra_mask):
    """__call__ logits, the encoder output, and logits with fused extra states (one compiled call)."""
    encoded = module.encode(enc, adapters=adapters)
    fused = module.decode(encoded, enc, dec, tgt, adapters=adapters, extra_encoder_states=extra,
                          extra_encoder_mask=extra_mask)
    return module(enc, dec, tgt, adapters=adapters), encoded, fused


@pytest.fixture(scope="module")
def v1_1(tmp_path_factory):
    return load_t5(tiny_hf_t5(tmp_path_factory, "v1_1")[0])


def _random_adapters(config, batch=None, seed=0, targets=None):
    targets = targets or lora.DEFAULT_TARGETS + ("encoder_self.o", "decoder_cross.k", "encoder_ffn.wi_1",
                                                 "decoder_ffn.wo")
    return jax.tree.map(jnp.asarray, random_adapters(config, targets, rank=3, batch=batch, seed=seed))


def test_shared_adapter_forms_agree(v1_1):
    """No batch axis, batch 1 (broadcast) and a repeated batch axis are the same adapter."""
    config, params = v1_1
    batch = make_batch(config.vocab_size, **SHAPE, seed=1)
    shared = _random_adapters(config)
    ref = _forward(config, params, batch, adapters=shared)
    one = jax.tree.map(lambda x: x[None] if x.ndim == 3 else x, shared)
    np.testing.assert_allclose(_forward(config, params, batch, adapters=one), ref, atol=1e-5, rtol=0)
    # expand_batch (beams) leaves shared factors alone and repeats per-example ones
    assert lora.expand_batch(one, 4)["encoder_self.q"]["A"].shape[0] == 1
    assert lora.expand_batch(shared, 4)["encoder_self.q"]["A"].ndim == 3
    per_example = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0) if x.ndim == 4 else x, one)
    expanded = lora.expand_batch(per_example, 3)["encoder_self.q"]["A"]
    assert expanded.shape[0] == 6 and np.array_equal(expanded[1], per_example["encoder_self.q"]["A"][0])


def test_per_example_adapters_equal_running_each_example_alone(v1_1):
    config, params = v1_1
    batch = make_batch(config.vocab_size, **SHAPE, seed=2)
    adapters = _random_adapters(config, batch=3, seed=5)
    together = _forward(config, params, batch, adapters=adapters)
    for i in range(3):
        alone = _forward(config, params, {k: v[i:i + 1] for k, v in batch.items()},
                         adapters=jax.tree.map(lambda x: x[i:i + 1] if x.ndim == 4 else x, adapters))
        np.testing.assert_allclose(together[i:i + 1], alone, atol=1e-5, rtol=0)
    # different adapters give different outputs (the test above is not trivially satisfied)
    swapped = _forward(config, params, batch, adapters=jax.tree.map(
        lambda x: jnp.roll(x, 1, axis=0) if x.ndim == 4 else x, adapters))
    assert np.abs(swapped - together).max() > 1e-2


@pytest.mark.parametrize("with_batch_axis", [False, True])
def test_merge_adapter_equals_factorised(v1_1, with_batch_axis):
    config, params = v1_1
    batch = make_batch(config.vocab_size, **SHAPE, seed=3)
    adapters = _random_adapters(config, batch=1 if with_batch_axis else None, seed=9)
    factorised = _forward(config, params, batch, adapters=adapters)
    merged_params = lora.merge_adapter(params, adapters)
    merged = _forward(config, merged_params, batch)
    np.testing.assert_allclose(merged, factorised, atol=TOL, rtol=0)
    assert np.abs(merged - _forward(config, params, batch)).max() > 1e-2
    # the input tree is left alone; untouched kernels are shared, touched ones replaced
    q = ("encoder", "layers_0", "attention", "query", "kernel")
    get = lambda tree, path: functools.reduce(lambda node, key: node[key], path, tree)
    assert get(merged_params, q) is not get(params, q)
    assert not np.allclose(get(merged_params, q), get(params, q))
    k = ("encoder", "layers_0", "attention", "key", "kernel")
    assert get(merged_params, k) is get(params, k)


def test_merge_adapter_rejects_per_example_adapters(v1_1):
    config, params = v1_1
    with pytest.raises(ValueError, match=r"merge_adapter: adapters\['encoder_self.q'\] has a batch of 3"):
        lora.merge_adapter(params, _random_adapters(config, batch=3, targets=("encoder_self.q",)))


def test_lora_delta_is_the_low_rank_update():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 6).astype(np.float32)
    a, b = rng.randn(2, 6, 3).astype(np.float32), rng.randn(2, 3, 4).astype(np.float32)
    got = lora.lora_delta(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b), jnp.float32(0.5))
    want = np.stack([x[i] @ (0.5 * a[i] @ b[i]) for i in range(2)])
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
    shared = lora.lora_delta(jnp.asarray(x), jnp.asarray(a[0]), jnp.asarray(b[0]), jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(shared), x @ (2.0 * a[0] @ b[0]), atol=1e-5)
    one = lora.lora_delta(jnp.asarray(x), jnp.asarray(a[:1]), jnp.asarray(b[:1]), jnp.float32(2.0))
    np.testing.assert_allclose(np.asarray(one), np.asarray(shared), atol=1e-6)
    entry = {"A": jnp.asarray(a[:, None]), "B": jnp.asarray(b[:, None]), "scale": 0.5}
    np.testing.assert_allclose(np.asarray(lora.delta_weight(entry))[:, 0], 0.5 * a @ b, atol=1e-5)


def test_init_adapters_is_a_zero_update_like_peft(v1_1):
    config, _ = v1_1
    adapters = jax.jit(lambda key: lora.init_adapters(key, config, lora.DEFAULT_TARGETS, rank=8, alpha=16,
                                                      batch=2))(jax.random.key(0, impl="rbg"))
    for target, entry in adapters.items():
        layers, d_in, d_out = lora.adapter_dims(config, target)
        assert entry["A"].shape == (2, layers, d_in, 8) and entry["B"].shape == (2, layers, 8, d_out)
        assert not np.any(np.asarray(entry["B"])) and np.any(np.asarray(entry["A"]))
        assert np.abs(np.asarray(entry["A"])).max() <= d_in ** -0.5
        assert float(entry["scale"]) == 2.0
    lora.check_adapters(config, adapters, batch=2)


def test_bad_adapters_give_clear_errors(v1_1):
    config, params = v1_1
    good = _random_adapters(config, batch=3, targets=("decoder_cross.v",))
    with pytest.raises(ValueError, match=r"adapters\['decoder_cross.v'\]: batch axis 3 does not match the input "
                                         r"batch 2"):
        lora.check_adapters(config, good, batch=2)
    bad = {"decoder_cross.v": dict(good["decoder_cross.v"], A=good["decoder_cross.v"]["A"][:, :, :5])}
    with pytest.raises(ValueError, match=r"adapters\['decoder_cross.v'\]: A \(3, 2, 5, 3\)"):
        lora.check_adapters(config, bad)
    with pytest.raises(ValueError, match=r"'encoder_ffn.wi' does not exist in a 'gated-gelu' T5"):
        lora.adapter_dims(config, "encoder_ffn.wi")
    with pytest.raises(ValueError, match=r"unknown target 'encoder_self.x'"):
        lora.check_adapters(config, {"encoder_self.x": good["decoder_cross.v"]})
    batch = make_batch(config.vocab_size, batch=2, enc_len=4, dec_len=3)
    with pytest.raises(ValueError, match=r"batch axis 3 does not match the input batch 2"):  # checked by the model
        T5(config).apply({"params": params}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                         adapters=good)


def test_block_factors_and_param_paths():
    entry = {"A": jnp.zeros((2, 4, 5, 3)), "B": jnp.zeros((2, 4, 3, 6)), "scale": 2.0}
    factors = lora.block_factors({"decoder_cross.k": entry, "decoder_self.q": entry}, "decoder_cross", 1)
    assert set(factors) == {"k"}
    a, b, s = factors["k"]
    assert a.shape == (2, 5, 3) and b.shape == (2, 3, 6) and float(s) == 2.0
    assert lora.target_param_path("decoder_cross.k", 1) == ("decoder", "layers_1", "encoder_decoder_attention",
                                                            "key", "kernel")
    assert lora.target_param_path("encoder_ffn.wi_0", 0) == ("encoder", "layers_0", "mlp", "wi_0", "kernel")


def test_layer_split_adapters_give_the_same_logits():
    """`lora.split_layers` (what decoding uses before its loop) changes the layout, not the result."""
    import jax
    import numpy as np
    from tagi_jax.models import lora as lora_lib
    from tagi_jax.models.t5 import T5
    from tagi_jax.models.t5_config import tiny_config

    cfg = tiny_config()
    model = T5(cfg)
    rng = np.random.default_rng(0)
    enc = rng.integers(3, cfg.vocab_size, size=(3, 7)).astype(np.int32)
    dec = rng.integers(3, cfg.vocab_size, size=(3, 5)).astype(np.int32)
    params = model.init(jax.random.key(0), enc, dec, dec)["params"]
    adapters = {}
    for target in lora_lib.DEFAULT_TARGETS:
        layers, d_in, d_out = lora_lib.adapter_dims(cfg, target)
        adapters[target] = {"A": rng.normal(size=(3, layers, d_in, 2)).astype(np.float32),
                            "B": rng.normal(size=(3, layers, 2, d_out)).astype(np.float32), "scale": 0.5}
    split = lora_lib.split_layers(adapters)
    assert isinstance(split["encoder_self.q"]["A"], tuple)
    lora_lib.check_adapters(cfg, split, batch=3)
    full = model.apply({"params": params}, enc, dec, dec, adapters=adapters)
    layered = model.apply({"params": params}, enc, dec, dec, adapters=split)
    np.testing.assert_allclose(np.asarray(layered), np.asarray(full), atol=1e-6)
