"""tagi_jax.hf: checkpoint formats, the name mapping both ways, and clear errors on bad checkpoints."""
from __future__ import annotations

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tagi_jax import hf
from tagi_jax.models import lora
from tiny_hf import hf_logits, make_batch, tiny_hf_t5


@pytest.fixture(scope="module")
def v1_1(tmp_path_factory):
    path, torch_model = tiny_hf_t5(tmp_path_factory, "v1_1")
    config, params = hf.load_t5(path)
    return path, torch_model, config, params


@pytest.fixture(scope="module")
def v1_0(tmp_path_factory):
    path, torch_model = tiny_hf_t5(tmp_path_factory, "v1_0")
    config, params = hf.load_t5(path)
    return path, torch_model, config, params


def _flat(params):
    from flax import traverse_util

    return traverse_util.flatten_dict(params)


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)


# ------------------------------------------------------------------------------------------------------
# The name mapping.
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v1_0", "v1_1", "odd_heads"])
def test_name_map_is_a_bijection_onto_the_torch_state_dict(kind, tmp_path_factory):
    path, torch_model = tiny_hf_t5(tmp_path_factory, kind)
    config, params = hf.load_t5(path)
    names = hf.hf_name_map(config)
    assert set(names) == set(_flat(params))  # every parameter of ours, nothing else
    torch_state = {k: v.numpy() for k, v in torch_model.state_dict().items()
                   if k not in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")}
    if config.tie_word_embeddings:
        torch_state.pop("lm_head.weight")
    hf_names = [name for name, _ in names.values()]
    assert len(set(hf_names)) == len(hf_names)
    assert set(hf_names) == set(torch_state)
    for our_path, (name, transpose) in names.items():
        value = np.asarray(_flat(params)[our_path])
        np.testing.assert_array_equal(value.T if transpose else value, torch_state[name])


def test_to_hf_state_dict_round_trips_through_transformers(v1_1, v1_0, tmp_path):
    import torch
    import transformers

    for i, (_, torch_model, config, params) in enumerate((v1_1, v1_0)):
        state = hf.to_hf_state_dict(config, params)
        torch_state = torch_model.state_dict()
        for name, value in state.items():  # exactly the torch weights (transposes undone)
            np.testing.assert_array_equal(value, torch_state[name].numpy(), err_msg=name)
        # change the weights, save, and let transformers load the files
        params = jax.tree.map(lambda x: np.asarray(x) * 1.1, params)
        out = hf.save_t5_hf(str(tmp_path / f"m{i}"), config, params)
        loaded = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
        scaled = copy.deepcopy(torch_model)
        with torch.no_grad():
            for p in scaled.parameters():
                p.mul_(1.1)
        batch = make_batch(config.vocab_size, batch=2, enc_len=7, dec_len=5, seed=i)
        np.testing.assert_allclose(hf_logits(loaded, batch), hf_logits(scaled, batch), atol=1e-5, rtol=0)
        reloaded_config, reloaded = hf.load_t5(out)
        assert reloaded_config == config
        _assert_same_params(reloaded, params)


def test_encoder_fusion_blocks_are_not_dropped_silently_on_export():
    """A Hugging Face T5 has no encoder-fusion blocks: exporting a tree with them is an error, not a model
    that computes something else."""
    from tagi_jax.models.t5 import init_params
    from tagi_jax.models.t5_config import tiny_config

    config = tiny_config()
    params = jax.eval_shape(lambda r: init_params(config, r, fusion_len=2), jax.random.key(0))
    with pytest.raises(ValueError, match="encoder-fusion blocks .*encoder/layers_0/instruction_attention"):
        hf.to_hf_state_dict(config, params)

@pytest.mark.parametrize("kind", ["v1_0", "odd_heads"])
def test_hf_module_name_names_the_projection_each_target_modifies(kind, tmp_path_factory):
    path, torch_model = tiny_hf_t5(tmp_path_factory, kind)
    config, _ = hf.load_t5(path)
    modules = dict(torch_model.named_modules())
    ffn = ("wi_0", "wi_1", "wo") if config.is_gated else ("wi", "wo")
    targets = [f"{b}.{p}" for b in lora.ATTENTION_BLOCKS for p in lora.ATTENTION_PROJECTIONS]
    targets += [f"{b}.{p}" for b in lora.FFN_BLOCKS for p in ffn]
    for target in targets:
        layers, d_in, d_out = lora.adapter_dims(config, target)
        for layer in range(layers):
            name = hf.hf_module_name(target, layer)
            linear = modules[name]
            assert (linear.in_features, linear.out_features) == (d_in, d_out), name
            # and it is the weight our target_param_path points at
            assert lora.target_param_path(target, layer) in hf.hf_name_map(config)
            assert hf.hf_name_map(config)[lora.target_param_path(target, layer)] == (f"{name}.weight", True)
    assert hf.hf_module_name("encoder_self.q", 0) == "encoder.block.0.layer.0.SelfAttention.q"
    assert hf.hf_module_name("decoder_cross.v", 1) == "decoder.block.1.layer.1.EncDecAttention.v"
    assert hf.hf_module_name("decoder_ffn.wo", 1) == "decoder.block.1.layer.2.DenseReluDense.wo"


# ------------------------------------------------------------------------------------------------------
# Other checkpoint formats.
# ------------------------------------------------------------------------------------------------------


def test_pytorch_bin_and_sharded_safetensors_load_the_same_params(v1_1, tmp_path):
    import torch

    path, torch_model, config, params = v1_1
    # transformers 5 only writes safetensors; older checkpoints (T0, Tk-Instruct) are torch.save'd state
    # dicts that also hold the per-stack embedding copies
    os.makedirs(tmp_path / "bin")
    shutil.copy(os.path.join(path, "config.json"), tmp_path / "bin")
    state = torch_model.state_dict()
    assert "encoder.embed_tokens.weight" in state
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert os.path.isfile(tmp_path / "sharded" / "model.safetensors.index.json")
    assert not os.path.isfile(tmp_path / "sharded" / "model.safetensors")
    for sub in ("bin", "sharded"):
        other_config, other = hf.load_t5(str(tmp_path / sub))
        assert other_config == config
        _assert_same_params(other, params)


def test_compute_dtype_and_param_dtype(v1_1):
    path, _, config, params = v1_1
    bf_config, bf_params = hf.load_t5(path, dtype="bfloat16")
    assert bf_config.dtype == "bfloat16" and bf_config.param_dtype == "float32"
    _assert_same_params(bf_params, params)
    _, half = hf.load_t5(path, param_dtype="bfloat16")
    assert all(str(x.dtype) == "bfloat16" for x in _flat(half).values())


def test_equal_lm_head_counts_as_tied(v1_0, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy_checkpoint(v1_0[0], tmp_path / "ckpt")
    state = load_file(os.path.join(path, "model.safetensors"))
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["shared.weight"].copy()  # older exports store the tied copy
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    config, params = hf.load_t5(path)
    assert config.tie_word_embeddings and "logits_dense" not in params["decoder"]


# ------------------------------------------------------------------------------------------------------
# Errors: one line naming the file / key.
# ------------------------------------------------------------------------------------------------------


def test_missing_directory_config_and_weights(v1_1, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        hf.load_t5(str(tmp_path / "nope"))
    path = _copy_checkpoint(v1_1[0], tmp_path / "no_config")
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match=r"config\.json: missing"):
        hf.load_t5(path)
    path = _copy_checkpoint(v1_1[0], tmp_path / "no_weights")
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*pytorch_model\.bin"):
        hf.load_t5(path)


def test_missing_shard(v1_1, tmp_path):
    v1_1[1].save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(f for f in os.listdir(tmp_path / "sharded") if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / "sharded" / shard)
    with pytest.raises(FileNotFoundError, match=f"{shard}: missing checkpoint shard"):
        hf.load_t5(str(tmp_path / "sharded"))


def test_missing_tensor_names_the_key(v1_1, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy_checkpoint(v1_1[0], tmp_path / "ckpt")
    state = load_file(os.path.join(path, "model.safetensors"))
    del state["decoder.block.1.layer.1.EncDecAttention.v.weight"]
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"decoder\.block\.1\.layer\.1\.EncDecAttention\.v\.weight"):
        hf.load_t5(path)


@pytest.mark.parametrize("changes,match", [
    ({"model_type": "bart", "architectures": ["BartForConditionalGeneration"]}, r"model_type 'bart'.*not a T5"),
    ({"feed_forward_proj": "gated-silu"}, r"feed_forward_proj 'gated-silu' is not supported"),
    ({"d_ff": 48}, r"model\.safetensors: tensor encoder\.block\.0\.layer\.1\.DenseReluDense\.wi_0\.weight has "
                   r"shape \(64, 32\), expected \(48, 32\) from .*config\.json"),
    ({"num_layers": 3, "num_decoder_layers": 2}, r"has no tensor 'encoder\.block\.2\."),
])
def test_bad_config_gives_a_clear_error(v1_1, tmp_path, changes, match):
    path = _copy_checkpoint(v1_1[0], tmp_path / "ckpt")
    _edit_config(path, **changes)
    with pytest.raises((ValueError, KeyError), match=match):
        hf.load_t5(path)


def test_fewer_layers_in_config_than_checkpoint_is_an_error(v1_1, tmp_path):
    path = _copy_checkpoint(v1_1[0], tmp_path / "ckpt")
    _edit_config(path, num_layers=1, num_decoder_layers=1)
    with pytest.raises(ValueError, match=r"unexpected tensors .*block\.1\."):
        hf.load_t5(path)
