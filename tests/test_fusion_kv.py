""""prepend" fusion with the instruction's cross-attention keys/values computed once per task: the same logits,
tokens and scores as projecting them for every instance (the per-instance path is the reference), a numpy
check of the projection, the evaluator's per-task table (groups of tasks, trimmed padding), and the compiled
FLOPs going down by exactly the per-instance projection."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax import features as F
from tagi_jax.eval import decode as decode_lib
from tagi_jax.eval import generation
from tagi_jax.models import lora
from tagi_jax.models import predict as predict_lib
from tagi_jax.models.t5 import T5, CrossKV, init_params
from tagi_jax.models.t5_config import T5Config

from test_evaluation import BATCH, LENGTHS, MAX_DECODE, all_examples, random_tagi

CFG = T5Config(vocab_size=64, d_model=32, d_ff=48, num_heads=4, d_kv=8, num_encoder_layers=2, num_decoder_layers=2,
               feed_forward_proj="gated-gelu", tie_word_embeddings=False)
CROSS = ("decoder_cross.q", "decoder_cross.k", "decoder_cross.v", "decoder_self.v")
B, N, L, T = 3, 6, 7, 5


@pytest.fixture(scope="module")
def setup():
    params = init_params(CFG, jax.random.PRNGKey(0))
    # Non-zero relative biases and per-example adapters on the cross-attention k/v too.
    rng = np.random.RandomState(0)
    enc = rng.randint(2, 64, (B, L)).astype(np.int32)
    enc[0, 4:] = 0
    dec = rng.randint(2, 64, (B, T)).astype(np.int32)
    states = rng.randn(B, N, CFG.d_model).astype(np.float32)
    mask = np.ones((B, N), bool)
    mask[1, 4:] = False
    adapters = lora.init_adapters(jax.random.PRNGKey(1), CFG, CROSS, 4, batch=B, b_stddev=0.2)
    return params, jnp.asarray(enc), jnp.asarray(dec), jnp.asarray(states), jnp.asarray(mask), adapters


def test_projected_keys_values_match_numpy(setup):
    params, _, _, states, _, adapters = setup
    kv = T5(CFG).apply({"params": params}, states, adapters=adapters, method="project_cross_kv")
    assert len(kv) == CFG.num_decoder_layers
    for i, (k, v) in enumerate(kv):
        attn = params["decoder"][f"layers_{i}"]["encoder_decoder_attention"]
        for got, proj, target in ((k, "key", "decoder_cross.k"), (v, "value", "decoder_cross.v")):
            e = adapters[target]
            w = np.asarray(attn[proj]["kernel"])[None] + float(e["scale"]) * np.einsum(
                "bdr,bro->bdo", np.asarray(e["A"][:, i]), np.asarray(e["B"][:, i]))
            want = np.einsum("bnd,bdo->bno", np.asarray(states), w).reshape(B, N, CFG.num_heads, CFG.d_kv)
            np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 1, 3), rtol=1e-5, atol=1e-5)


def test_decode_with_precomputed_keys_values_equals_projecting_them(setup):
    params, enc, dec, states, mask, adapters = setup
    model = T5(CFG)
    encoded = model.apply({"params": params}, enc, adapters=adapters, method="encode")
    ref = model.apply({"params": params}, encoded, enc, dec, dec, adapters=adapters, extra_encoder_states=states,
                      extra_encoder_mask=mask, method="decode")
    prefix = model.apply({"params": params}, states, adapters=adapters, method="project_cross_kv")
    memory = model.apply({"params": params}, encoded, adapters=adapters, method="project_cross_kv")
    for kv, enc_in in ((CrossKV(prefix, mask), encoded), (CrossKV(prefix, mask, memory), None)):
        got = model.apply({"params": params}, enc_in, enc, dec, dec, adapters=adapters, cross_kv=kv,
                          method="decode")
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    plain = model.apply({"params": params}, encoded, enc, dec, dec, adapters=adapters, method="decode")
    got = model.apply({"params": params}, None, enc, dec, dec, adapters=adapters, cross_kv=CrossKV(memory=memory),
                      method="decode")
    np.testing.assert_allclose(np.asarray(got), np.asarray(plain), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="must come as cross_kv.prefix"):
        model.apply({"params": params}, None, enc, dec, dec, cross_kv=CrossKV(memory=memory),
                    extra_encoder_states=states, method="decode")
    # The mask matters (row 1's last instruction positions are padding): without it the logits change.
    loose = model.apply({"params": params}, encoded, enc, dec, dec, adapters=adapters, cross_kv=CrossKV(prefix),
                        method="decode")
    assert np.abs(np.asarray(loose)[1] - np.asarray(ref)[1]).max() > 1e-3
    with pytest.raises(ValueError, match="not both"):
        model.apply({"params": params}, encoded, enc, dec, dec, cross_kv=CrossKV(prefix, mask),
                    extra_encoder_states=states, method="decode")
    with pytest.raises(ValueError, match="cross_kv.prefix"):
        model.apply({"params": params}, encoded, enc, dec, dec, cross_kv=CrossKV(prefix[:1], mask), method="decode")


def _one_task(setup):
    """A single task: one instruction (row 0's) and one shared adapter for every row."""
    params, enc, dec, states, mask, adapters = setup
    shared = {t: {"A": e["A"][:1], "B": e["B"][:1], "scale": e["scale"]} for t, e in adapters.items()}
    kv = predict_lib.project_cross_kv(T5(CFG), params, states[:1], shared)  # batch 1: once for the task
    broadcast = lambda x: jnp.broadcast_to(x[:1], (B,) + x.shape[1:])
    return params, enc, dec, shared, kv, mask[1:2], broadcast(states), broadcast(mask[1:2])


@pytest.mark.parametrize("beam_size", [1, 2])
def test_predict_with_the_task_keys_values_equals_per_instance(setup, beam_size):
    params, enc, _, shared, kv, mask1, states_b, mask_b = _one_task(setup)
    run = jax.jit(functools.partial(predict_lib.predict, T5(CFG), max_decode_len=6, beam_size=beam_size, eos_id=1))
    tokens, scores = run(params, enc, adapters=shared, extra_encoder_states=states_b, extra_encoder_mask=mask_b)
    tokens_kv, scores_kv = run(params, enc, adapters=shared, extra_encoder_kv=kv, extra_encoder_mask=mask1)
    np.testing.assert_array_equal(np.asarray(tokens_kv), np.asarray(tokens))
    np.testing.assert_allclose(np.asarray(scores_kv), np.asarray(scores), rtol=1e-5, atol=1e-5)
    assert len(set(map(tuple, np.asarray(tokens).tolist()))) > 1  # rows decode differently (not trivially equal)


def test_score_targets_with_the_task_keys_values_equals_per_instance(setup):
    params, enc, dec, shared, kv, mask1, states_b, mask_b = _one_task(setup)
    score = functools.partial(predict_lib.score_targets, T5(CFG), params, enc, dec, dec, adapters=shared)
    ref = score(extra_encoder_states=states_b, extra_encoder_mask=mask_b)
    got = score(extra_encoder_kv=kv, extra_encoder_mask=mask1)
    np.testing.assert_allclose(np.asarray(got.sum), np.asarray(ref.sum), rtol=1e-5, atol=1e-5)


def test_compiled_flops_drop_by_the_per_instance_projection(setup):
    """XLA's cost analysis: with the task's keys/values given, the scoring executable no longer projects the
    instruction for every row, i.e. it does B x layers x 2 x (2 N d_model inner) fewer FLOPs."""
    params, enc, dec, shared, kv, mask1, states_b, mask_b = _one_task(setup)
    score = lambda p, **kw: predict_lib.score_targets(T5(CFG), p, enc, dec, dec, adapters=shared, **kw).sum
    flops = lambda **kw: jax.jit(functools.partial(score, **kw)).lower(params).compile().cost_analysis()
    first = lambda c: float((c[0] if isinstance(c, (list, tuple)) else c)["flops"])
    per_instance = first(flops(extra_encoder_states=states_b, extra_encoder_mask=mask_b))
    per_task = first(flops(extra_encoder_kv=kv, extra_encoder_mask=mask1))
    projection = B * CFG.num_decoder_layers * 2 * (2 * N * CFG.d_model * CFG.inner_dim)
    # The adapters' k/v factors on the instruction go too: 2 x B x layers x (N d r + N r inner).
    lora_kv = 2 * B * CFG.num_decoder_layers * (2 * N * CFG.d_model * 4 + 2 * N * 4 * CFG.inner_dim)
    assert per_instance - per_task == pytest.approx(projection + lora_kv, rel=0.05)


# ------------------------------------------------------------------------------------ the evaluator's table
@pytest.fixture(scope="module")
def fused():
    return random_tagi("prepend", seed=0, targets=lora.DEFAULT_TARGETS + ("decoder_cross.k",))


def _per_instance(monkeypatch):
    """The evaluator without per-task keys/values: each row projects its gathered instruction states."""
    monkeypatch.setattr(decode_lib, "_kv_groups", lambda *a, **k: None)


def test_evaluation_per_task_keys_values_equal_per_instance(fused, vocab, monkeypatch):
    model, params = fused
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)
    examples = all_examples()  # batches mix the three tasks
    records, _ = generation.evaluate("tagi", model, params, examples, vocab, **kwargs)
    with monkeypatch.context() as m:  # groups of 1 task: each group's keys/values computed, then released
        m.setattr(decode_lib, "KV_TABLE_BYTES", 1)
        grouped, _ = generation.evaluate("tagi", model, params, examples, vocab, **kwargs)
    _per_instance(monkeypatch)
    reference, _ = generation.evaluate("tagi", model, params, examples, vocab, **kwargs)
    predictions = lambda recs: [(r["id"], r["prediction"]) for r in recs]
    assert predictions(records) == predictions(reference) == predictions(grouped)
    assert len({r["prediction"] for r in reference}) >= 3  # the tasks decode differently: rows are not mixed up


