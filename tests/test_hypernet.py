"""The hypernetwork and the TAGI module: shapes, names, zero-ΔW init with live gradients, every loss term
training the hypernetwork, padding-aware pooling, fusion wiring (prepend and encoder cross-attention),
separate encoder, and the pure functions against the plain T5.

Compilation dominates on CPU: one parameter init per module, shapes checked abstractly (`jax.eval_shape`),
and every compiled function cached by (function, model config).
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import traverse_util

from tagi_jax.models import predict as predict_lib
from tagi_jax import features as F
from tagi_jax import losses, partitioning
from tagi_jax.models import lora, tagi
from tagi_jax.models.hypernet import HyperNetConfig, masked_mean_pool
from tagi_jax.models.lora import target_spec
from tagi_jax.models.t5 import T5, is_encoder_fusion_param
from tagi_jax.models.t5_config import tiny_config

T5CFG = tiny_config()
HYPER = HyperNetConfig(rank=4, lora_alpha=8.0, hidden_dim=16, embed_dim=8, dropout_rate=0.0)
CONFIG = tagi.TAGIConfig(t5=T5CFG, hypernet=HYPER, num_teachers=3, teacher_rank=4, teacher_alpha=4.0)
NO_FUSION = dataclasses.replace(CONFIG, fusion="none")
ENC_FUSION = dataclasses.replace(CONFIG, fusion="encoder_cross_attention")
B, LEN = 2, 7


def _tokens(rng, shape, min_len):
    """Random ids with a random amount of trailing padding (at least `min_len` real tokens)."""
    toks = rng.integers(3, T5CFG.vocab_size, size=shape)
    for row in toks:
        row[rng.integers(min_len, shape[1] + 1):] = 0
    return toks.astype(np.int32)


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    targets = _tokens(rng, (B, 5), 2)
    dec_in = np.concatenate([np.zeros((B, 1), np.int32), targets[:, :-1]], axis=1)
    return {
        F.ENCODER_INPUT_TOKENS: _tokens(rng, (B, LEN), 2),
        F.HYPER_ENCODER_INPUT_TOKENS: _tokens(rng, (B, LEN), 2),
        F.FULL_ENCODER_INPUT_TOKENS: _tokens(rng, (B, LEN), 4),
        F.DECODER_INPUT_TOKENS: dec_in,
        F.DECODER_TARGET_TOKENS: targets,
        F.DECODER_LOSS_WEIGHTS: (targets > 0).astype(np.float32),
        F.TASK_ID: np.array([2, 0], np.int32),
    }


@functools.lru_cache(maxsize=None)
def jitted(name, config):
    """tagi.<name>(TAGI(config), ...) compiled once per (function, config)."""
    return jax.jit(functools.partial(getattr(tagi, name), tagi.TAGI(config)))


def randomize_b(params, seed=1, std=0.3):
    """'Trained-like' parameters: every B factor head (and teacher B) random, everything else unchanged."""
    rng = np.random.default_rng(seed)

    def visit(path, x):
        leaf = jax.tree_util.keystr(path).split("'")[-2]
        return (std * rng.normal(size=x.shape)).astype(np.float32) if leaf.startswith("B") else x

    return jax.tree_util.tree_map_with_path(visit, params)


@pytest.fixture(scope="module")
def boxed():
    return jax.jit(lambda r: tagi.init_params(CONFIG, r))(jax.random.key(0))


@pytest.fixture(scope="module")
def params(boxed):
    return nn.meta.unbox(boxed)


@pytest.fixture(scope="module")
def trained(params):
    return randomize_b(params)


# ------------------------------------------------------------------------------------------ config
def test_config_validation_names_the_key():
    assert ENC_FUSION.fusion == "encoder_cross_attention" and ENC_FUSION.uses_instruction_states
    with pytest.raises(ValueError, match="tagi.fusion"):
        dataclasses.replace(CONFIG, fusion="concat")
    with pytest.raises(ValueError, match="decoder_ffn.wi"):  # the tiny T5 is gated: 'wi' does not exist
        dataclasses.replace(CONFIG, hypernet=HYPER.replace(adapter_targets=("decoder_ffn.wi",)))
    with pytest.raises(ValueError, match="adapter_targets"):
        HYPER.replace(adapter_targets=("encoder.q",))
    with pytest.raises(ValueError, match="hypernet.rank"):
        HYPER.replace(rank=0)
    with pytest.raises(ValueError, match="hypernet: unknown keys"):
        HyperNetConfig.from_dict({"rank": 4, "rnak": 3})
    with pytest.raises(ValueError, match="tagi.num_teachers"):
        dataclasses.replace(CONFIG, num_teachers=-1)
    assert tagi.TAGIConfig.from_dict(CONFIG.to_dict()) == CONFIG


# ------------------------------------------------------------------------------------------ params / shapes
def test_every_parameter_named_and_placed_on_a_mesh(boxed, params):
    assert partitioning.unnamed_parameters(boxed) == []
    specs = partitioning.params_logical_specs(boxed)
    head = specs["hypernet"]["decoder_cross.v"]
    assert tuple(head["A_kernel"]) == ("hyper_hidden", "embed", "lora_rank")
    assert tuple(head["B_kernel"]) == ("hyper_hidden", "lora_rank", "joined_kv")
    assert tuple(specs["hypernet"]["layer_embedding"]) == ("layers", "adapter_embed")
    assert tuple(specs["teachers"]["encoder_self.q"]["A"]) == ("tasks", "layers", "teacher_factor", "lora_rank")
    # The logical names map to valid shardings of a (4, 2) fake-device mesh with FSDP rules.
    mesh = partitioning.create_mesh(4, 2, jax.devices()[:8])
    rules = partitioning.logical_axis_rules(fsdp=True)
    mesh_specs = partitioning.logical_to_mesh_specs(specs, rules)
    assert tuple(mesh_specs["hypernet"]["encoder_self.q"]["B_kernel"]) == (None, None, "model")
    assert tuple(mesh_specs["hypernet"]["encoder_self.q"]["A_kernel"]) == ("model", "data", None)
    assert tuple(mesh_specs["teachers"]["encoder_self.q"]["A"]) == (None, None, "data", None)  # split, not copied
    placed = jax.device_put(params, partitioning.mesh_shardings(mesh, mesh_specs))
    np.testing.assert_array_equal(placed["hypernet"]["encoder_self.q"]["A_kernel"],
                                  params["hypernet"]["encoder_self.q"]["A_kernel"])


def test_generated_shapes_for_every_kind_of_target():
    targets = ("encoder_self.k", "encoder_self.o", "decoder_cross.v", "encoder_ffn.wi_0", "decoder_ffn.wi_1",
               "decoder_ffn.wo")
    t5 = tiny_config(num_decoder_layers=3, d_kv=6)  # inner (24) != d_model (32), depth differs per stack
    cfg = tagi.TAGIConfig(t5=t5, hypernet=HYPER.replace(adapter_targets=targets, share_generator_across_layers=False),
                          fusion="none")
    toks = make_batch()[F.HYPER_ENCODER_INPUT_TOKENS]
    p = jax.eval_shape(lambda r: nn.meta.unbox(tagi.init_params(cfg, r)), jax.random.key(1))
    adapters, states, mask = jax.eval_shape(functools.partial(tagi.generate_adapters, tagi.TAGI(cfg)), p, toks)
    assert set(adapters) == set(targets)
    lora.check_adapters(t5, adapters, batch=B)  # the backbone's own contract check
    for target in targets:
        layers, d_in, d_out = lora.adapter_dims(t5, target)
        assert adapters[target]["A"].shape == (B, layers, d_in, 4)
        assert adapters[target]["B"].shape == (B, layers, 4, d_out)
        # One generator per layer: the heads carry a layer axis.
        assert p["hypernet"][target]["A_kernel"].shape == (layers, 16, d_in, 4)
        assert p["hypernet"][target]["B_kernel"].shape == (layers, 16, 4, d_out)
    assert target_spec(t5, "encoder_self.o").in_axis == "joined_kv"
    assert states.shape == (B, LEN, t5.d_model) and mask.shape == (B, LEN)


# ------------------------------------------------------------------------------------------ init
def test_zero_delta_at_init_and_student_starts_as_backbone(params):
    batch = make_batch()
    adapters, _, _ = jitted("generate_adapters", CONFIG)(params, batch[F.HYPER_ENCODER_INPUT_TOKENS])
    for target, entry in adapters.items():
        assert not np.any(np.asarray(lora.delta_weight(entry)))  # exactly zero
        assert np.asarray(entry["A"]).std() > 0.1 / np.sqrt(target_spec(T5CFG, target).d_in)  # A is alive
        assert float(entry["scale"]) == 2.0
    # Without fusion the student at init is exactly the backbone on the instance input.
    np.testing.assert_allclose(jitted("student_logits", NO_FUSION)(params, batch),
                               jitted("no_instruction_logits", CONFIG)(params, batch), rtol=1e-6, atol=1e-6)


@jax.jit
def term_grads(p, batch):
    """d[CE, KL(teacher‖student), L_ins]/d hypernet params: one compiled function for all gradient tests."""
    model = tagi.TAGI(CONFIG)

    def terms(hyper):
        full = dict(p, hypernet=hyper)
        logits, adapters = tagi.student_forward(model, full, batch)
        weights = batch[F.DECODER_LOSS_WEIGHTS]
        ce = losses.cross_entropy(logits, batch[F.DECODER_TARGET_TOKENS], weights)[0]
        kl = losses.distillation_kl(logits, tagi.teacher_logits(model, full, batch), weights, 2.0)
        l_ins = losses.adapter_alignment(adapters, tagi.teacher_adapters(model, full, batch[F.TASK_ID]))
        return jnp.stack([ce, kl, l_ins])

    return jax.jacrev(terms)(p["hypernet"])


TERMS = ("cross_entropy", "kl", "l_ins")


def _norms(grads, key, term):
    return [float(np.linalg.norm(grads[t][key][term])) for t in HYPER.adapter_targets]


def test_gradients_reach_both_heads_and_each_term_trains_the_hypernetwork(params, trained):
    """LoRA-style init: B heads learn at step 0, A heads from step 1 (no saddle at A = B = 0); and every
    loss term (CE, KL, L_ins) sends gradient to the hypernetwork."""
    batch = make_batch()
    # At init; the teachers are 'trained' (random B) so KL and L_ins have something to match.
    start = dict(params, teachers=trained["teachers"])
    g0 = term_grads(start, batch)
    for term, name in enumerate(TERMS):
        assert all(n > 0 for n in _norms(g0, "B_kernel", term)), name
        assert all(n == 0 for n in _norms(g0, "A_kernel", term)), name  # ∝ B = 0 at init, as in any LoRA
    # One SGD step on CE, then the A heads get gradient too.
    stepped = dict(start, hypernet=jax.tree.map(lambda p, g: p - 0.5 * g[0], start["hypernet"], g0))
    g1 = term_grads(stepped, batch)
    assert all(n > 0 for n in _norms(g1, "A_kernel", 0))
    # Later in training, every term reaches every hypernetwork parameter.
    g = term_grads(trained, batch)
    for path, leaf in jax.tree_util.tree_flatten_with_path(g)[0]:
        for term, name in enumerate(TERMS):
            assert np.any(np.asarray(leaf[term])), (name, jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------ pooling
def test_masked_mean_pool_matches_numpy():
    rng = np.random.default_rng(0)
    states = rng.normal(size=(3, 5, 4)).astype(np.float32)
    toks = np.array([[5, 6, 0, 0, 0], [7, 8, 9, 10, 11], [0, 0, 0, 0, 0]])
    got = np.asarray(jax.jit(masked_mean_pool)(states, toks))
    np.testing.assert_allclose(got[0], states[0, :2].mean(0), rtol=1e-6)
    np.testing.assert_allclose(got[1], states[1].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)


def test_adapters_do_not_depend_on_batch_padding(trained):
    """Appending padding to the instructions changes nothing (the original averaged over padding)."""
    gen = jitted("generate_adapters", CONFIG)
    toks = make_batch()[F.HYPER_ENCODER_INPUT_TOKENS]
    short, _, _ = gen(trained, toks)
    long, states, mask = gen(trained, np.pad(toks, ((0, 0), (0, 6))))
    for target in short:
        for key in ("A", "B"):
            np.testing.assert_allclose(long[target][key], short[target][key], rtol=1e-5, atol=1e-6)
    assert states.shape[1] == LEN + 6 and not np.any(np.asarray(mask)[:, LEN:])
    # ... while the generated adapters do depend on the instruction.
    other, _, _ = gen(trained, make_batch(seed=5)[F.HYPER_ENCODER_INPUT_TOKENS])
    assert not np.allclose(other["encoder_self.q"]["B"], short["encoder_self.q"]["B"], atol=1e-4)


# ------------------------------------------------------------------------------------------ fusion / encoder
def test_prepend_fusion_feeds_the_instruction_to_the_decoder(params):
    batch = make_batch()
    changed = dict(batch, **{F.HYPER_ENCODER_INPUT_TOKENS: make_batch(seed=7)[F.HYPER_ENCODER_INPUT_TOKENS]})
    prepend, none = jitted("student_logits", CONFIG), jitted("student_logits", NO_FUSION)
    # At init (ΔW = 0) the instruction reaches the student only through fusion.
    assert np.abs(np.asarray(prepend(params, batch)) - np.asarray(prepend(params, changed))).max() > 1e-3
    np.testing.assert_allclose(none(params, batch), none(params, changed), rtol=1e-6, atol=1e-6)
    # Prepend fusion = T5.decode with the instruction states as extra encoder states (plain T5 reference).
    adapters, states, mask = jitted("generate_adapters", CONFIG)(params, batch[F.HYPER_ENCODER_INPUT_TOKENS])
    t5 = T5(T5CFG)

    @jax.jit
    def reference(p5, batch, states, mask):
        enc = t5.apply({"params": p5}, batch[F.ENCODER_INPUT_TOKENS], method=T5.encode)
        return t5.apply({"params": p5}, enc, batch[F.ENCODER_INPUT_TOKENS], batch[F.DECODER_INPUT_TOKENS],
                        batch[F.DECODER_TARGET_TOKENS], extra_encoder_states=states, extra_encoder_mask=mask,
                        method=T5.decode)

    want = reference(params["t5"], batch, states, mask)
    np.testing.assert_allclose(prepend(params, batch), want, rtol=1e-5, atol=1e-5)
    # student_decoding_inputs hands predict() the adapters and the fusion states where the fusion reads them.
    for cfg, to_decoder, to_encoder in ((CONFIG, True, False), (NO_FUSION, False, False)):
        inputs = jax.eval_shape(functools.partial(tagi.student_decoding_inputs, tagi.TAGI(cfg)), params, batch)
        assert set(inputs["adapters"]) == set(HYPER.adapter_targets)
        assert (inputs["extra_encoder_states"] is not None) == to_decoder
        assert (inputs["encoder_fusion_states"] is not None) == to_encoder
        assert inputs["encoder_input_tokens"].shape == (B, LEN)


def _fusion_leaves(tree) -> dict:
    """{path: leaf} of the encoder-fusion parameters of a TAGI tree."""
    flat = traverse_util.flatten_dict(tree)
    return {path: leaf for path, leaf in flat.items() if path[0] == "t5" and is_encoder_fusion_param(path)}


def perturb_fusion(params, seed=3, std=0.3):
    """'Trained-like' encoder fusion: random output projections (zero at init), everything else unchanged."""
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(params)
    for path in _fusion_leaves(params):
        if path[-2:] == ("out", "kernel"):
            flat[path] = (std * rng.normal(size=flat[path].shape)).astype(np.float32)
    return traverse_util.unflatten_dict(flat)


@pytest.fixture(scope="module")
def fusion_params(trained):
    """An encoder-fusion tree: the prepend model's (trained-like) parameters plus a fresh fusion sub-block per
    encoder layer -- what loading a checkpoint without fusion into an encoder-fusion model gives."""
    fresh = jax.jit(lambda r: nn.meta.unbox(tagi.init_params(ENC_FUSION, r)))(jax.random.key(4))
    flat = traverse_util.flatten_dict(trained)
    added = _fusion_leaves(fresh)
    assert not set(added) & set(flat)
    assert set(traverse_util.flatten_dict(fresh)) == set(flat) | set(added)  # the fusion blocks are all it adds
    assert {path[2] for path in added} == {f"layers_{i}" for i in range(T5CFG.num_encoder_layers)}
    flat.update(added)
    return traverse_util.unflatten_dict(flat)


def test_encoder_fusion_starts_as_the_model_it_was_loaded_from(fusion_params):
    """Zero output projection: the same logits as without fusion, whatever the instruction states."""
    outs = [leaf for path, leaf in _fusion_leaves(fusion_params).items() if path[-2:] == ("out", "kernel")]
    assert outs and not any(np.any(np.asarray(o)) for o in outs)
    batch = make_batch()
    np.testing.assert_array_equal(jitted("student_logits", ENC_FUSION)(fusion_params, batch),
                                  jitted("student_logits", NO_FUSION)(fusion_params, batch))


def test_encoder_fusion_reads_the_instruction_but_not_its_padding(params, fusion_params):
    p = perturb_fusion(dict(fusion_params, hypernet=params["hypernet"]))  # ΔW = 0: only fusion carries it
    run = jitted("student_logits", ENC_FUSION)
    batch = make_batch()
    hyper = batch[F.HYPER_ENCODER_INPUT_TOKENS]
    base = np.asarray(run(p, batch))
    changed = dict(batch, **{F.HYPER_ENCODER_INPUT_TOKENS: make_batch(seed=7)[F.HYPER_ENCODER_INPUT_TOKENS]})
    assert np.abs(base - np.asarray(run(p, changed))).max() > 1e-3
    # More padding after the instruction changes nothing ...
    longer = dict(batch, **{F.HYPER_ENCODER_INPUT_TOKENS: np.pad(hyper, ((0, 0), (0, 5)))})
    np.testing.assert_allclose(run(p, longer), base, rtol=1e-5, atol=1e-5)
    # ... nor do the states at padded positions, whatever they hold.
    adapters, states, mask = jitted("generate_adapters", ENC_FUSION)(p, hyper)
    assert not np.all(np.asarray(mask))  # the batch does have instruction padding
    noise = np.random.default_rng(0).normal(size=states.shape).astype(np.float32) * 10
    noisy = np.where(np.asarray(mask)[..., None], states, noise)
    np.testing.assert_array_equal(run(p, batch, (adapters, noisy, mask)), run(p, batch, (adapters, states, mask)))


@jax.jit
def fusion_ce_grads(p, batch):
    def ce(p):
        logits, _ = tagi.student_forward(tagi.TAGI(ENC_FUSION), p, batch)
        return losses.cross_entropy(logits, batch[F.DECODER_TARGET_TOKENS], batch[F.DECODER_LOSS_WEIGHTS])[0]

    return jax.grad(ce)(p)


def test_ce_gradient_reaches_the_encoder_fusion_parameters(fusion_params):
    batch = make_batch()
    # At init only the (zero) output projections get gradient: the rest feeds them (as B in a LoRA).
    for path, g in _fusion_leaves(fusion_ce_grads(fusion_params, batch)).items():
        assert np.any(np.asarray(g)) == (path[-2:] == ("out", "kernel")), path
    # Once they moved, every fusion parameter learns from the CE loss.
    for path, g in _fusion_leaves(fusion_ce_grads(perturb_fusion(fusion_params), batch)).items():
        assert np.any(np.asarray(g)), path


def test_encoder_fusion_greedy_decoding_equals_full_forward_argmax(fusion_params):
    """predict (encoder run once with the instruction, cached decoder) == argmax of the full student."""
    p, steps = perturb_fusion(fusion_params), 6
    batch = make_batch()
    inputs = jitted("student_decoding_inputs", ENC_FUSION)(p, batch)
    assert inputs["extra_encoder_states"] is None and inputs["encoder_fusion_states"] is not None
    predict = jax.jit(functools.partial(predict_lib.predict, T5(T5CFG)), static_argnames=("max_decode_len",))
    tokens, _ = predict(p["t5"], **inputs, max_decode_len=steps, eos_id=-1)  # no EOS: all steps compared
    run = jitted("student_logits", ENC_FUSION)
    dec = np.zeros((B, steps), np.int32)
    want = np.zeros((B, steps), np.int32)
    for t in range(steps):
        step_batch = {k: v for k, v in batch.items() if k != F.DECODER_TARGET_TOKENS}
        want[:, t] = np.asarray(run(p, dict(step_batch, **{F.DECODER_INPUT_TOKENS: dec}))[:, t]).argmax(-1)
        if t + 1 < steps:
            dec[:, t + 1] = want[:, t]
    np.testing.assert_array_equal(np.asarray(tokens), want)
    # The instruction reaches the decoded tokens through the encoder (prepend states would go to the decoder).
    plain, _ = predict(p["t5"], **dict(inputs, encoder_fusion_states=None, encoder_fusion_mask=None),
                       max_decode_len=steps, eos_id=-1)
    assert not np.array_equal(np.asarray(plain), want)


def test_separate_hyper_encoder(trained):
    cfg = dataclasses.replace(CONFIG, separate_hyper_encoder=True)
    shapes = jax.eval_shape(lambda r: nn.meta.unbox(tagi.init_params(cfg, r)), jax.random.key(2))
    assert set(shapes["hyper_encoder"]) == {"token_embedder", "encoder"}  # no unused decoder
    assert jax.tree.map(jnp.shape, shapes["hyper_encoder"]["encoder"]) == \
        jax.tree.map(jnp.shape, trained["t5"]["encoder"])
    # The separate encoder starts as a copy of the backbone's (e.g. both imported), then they may diverge.
    p = dict(trained, hyper_encoder={k: trained["t5"][k] for k in ("token_embedder", "encoder")})
    gen = jitted("generate_adapters", cfg)
    toks = make_batch()[F.HYPER_ENCODER_INPUT_TOKENS]
    base, _, _ = gen(p, toks)
    shared, _, _ = jitted("generate_adapters", CONFIG)(trained, toks)
    np.testing.assert_allclose(base["encoder_self.v"]["B"], shared["encoder_self.v"]["B"], rtol=1e-5, atol=1e-6)
    # Changing the backbone's encoder does not change the generated adapters; changing the hyper encoder does.
    same, _, _ = gen(dict(p, t5=jax.tree.map(lambda x: np.asarray(x) * 1.5, p["t5"])), toks)
    np.testing.assert_allclose(same["encoder_self.v"]["B"], base["encoder_self.v"]["B"], rtol=1e-6)
    moved, _, _ = gen(dict(p, hyper_encoder=jax.tree.map(lambda x: np.asarray(x) * 1.5, p["hyper_encoder"])), toks)
    assert not np.allclose(moved["encoder_self.v"]["B"], base["encoder_self.v"]["B"], atol=1e-5)


# ------------------------------------------------------------------------------------------ pure functions
def test_teacher_concat_and_no_instruction_against_plain_t5(trained):
    p, batch = trained, make_batch()
    t5 = T5(T5CFG)
    apply = jax.jit(lambda p5, enc, dec_in, dec_tgt, adapters: t5.apply({"params": p5}, enc, dec_in, dec_tgt,
                                                                         adapters=adapters))
    ids = batch[F.TASK_ID]
    own = {t: {"A": np.asarray(p["teachers"][t]["A"])[ids], "B": np.asarray(p["teachers"][t]["B"])[ids],
               "scale": np.float32(1.0)} for t in HYPER.adapter_targets}
    none = {t: dict(e, B=np.zeros_like(e["B"])) for t, e in own.items()}  # ΔW = 0: the plain backbone
    run = lambda enc, adapters: apply(p["t5"], enc, batch[F.DECODER_INPUT_TOKENS], batch[F.DECODER_TARGET_TOKENS],
                                      adapters)
    full = batch[F.FULL_ENCODER_INPUT_TOKENS]
    want_teacher = run(full, own)
    np.testing.assert_allclose(jitted("teacher_logits", CONFIG)(p, batch), want_teacher, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(want_teacher) - np.asarray(run(full, none))).max() > 1e-3  # the teacher matters
    np.testing.assert_allclose(jitted("concat_logits", CONFIG)(p, batch), run(full, none), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jitted("no_instruction_logits", CONFIG)(p, batch),
                               run(batch[F.ENCODER_INPUT_TOKENS], none), rtol=1e-5, atol=1e-5)
    adapters = jitted("teacher_adapters", CONFIG)(p, ids)
    np.testing.assert_array_equal(adapters["decoder_self.q"]["B"], own["decoder_self.q"]["B"])
    with pytest.raises(KeyError, match="full_encoder_input_tokens"):
        tagi.teacher_logits(tagi.TAGI(CONFIG), p, {k: v for k, v in batch.items() if k != F.FULL_ENCODER_INPUT_TOKENS})


def test_dropout_only_with_rng(trained):
    cfg = dataclasses.replace(CONFIG, t5=tiny_config(dropout_rate=0.3), hypernet=HYPER.replace(dropout_rate=0.3))
    gen = jitted("generate_adapters", cfg)
    toks = make_batch()[F.HYPER_ENCODER_INPUT_TOKENS]
    det, _, _ = gen(trained, toks)
    ref, _, _ = jitted("generate_adapters", CONFIG)(trained, toks)  # the same parameters without dropout
    np.testing.assert_allclose(det["decoder_self.v"]["B"], ref["decoder_self.v"]["B"], rtol=1e-6)
    r1, _, _ = gen(trained, toks, rng=jax.random.key(1))
    r2, _, _ = gen(trained, toks, rng=jax.random.key(2))
    assert not np.allclose(r1["decoder_self.v"]["B"], r2["decoder_self.v"]["B"])
    assert not np.allclose(r1["decoder_self.v"]["B"], det["decoder_self.v"]["B"])
