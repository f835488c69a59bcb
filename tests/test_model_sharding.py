"""The T5 on a (data=4, model=2) mesh of 8 fake CPU devices (tests/conftest.py): every parameter named,
parameters really split, sharded forward == single-device forward, model-info lists every parameter. The
tree includes the encoder-fusion sub-blocks (initialised with instruction states), so they are covered too."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from tagi_jax import partitioning
from tagi_jax.models import lora
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import tiny_config
from tiny_hf import random_adapters

BATCH, ENC_LEN, DEC_LEN, FUSION_LEN = 8, 12, 6, 5


def _batch(config):
    rng = np.random.RandomState(0)
    enc = rng.randint(3, config.vocab_size, (BATCH, ENC_LEN)).astype(np.int32)
    tgt = rng.randint(3, config.vocab_size, (BATCH, DEC_LEN)).astype(np.int32)
    for i in range(BATCH):  # padding
        enc[i, ENC_LEN - i:] = 0
        tgt[i, DEC_LEN - i % DEC_LEN:] = 0
    tgt[:, 0] = np.maximum(tgt[:, 0], 3)
    dec = np.zeros_like(tgt)
    dec[:, 1:] = tgt[:, :-1]
    return enc, dec, tgt


def _fusion_inputs(config):
    """Instruction states [BATCH, FUSION_LEN, d_model] for the encoder fusion, with padding."""
    rng = np.random.RandomState(1)
    states = rng.randn(BATCH, FUSION_LEN, config.d_model).astype(np.float32)
    mask = np.arange(FUSION_LEN)[None, :] < (1 + np.arange(BATCH) % FUSION_LEN)[:, None]
    return states, mask


def _init_fn(config):
    model = T5(config)
    dummy = jnp.ones((1, 4), jnp.int32)
    states = jnp.zeros((1, 3, config.d_model), jnp.float32)
    return lambda rng: model.init(rng, dummy, dummy, dummy, encoder_fusion_states=states)


@pytest.fixture(scope="module", params=[False, True], ids=["tp", "tp+fsdp"])
def sharded(request):
    # gated v1.1 and a tied v1.0 variant share the test; heads*d_kv != d_model in the first
    config = tiny_config(vocab_size=320, d_kv=6) if not request.param else tiny_config(
        feed_forward_proj="relu", tie_word_embeddings=True)
    mesh = partitioning.create_mesh(data=4, model=2)
    rules = partitioning.logical_axis_rules(fsdp=request.param)
    params, mesh_specs, logical = partitioning.sharded_init(_init_fn(config), mesh, rules, jax.random.PRNGKey(0))
    return config, mesh, rules, params, mesh_specs, logical, request.param


def test_every_parameter_has_logical_names(sharded):
    config = sharded[0]
    abstract = jax.eval_shape(_init_fn(config), jax.random.PRNGKey(0))
    assert partitioning.unnamed_parameters(abstract) == []
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract["params"]))
    specs = traverse_util.flatten_dict(nn.get_partition_spec(abstract)["params"])
    for path, leaf in flat.items():
        assert len(specs[path]) == len(leaf.shape), path  # one logical name per dimension


def test_model_axis_parameters_are_split(sharded):
    config, mesh, rules, params, mesh_specs, logical, fsdp = sharded
    flat = traverse_util.flatten_dict(params["params"])
    flat_logical = traverse_util.flatten_dict(logical["params"])
    expected = {
        ("token_embedder", "embedding"): ("vocab", "embed"),
        ("encoder", "layers_0", "mlp", "wo", "kernel"): ("mlp", "embed"),
        ("encoder", "layers_0", "attention", "query", "kernel"): ("embed", "joined_kv"),
        ("decoder", "layers_1", "encoder_decoder_attention", "out", "kernel"): ("joined_kv", "embed"),
        ("decoder", "relpos_bias", "rel_embedding"): ("heads", "relpos_buckets"),
        ("decoder", "decoder_norm", "scale"): ("embed",),
        ("encoder", "layers_0", "instruction_attention", "key", "kernel"): ("embed", "joined_kv"),
        ("encoder", "layers_1", "instruction_attention", "out", "kernel"): ("joined_kv", "embed"),
        ("encoder", "layers_1", "pre_instruction_attention_layer_norm", "scale"): ("embed",),
    }
    if config.is_gated:
        expected[("decoder", "logits_dense", "kernel")] = ("embed", "vocab")
        expected[("encoder", "layers_1", "mlp", "wi_0", "kernel")] = ("embed", "mlp")
    else:
        expected[("encoder", "layers_1", "mlp", "wi", "kernel")] = ("embed", "mlp")
        assert ("decoder", "logits_dense", "kernel") not in flat
    for path, names in expected.items():
        assert tuple(flat_logical[path]) == names, path
    split = 0
    for path, x in flat.items():
        names = tuple(flat_logical[path])
        model_split = any(n in ("vocab", "mlp", "heads", "joined_kv") for n in names)
        data_split = fsdp and "embed" in names
        shard = x.sharding.shard_shape(x.shape)
        if model_split or data_split:
            assert shard != x.shape, path
            expected_size = x.size // (2 if model_split else 1) // (4 if data_split else 1)
            assert np.prod(shard) == expected_size, (path, shard)
            split += 1
        else:
            assert shard == x.shape, path
    assert split > len(flat) // 2
    emb = flat[("token_embedder", "embedding")]
    assert emb.sharding.shard_shape(emb.shape) == ((config.vocab_size // 2, config.d_model // 4) if fsdp
                                                    else (config.vocab_size // 2, config.d_model))


def test_sharded_forward_equals_single_device(sharded):
    config, mesh, rules, params, mesh_specs, logical, fsdp = sharded
    model = T5(config)
    enc, dec, tgt = _batch(config)
    adapters = random_adapters(config, lora.DEFAULT_TARGETS, rank=2, batch=BATCH, seed=1)
    states, mask = _fusion_inputs(config)
    # The fusion output projections start at zero; give them weight so the sharded fusion path is compared.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 if "instruction_attention']['out" in jax.tree_util.keystr(path) else x, params)

    def forward(params, enc, dec, tgt, states, mask, adapters):
        return model.apply(params, enc, dec, tgt, adapters=adapters, encoder_fusion_states=states,
                           encoder_fusion_mask=mask)

    # single device: a copy of the parameters on device 0
    device = jax.devices()[0]
    local = jax.device_put(jax.tree.map(np.asarray, params), device)
    want = jax.jit(forward)(local, enc, dec, tgt, states, mask, adapters)
    zero_fusion = jax.tree_util.tree_map_with_path(
        lambda path, x: x * 0 if "instruction_attention']['out" in jax.tree_util.keystr(path) else x, local)
    assert np.abs(np.asarray(want) - np.asarray(jax.jit(forward)(zero_fusion, enc, dec, tgt, states, mask,
                                                                 adapters))).max() > 1e-3  # fusion is in play

    batch_shardings = partitioning.batch_shardings(mesh, (enc, dec, tgt, states, mask))
    # per-example factors split over `data` like the batch; the scalar scales replicated
    batch_shardings += (jax.tree.map(lambda x: partitioning.data_sharding(mesh, x.ndim) if x.ndim
                                     else partitioning.replicated(mesh), adapters),)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    inputs = jax.device_put((enc, dec, tgt, states, mask, adapters), batch_shardings)
    # jax.set_mesh, not the legacy `with mesh:` (with which flax's logical constraints are silently no-ops)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        got = jax.jit(forward, in_shardings=(param_shardings,) + tuple(batch_shardings))(params, *inputs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=0)
    # the activation constraints are in force (without them XLA is free to gather the batch, and does with
    # fsdp): logits ('batch', 'length', 'vocab') -> batch over `data`, vocabulary over `model`
    assert got.sharding.spec == jax.sharding.PartitionSpec("data", None, "model")
    assert got.sharding.shard_shape(got.shape) == (BATCH // 4, DEC_LEN, config.vocab_size // 2)


def test_model_info_lists_every_parameter(sharded, tmp_path):
    config, mesh, rules, params, mesh_specs, logical, fsdp = sharded
    path = partitioning.write_model_info(str(tmp_path), params["params"], mesh_specs["params"])
    text = open(path).read()
    flat = traverse_util.flatten_dict(params["params"])
    for keys, x in flat.items():
        line = [l for l in text.splitlines() if l.split()[1] == "params/" + "/".join(keys)]
        assert len(line) == 1, keys
        assert str(tuple(x.shape)) in line[0]
    total = sum(x.size for x in flat.values())
    assert f"Total number of parameters: {total}" in text


# ---------------------------------------------------------------------------------------------- dropout bits
ATTN_SHAPE = (8, 4, 3, 5)  # [b, h, q, k]: batch split 4 ways over data, heads 2 ways over model


def _bits_on_mesh(rng, mesh):
    from tagi_jax.models.layers import ATTENTION_WEIGHT_AXES

    fn = jax.jit(lambda key: partitioning.sharded_random_bits(key, ATTN_SHAPE, ATTENTION_WEIGHT_AXES),
                 out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model")))
    with partitioning.mesh_context(mesh, partitioning.logical_axis_rules()):
        return np.asarray(fn(rng))


def test_rbg_dropout_bits_are_drawn_per_shard():
    """On the (4, 2) mesh an rbg key's bits are, block by block, `bits(fold_in(key, d * 2 + m), block)` for data
    shard d and model shard m (written out here with plain jax.random); a threefry key's are jax.random.bits of
    the whole shape on any mesh (the mesh changes nothing)."""
    mesh = partitioning.create_mesh(4, 2)
    key = jax.random.key(3, impl="rbg")
    got = _bits_on_mesh(key, mesh)
    expected = np.concatenate([np.concatenate(
        [np.asarray(jax.random.bits(jax.random.fold_in(key, d * 2 + m), (2, 2, 3, 5))) for m in range(2)], axis=1)
        for d in range(4)], axis=0)
    np.testing.assert_array_equal(got, expected)
    assert len(np.unique(got)) > 0.9 * got.size  # no two shards drew the same block
    threefry = jax.random.key(3)
    np.testing.assert_array_equal(_bits_on_mesh(threefry, mesh), np.asarray(jax.random.bits(threefry, ATTN_SHAPE)))


def test_dropout_module_is_flax_dropout_with_a_threefry_key():
    """Same rng path (`Dropout_0`), same mask, same scaling as nn.Dropout, so threefry runs are unchanged."""
    from tagi_jax.models.layers import ATTENTION_WEIGHT_AXES, Dropout

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return Dropout(0.3, ATTENTION_WEIGHT_AXES)(x, deterministic=False)

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dropout(0.3)(x, deterministic=False)

    x = jnp.asarray(np.random.RandomState(0).rand(*ATTN_SHAPE) + 0.5, jnp.float32)
    rngs = {"dropout": jax.random.key(7)}
    ours, theirs = Ours().apply({}, x, rngs=rngs), Flax().apply({}, x, rngs=rngs)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    kept = np.asarray(ours) != 0
    assert 0.55 < kept.mean() < 0.85  # keep probability 0.7
    np.testing.assert_allclose(np.asarray(ours)[kept], np.asarray(x)[kept] / 0.7, rtol=1e-6)


def test_rbg_dropout_trains_the_rematerialised_t5_on_the_mesh(sharded):
    """The paper configs' path: rbg dropout bits drawn per shard inside `nn.remat` layers of the T5 on the
    (4, 2) mesh. The gradient is finite, the same key gives the same loss, another key another one."""
    config, mesh, rules, params, _, _, _ = sharded
    model = T5(config.replace(dropout_rate=0.2, remat_policy="full"))
    enc, dec, tgt = _batch(config)

    def loss(params, key):
        logits = model.apply(params, enc, dec, tgt, enable_dropout=True, rngs={"dropout": key})
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, tgt[..., None], -1)[..., 0])

    with partitioning.mesh_context(mesh, rules):
        step = jax.jit(jax.value_and_grad(loss))
        (a, grads), (b, _), (c, _) = (step(params, jax.random.key(k, impl="rbg")) for k in (1, 1, 2))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert float(a) == float(b) and abs(float(a) - float(c)) > 1e-4
