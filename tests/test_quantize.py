"""The int8 frozen backbone (`model.backbone_weights = "int8"`): per-channel quantisation against values written
here, the int8 matmul and T5 against numpy, merged adapters, and a tiny pipeline whose finetune stage holds its
frozen backbone as int8, started from float stages (on the 8 fake devices)."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tagi_jax.config import ConfigError
from tagi_jax.models import lora, quantize
from tagi_jax.models import t5 as t5_lib
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run import defaults as run_defaults
from tagi_jax.run import pipeline, stages
from tagi_jax.run import workdir as run_workdir
from tagi_jax.trainer import checkpoints
from tagi_jax.trainer.train_state import check_float32

from test_pipeline import tiny_config

TINY_T5 = T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1,
                   num_decoder_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=16)


def test_per_channel_quantisation_matches_hand_values():
    w = np.array([[1.0, -0.5, 0.0], [0.25, 2.0, 0.0], [-1.27, 0.0, 0.0]], np.float32)
    q, scale = quantize.quantize_kernel(w)
    # Column 0: absmax 1.27 -> scale 0.01, values 100, 25, -127. Column 1: absmax 2 -> scale 2/127;
    # -0.5 * 127 / 2 = -31.75 -> -32. Column 2 is all zero: scale 0, values 0.
    np.testing.assert_allclose(np.asarray(scale), [0.01, 2.0 / 127, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(q), [[100, -32, 0], [25, 127, 0], [-127, 0, 0]])
    assert q.dtype == jnp.int8
    back = np.asarray(quantize.dequantize_kernel(q, scale))
    np.testing.assert_allclose(back, [[1.0, -32 * 2 / 127, 0], [0.25, 2.0, 0], [-1.27, 0, 0]], rtol=1e-6)


def test_quantisation_error_is_at_most_half_a_step():
    w = np.random.default_rng(0).normal(size=(64, 48)).astype(np.float32)
    q, scale = quantize.quantize_kernel(w)
    step = np.abs(w).max(axis=0) / 127
    err = np.abs(np.asarray(quantize.dequantize_kernel(q, scale)) - w)
    assert np.all(err <= step / 2 + 1e-7)
    assert int(np.abs(np.asarray(q, np.int32)).max()) == 127


def test_int8_matmul_equals_numpy_on_the_dequantised_kernel():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(3, 5, 32)).astype(np.float32), rng.normal(size=(32, 24)).astype(np.float32)
    q, scale = quantize.quantize_kernel(w)
    expected = x @ (np.asarray(q, np.float64) * np.asarray(scale, np.float64))
    got = np.asarray(quantize.int8_matmul(jnp.asarray(x), q, scale, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def t5_trees():
    model = T5(TINY_T5)
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 64, size=(2, 7)), jnp.int32)
    targets = jnp.asarray(np.random.default_rng(3).integers(2, 64, size=(2, 5)), jnp.int32)
    params = nn.meta.unbox(t5_lib.init_params(TINY_T5, jax.random.key(0)))
    return model, params, tokens, targets


def _logits(model, params, tokens, targets):
    return np.asarray(model.apply({"params": params}, tokens, targets))


def test_int8_t5_equals_float_t5_on_the_dequantised_weights(t5_trees):
    model, params, tokens, targets = t5_trees
    q = quantize.quantize_params(params)
    kernels = [p for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"]
    assert len(quantize.quantized_kernel_paths(q)) == len(kernels) > 0
    assert quantize.param_bytes(q) < 0.5 * quantize.param_bytes(params)
    int8_logits = _logits(model, q, tokens, targets)
    np.testing.assert_allclose(int8_logits, _logits(model, quantize.dequantize_params(q), tokens, targets),
                               rtol=1e-4, atol=1e-4)
    float_logits = _logits(model, params, tokens, targets)
    delta = np.abs(int8_logits - float_logits).max()
    assert 0 < delta < 0.05 * np.abs(float_logits).max()


def test_merging_an_adapter_into_an_int8_kernel_gives_a_float_kernel(t5_trees):
    _, params, _, _ = t5_trees
    q = quantize.quantize_params(params)
    adapters = lora.init_adapters(jax.random.key(1), TINY_T5, ["encoder_self.q"], rank=2, b_stddev=0.1)
    merged = lora.merge_adapter(q, adapters)
    node = merged["encoder"]["layers_0"]["attention"]["query"]
    assert "kernel_scale" not in node and node["kernel"].dtype == jnp.float32
    qnode = q["encoder"]["layers_0"]["attention"]["query"]
    a, b = np.asarray(adapters["encoder_self.q"]["A"][0]), np.asarray(adapters["encoder_self.q"]["B"][0])
    expected = np.asarray(qnode["kernel"], np.float32) * np.asarray(qnode["kernel_scale"]) + (2 / 2) * (a @ b) * 0 + \
        float(adapters["encoder_self.q"]["scale"]) * (a @ b)
    np.testing.assert_allclose(np.asarray(node["kernel"]), expected, rtol=1e-5, atol=1e-6)
    assert q["encoder"]["layers_0"]["attention"]["query"]["kernel"].dtype == jnp.int8  # the input is untouched


def test_bad_backbone_weights_is_a_config_error():
    c = tiny_config()
    c.model.backbone_weights = "int4"
    with pytest.raises(ConfigError, match="model.backbone_weights"):
        run_defaults.validate(c)


def test_stage_trees_hold_only_frozen_backbone_kernels_as_int8():
    c = tiny_config()
    model_cfg = run_defaults.tagi_config(c, num_teachers=2)
    shapes = lambda stage, policy: traverse_util.flatten_dict(jax.eval_shape(  # noqa: E731
        lambda r: nn.meta.unbox(stages.stage_init_fn(stage, model_cfg, "int8", policy)(r)), jax.random.key(0)))
    finetune = shapes("finetune", "none")
    int8 = {p for p, x in finetune.items() if x.dtype == jnp.int8}
    assert int8 and all(p[-1] == "kernel" and "t5" in p for p in int8)
    assert {p[0] for p in int8} == {"student", "teacher"}
    assert all(finetune[p[:-1] + ("kernel_scale",)].shape == finetune[p].shape[-1:] for p in int8)
    assert not any(x.dtype == jnp.int8 for p, x in finetune.items() if "hypernet" in p)
    check_float32(traverse_util.unflatten_dict(finetune))  # int8 kernels with their scales are allowed beside float32 parameters
    # "all" trains the student's backbone: only the frozen teacher's kernels are int8; the backbone stage trains
    # every kernel, so nothing is.
    assert {p[0] for p, x in shapes("finetune", "all").items() if x.dtype == jnp.int8} == {"teacher"}
    assert not any(x.dtype == jnp.int8 for x in shapes("backbone", "none").values())


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """teachers and pretrain in float32, then finetune with its frozen backbone in int8 (the backbone frozen by
    the paper's policy), evaluated."""
    workdir = str(tmp_path_factory.mktemp("int8"))
    c = tiny_config(steps=1)
    c.tagi.train_backbone = "none"
    c.pipeline.stages, c.pipeline.evaluate = ("teachers", "pretrain"), ()
    c.stages.teachers.init_from = c.stages.pretrain.init_from = ""  # from the fresh initialisation
    pipeline.run(c, workdir)
    c.model.backbone_weights = "int8"
    c.pipeline.stages, c.pipeline.evaluate = ("finetune",), ("tagi",)
    result = pipeline.run(c, workdir)
    return workdir, result


def test_finetune_holds_the_float_backbone_quantised_and_keeps_it(int8_run):
    workdir, result = int8_run
    assert result["stages"][0]["step"] == 1 and "tagi" in result["summary"]
    pretrain = traverse_util.flatten_dict(checkpoints.load_host_params(os.path.join(workdir, "pretrain")))
    finetune = traverse_util.flatten_dict(checkpoints.load_host_params(os.path.join(workdir, "finetune")))
    path = ("t5", "encoder", "layers_0", "attention", "query")
    w = np.asarray(pretrain[path + ("kernel",)], np.float64)
    scale = np.abs(w).max(axis=0) / 127
    expected_q = np.clip(np.round(w / scale), -127, 127)
    for root in ("student",):
        np.testing.assert_array_equal(np.asarray(finetune[(root,) + path + ("kernel",)], np.float64), expected_q)
        np.testing.assert_allclose(np.asarray(finetune[(root,) + path + ("kernel_scale",)]), scale, rtol=1e-6)
    assert finetune[("teacher",) + path + ("kernel",)].dtype == np.int8
    assert finetune[("student", "hypernet") + next(iter(
        p[2:] for p in finetune if p[:2] == ("student", "hypernet")))].dtype == np.float32


def test_load_trained_converts_between_storages(int8_run):
    workdir, _ = int8_run
    _, _, as_saved = run_workdir.load_trained(workdir, "tagi")
    _, _, as_float = run_workdir.load_trained(workdir, "tagi", backbone_weights="float")
    node = as_saved["t5"]["encoder"]["layers_0"]["attention"]["query"]
    assert node["kernel"].dtype == jnp.int8
    back = as_float["t5"]["encoder"]["layers_0"]["attention"]["query"]
    assert "kernel_scale" not in back and back["kernel"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(back["kernel"]),
                               np.asarray(node["kernel"], np.float32) * np.asarray(node["kernel_scale"]), rtol=1e-6)
    with pytest.raises(ValueError, match="backbone_weights"):
        run_workdir.load_trained(workdir, "tagi", backbone_weights="int4")