def test_scoring_per_task_keys_values_equal_per_instance(fused, vocab, monkeypatch):
    model, params = fused
    examples = all_examples()
    from tagi_jax.eval.adapters import adapter_setup

    table, rows = adapter_setup("tagi", model, params, examples, vocab, LENGTHS, BATCH, None)
    enc, _ = decode_lib.tokenize(vocab, [ex[F.INPUTS] for ex in examples], LENGTHS["inputs"])
    targets, _ = decode_lib.tokenize(vocab, [ex[F.TARGETS] for ex in examples], LENGTHS["targets"])
    dec = decode_lib.shift_right(targets)
    tree = table.device_tree()
    total, mean, _, _ = decode_lib.score_tokens(model, params, tree, rows, enc, dec, targets, batch_size=BATCH)
    _per_instance(monkeypatch)
    ref_total, ref_mean, _, _ = decode_lib.score_tokens(model, params, tree, rows, enc, dec, targets,
                                                        batch_size=BATCH)
    np.testing.assert_allclose(total, ref_total, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-5)
    assert np.std(ref_total) > 0.1


def test_instruction_padding_is_trimmed_to_the_longest_instruction():
    mask = np.zeros((3, 128), bool)
    mask[0, :20] = mask[1, :37] = True
    assert decode_lib.instruction_length(mask) == 40
    mask[2, :] = True
    assert decode_lib.instruction_length(mask) == 128


@pytest.fixture(scope="module")
def vocab():
    from tagi_jax.vocab import get_vocabulary

    return get_vocabulary("byte")
