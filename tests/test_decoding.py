"""Decoding: greedy and beam search against independent references.

* generic search on a toy recurrent "model" (its state lives in the cache, per-example biases in the
  extras): greedy == step-by-step argmax in numpy; beam 1 == greedy; a wide beam == exhaustive search over all
  sequences; every returned hypothesis' score == its score recomputed in numpy; batch == examples alone;
  a batch-sharded mesh == one device.
* the T5 integration: cached greedy == uncached argmax decoding (recompute the whole prefix each step), with
  and without per-example adapters and fused instruction states; per-example adapters in a batch == alone;
  greedy and beam search == transformers' `generate` on a tiny random T5 imported with tagi_jax.hf.load_t5.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.models import predict as predict_lib
from tagi_jax import decoding

# --------------------------------------------------------------------------------------------------------
# A toy autoregressive model: h_t = tanh(h_{t-1} W + E[token]); logits = 3 * h_t U + P[t] + bias_example.
# The hidden state is the cache (so beam search must reorder it), the step counter is a scalar cache entry
# (shared by all rows) and the per-example bias is an extra (must follow each example into its beams).
# --------------------------------------------------------------------------------------------------------


class Toy:
    def __init__(self, vocab: int, max_len: int, batch: int, seed: int, dim: int = 6):
        rng = np.random.default_rng(seed)
        self.vocab, self.dim = vocab, dim
        self.E = rng.normal(size=(vocab, dim)).astype(np.float32)
        self.W = rng.normal(size=(dim, dim)).astype(np.float32) * 0.8
        self.U = rng.normal(size=(dim, vocab)).astype(np.float32)
        self.P = rng.normal(size=(max_len + 1, vocab)).astype(np.float32)
        self.bias = rng.normal(size=(batch, vocab)).astype(np.float32)
        self.h0 = rng.normal(size=(batch, dim)).astype(np.float32) * 0.5

    def cache(self):
        return {"h": jnp.asarray(self.h0), "index": jnp.array(0, jnp.int32)}

    def extras(self):
        return {"bias": jnp.asarray(self.bias)}

    def tokens_to_logits(self, state: decoding.DecodingState):
        h = jnp.tanh(state.cache["h"] @ self.W + jnp.asarray(self.E)[state.cur_token[:, 0]])
        logits = 3.0 * h @ self.U + jnp.asarray(self.P)[state.cache["index"]] + state.extras["bias"]
        return logits, {"h": h, "index": state.cache["index"] + 1}

    # numpy reference: the log-prob of each next token after a given prefix (start token 0 first).
    def step_log_probs(self, example: int, prefix: tuple[int, ...]) -> np.ndarray:
        h = self.h0[example].astype(np.float64)
        for token in (0,) + tuple(prefix):
            h = np.tanh(h @ self.W + self.E[token])
        logits = 3.0 * h @ self.U + self.P[len(prefix)] + self.bias[example]
        logits = logits - logits.max()
        return logits - np.log(np.exp(logits).sum())

    def sequence_log_prob(self, example: int, seq) -> float:
        return float(sum(self.step_log_probs(example, tuple(seq[:t]))[seq[t]] for t in range(len(seq))))


def _np_brevity(alpha, length, style):
    return ((5.0 + length) / 6.0) ** alpha if style == "t5x" else float(length) ** alpha


def _strip(seq, eos):
    """Tokens up to and including the first EOS (the rest must be padding 0)."""
    seq = [int(t) for t in seq]
    if eos in seq:
        end = seq.index(eos) + 1
        assert all(t == 0 for t in seq[end:]), f"tokens after EOS are not padding: {seq}"
        return seq[:end]
    return seq


def _greedy(toy, *, max_len, eos):
    fn = jax.jit(lambda cache, extras: decoding.greedy_search(
        toy.tokens_to_logits, cache, batch_size=toy.bias.shape[0], max_decode_len=max_len, eos_id=eos,
        extras=extras))
    tokens, log_probs = fn(toy.cache(), toy.extras())
    return np.asarray(tokens), np.asarray(log_probs)


def _beam(toy, *, beam_size, max_len, eos, alpha, style="t5x"):
    fn = jax.jit(lambda cache, extras: decoding.beam_search(
        toy.tokens_to_logits, cache, batch_size=toy.bias.shape[0], beam_size=beam_size, max_decode_len=max_len,
        eos_id=eos, alpha=alpha, extras=extras, length_penalty_style=style))
    tokens, scores = fn(toy.cache(), toy.extras())
    return np.asarray(tokens), np.asarray(scores)


def test_expand_to_beams_is_example_major_and_keeps_scalars():
    tree = {"x": jnp.arange(6).reshape(3, 2), "index": jnp.array(7), "none": None}
    out = decoding.expand_to_beams(tree, 2)
    np.testing.assert_array_equal(out["x"], [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5]])
    assert out["index"].shape == () and int(out["index"]) == 7 and out["none"] is None


def test_greedy_equals_stepwise_argmax():
    eos, max_len = 1, 12
    toy = Toy(vocab=7, max_len=max_len, batch=5, seed=0)
    toy.bias[2, eos] += 4.0  # make at least one row stop early
    tokens, log_probs = _greedy(toy, max_len=max_len, eos=eos)
    assert tokens.shape == (5, max_len)
    ended_early = 0
    for b in range(5):
        prefix, total = [], 0.0
        while len(prefix) < max_len:
            lp = toy.step_log_probs(b, tuple(prefix))
            prefix.append(int(np.argmax(lp)))
            total += lp[prefix[-1]]
            if prefix[-1] == eos:
                break
        ended_early += len(prefix) < max_len
        assert _strip(tokens[b], eos) == prefix
        np.testing.assert_allclose(log_probs[b], total, rtol=1e-5, atol=1e-5)
    assert ended_early >= 1  # the EOS path is exercised


def test_beam_of_one_equals_greedy():
    eos, max_len = 1, 10
    toy = Toy(vocab=6, max_len=max_len, batch=6, seed=1)
    toy.bias[:3, eos] += 2.5
    greedy_tokens, greedy_lp = _greedy(toy, max_len=max_len, eos=eos)
    assert any(eos in row for row in greedy_tokens.tolist())
    # "hf" (only the top `beams` continuations may finish) with alpha = 0 is exactly greedy search.
    tokens, scores = _beam(toy, beam_size=1, max_len=max_len, eos=eos, alpha=0.0, style="hf")
    np.testing.assert_array_equal(tokens[:, 0], greedy_tokens)
    np.testing.assert_allclose(scores[:, 0], greedy_lp, rtol=1e-5, atol=1e-5)
    # "t5x" also finishes an EOS ranked second, so a 1-beam search returns a greedy prefix + EOS at least
    # as good as the greedy output (and the same output whenever no such EOS scores better).
    tokens, scores = _beam(toy, beam_size=1, max_len=max_len, eos=eos, alpha=0.0, style="t5x")
    differs = 0
    for b in range(6):
        greedy_seq, seq = _strip(greedy_tokens[b], eos), _strip(tokens[b, 0], eos)
        if seq == greedy_seq:
            np.testing.assert_allclose(scores[b, 0], greedy_lp[b], rtol=1e-5, atol=1e-5)
            continue
        differs += 1
        assert seq[-1] == eos and seq[:-1] == greedy_seq[:len(seq) - 1], (seq, greedy_seq)
        np.testing.assert_allclose(scores[b, 0], toy.sequence_log_prob(b, seq), rtol=1e-5, atol=1e-5)
        if greedy_seq[-1] == eos:
            assert scores[b, 0] >= greedy_lp[b]
    assert differs < 6


def _exhaustive_best(toy, example, *, vocab, max_len, eos, alpha, style):
    """Best score over every possible output: EOS-terminated (and, for "hf", full-length) sequences."""
    best, best_seq = -np.inf, None
    for length in range(1, max_len + 1):
        for body in itertools.product([t for t in range(vocab) if t != eos], repeat=length - 1):
            for last in range(vocab):
                if last != eos and not (style == "hf" and length == max_len):
                    continue
                seq = list(body) + [last]
                score = toy.sequence_log_prob(example, seq) / _np_brevity(alpha, length, style)
                if score > best:
                    best, best_seq = score, seq
    return best, best_seq


@pytest.mark.parametrize("style,alpha", [("t5x", 0.0), ("t5x", 0.6), ("t5x", -0.5), ("hf", 1.5)])
def test_wide_beam_equals_exhaustive_search(style, alpha):
    # vocab 3 (token 1 = EOS) and length 5: 32 beams keep every non-EOS prefix alive, so beam search is exact.
    vocab, max_len, eos, batch = 3, 5, 1, 3
    toy = Toy(vocab=vocab, max_len=max_len, batch=batch, seed=2)
    tokens, scores = _beam(toy, beam_size=32, max_len=max_len, eos=eos, alpha=alpha, style=style)
    for b in range(batch):
        best, best_seq = _exhaustive_best(toy, b, vocab=vocab, max_len=max_len, eos=eos, alpha=alpha,
                                          style=style)
        assert _strip(tokens[b, 0], eos) == best_seq
        np.testing.assert_allclose(scores[b, 0], best, rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(scores[b]) <= 1e-6)  # sorted best first


@pytest.mark.parametrize("style", ["t5x", "hf"])
def test_narrow_beam_scores_are_consistent_and_batch_equals_alone(style):
    # A 3-beam search over 8 tokens/12 steps is not exhaustive; check what must hold anyway: each returned
    # hypothesis' score is its recomputed (length-normalised) log-prob -- wrong cache reordering or extras
    # following the wrong beam would break this -- and examples decode as if alone in the batch.
    vocab, max_len, eos, batch, alpha = 8, 12, 1, 4, 0.6
    toy = Toy(vocab=vocab, max_len=max_len, batch=batch, seed=3)
    toy.bias[:, eos] += 1.0
    tokens, scores = _beam(toy, beam_size=3, max_len=max_len, eos=eos, alpha=alpha, style=style)
    for b in range(batch):
        for k in range(3):
            seq = _strip(tokens[b, k], eos)
            if eos not in seq and style == "t5x":  # t5x returns unnormalised live beams if none finished
                assert len(seq) == max_len
                continue
            expected = toy.sequence_log_prob(b, seq) / _np_brevity(alpha, len(seq), style)
            np.testing.assert_allclose(scores[b, k], expected, rtol=1e-4, atol=1e-4)
    assert sum(eos in row for row in tokens[:, 0].tolist()) >= 2
    # Example 2 alone (batch of 1, same model).
    alone = Toy(vocab=vocab, max_len=max_len, batch=batch, seed=3)
    alone.bias, alone.h0 = toy.bias[2:3].copy(), toy.h0[2:3].copy()
    tokens1, scores1 = _beam(alone, beam_size=3, max_len=max_len, eos=eos, alpha=alpha, style=style)
    np.testing.assert_array_equal(tokens1[0], tokens[2])
    np.testing.assert_allclose(scores1[0], scores[2], rtol=1e-5, atol=1e-5)


def test_beam_search_under_a_batch_sharded_mesh_equals_one_device():
    # The beam gathers and reshapes must partition: batch split over 4 (fake CPU) devices, same result.
    from tagi_jax import partitioning

    vocab, max_len, eos, batch = 8, 8, 1, 4
    toy = Toy(vocab=vocab, max_len=max_len, batch=batch, seed=4)
    toy.bias[:, eos] += 1.0
    expected = _beam(toy, beam_size=3, max_len=max_len, eos=eos, alpha=0.6)
    mesh = partitioning.create_mesh(data=4, model=1, devices=jax.devices()[:4])
    cache_shardings = {"h": partitioning.data_sharding(mesh, 2), "index": partitioning.replicated(mesh)}
    extras_shardings = {"bias": partitioning.data_sharding(mesh, 2)}
    fn = jax.jit(lambda cache, extras: decoding.beam_search(
        toy.tokens_to_logits, cache, batch_size=batch, beam_size=3, max_decode_len=max_len, eos_id=eos,
        alpha=0.6, extras=extras), in_shardings=(cache_shardings, extras_shardings))
    cache = jax.device_put(toy.cache(), cache_shardings)
    extras = jax.device_put(toy.extras(), extras_shardings)
    assert len(cache["h"].sharding.device_set) == 4
    tokens, scores = fn(cache, extras)
    np.testing.assert_array_equal(np.asarray(tokens), expected[0])
    np.testing.assert_allclose(np.asarray(scores), expected[1], rtol=1e-5, atol=1e-5)


def test_beam_search_rejects_unknown_style():
    toy = Toy(vocab=6, max_len=10, batch=6, seed=1)
    with pytest.raises(ValueError, match="length_penalty_style"):
        decoding.beam_search(toy.tokens_to_logits, toy.cache(), batch_size=6, beam_size=2, max_decode_len=3,
                             eos_id=1, extras=toy.extras(), length_penalty_style="gnmt")


# --------------------------------------------------------------------------------------------------------
# The T5 integration.
# --------------------------------------------------------------------------------------------------------

MAX_LEN = 10


@pytest.fixture(scope="module")
def t5():
    from tagi_jax.models.t5 import T5, init_params
    from tagi_jax.models.t5_config import tiny_config

    config = tiny_config()
    model = T5(config)
    params = jax.jit(lambda rng: init_params(config, rng))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(10)
    batch = 3
    enc = rng.integers(2, config.vocab_size, size=(batch, 9)).astype(np.int32)
    enc[0, 6:] = 0  # padding
    enc[2, 4:] = 0
    adapters = {}
    n_layers = {"encoder_self": config.num_encoder_layers}
    for target in ("encoder_self.q", "encoder_self.v", "decoder_self.q", "decoder_self.v", "decoder_cross.q",
                   "decoder_cross.v"):
        block = target.split(".")[0]
        layers = n_layers.get(block, config.num_decoder_layers)
        adapters[target] = {
            "A": jnp.asarray(rng.normal(size=(batch, layers, config.d_model, 4)) * 0.5, jnp.float32),
            "B": jnp.asarray(rng.normal(size=(batch, layers, 4, config.inner_dim)) * 0.5, jnp.float32),
            "scale": jnp.float32(2.0),
        }
    extra = jnp.asarray(rng.normal(size=(batch, 3, config.d_model)), jnp.float32)
    extra_mask = jnp.asarray([[1, 1, 1], [1, 0, 0], [1, 1, 0]], jnp.int32)
    predict = jax.jit(functools.partial(predict_lib.predict, model),
                      static_argnames=("max_decode_len", "beam_size", "length_penalty_style"))
    full_logits = jax.jit(lambda p, e, d, a, x, xm: model.apply(
        {"params": p}, e, d, jnp.ones_like(d), adapters=a, extra_encoder_states=x, extra_encoder_mask=xm))
    score = jax.jit(functools.partial(predict_lib.score_targets, model))
    return dict(model=model, config=config, params=params, enc=jnp.asarray(enc), adapters=adapters,
                extra=extra, extra_mask=extra_mask, predict=predict, full_logits=full_logits, score=score)


def _uncached_argmax(t5, enc, *, adapters, extra, extra_mask, max_len, eos=1):
    """Reference decoder: recompute the whole decoder on the prefix at every step, take the argmax."""
    batch = enc.shape[0]
    dec = np.zeros((batch, max_len), np.int32)
    out = np.zeros((batch, max_len), np.int32)
    ended = np.zeros(batch, bool)
    total = np.zeros(batch)
    for t in range(max_len):
        logits = t5["full_logits"](t5["params"], enc, jnp.asarray(dec), adapters, extra, extra_mask)
        log_probs = np.asarray(jax.nn.log_softmax(logits[:, t], axis=-1), np.float64)
        nxt = np.where(ended, 0, log_probs.argmax(-1))
        total += np.where(ended, 0.0, log_probs[np.arange(batch), nxt])
        out[:, t] = nxt
        ended |= nxt == eos
        if t + 1 < max_len:
            dec[:, t + 1] = nxt
    return out, total


def _shift_right(tokens):
    return jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]


def _output_weights(tokens, eos=1):
    """1 up to and including the first EOS: scores the generated tokens even if one of them is 0."""
    tokens = np.asarray(tokens)
    is_eos = np.cumsum(tokens == eos, axis=1)
    return jnp.asarray((is_eos == 0) | ((is_eos == 1) & (tokens == eos)), jnp.float32)


@pytest.mark.parametrize("use_extras", [False, True])
def test_t5_cached_greedy_equals_uncached_argmax(t5, use_extras):
    # use_extras: per-example adapters (random non-zero A and B) and fused instruction states.
    adapters = t5["adapters"] if use_extras else None
    extra, extra_mask = (t5["extra"], t5["extra_mask"]) if use_extras else (None, None)
    tokens, scores = t5["predict"](t5["params"], t5["enc"], adapters=adapters, extra_encoder_states=extra,
                                   extra_encoder_mask=extra_mask, max_decode_len=MAX_LEN)
    expected, expected_log_prob = _uncached_argmax(t5, t5["enc"], adapters=adapters, extra=extra,
                                                   extra_mask=extra_mask, max_len=MAX_LEN)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    np.testing.assert_allclose(np.asarray(scores), expected_log_prob, rtol=1e-4, atol=1e-4)
    if use_extras:  # they must matter, or this test could not catch them being dropped
        baseline, _ = _uncached_argmax(t5, t5["enc"], adapters=None, extra=None, extra_mask=None,
                                       max_len=MAX_LEN)
        assert not np.array_equal(baseline, expected)


def test_t5_cached_greedy_with_encoder_fusion_equals_uncached_argmax(t5):
    """Encoder fusion: the states go into the one encoder pass; the cached decoder must agree with the full
    forward recomputed at every step."""
    from tagi_jax.models.t5 import init_params

    config, model = t5["config"], t5["model"]
    params = jax.jit(lambda rng: init_params(config, rng, fusion_len=3))(jax.random.PRNGKey(0))
    rng = np.random.default_rng(11)
    params = jax.tree_util.tree_map_with_path(  # zero at init: give the fusion output projections weight
        lambda path, x: jnp.asarray(rng.normal(size=x.shape) * 0.5, x.dtype)
        if "instruction_attention" in jax.tree_util.keystr(path) and "out" in jax.tree_util.keystr(path) else x,
        params)
    fusion = dict(encoder_fusion_states=t5["extra"], encoder_fusion_mask=t5["extra_mask"])
    tokens, _ = t5["predict"](params, t5["enc"], adapters=t5["adapters"], max_decode_len=MAX_LEN, **fusion)
    full = jax.jit(lambda p, e, d, a, x, xm: model.apply({"params": p}, e, d, jnp.ones_like(d), adapters=a,
                                                         encoder_fusion_states=x, encoder_fusion_mask=xm))
    expected, _ = _uncached_argmax(dict(t5, params=params, full_logits=full), t5["enc"], adapters=t5["adapters"],
                                   extra=t5["extra"], extra_mask=t5["extra_mask"], max_len=MAX_LEN)
    np.testing.assert_array_equal(np.asarray(tokens), expected)
    without, _ = t5["predict"](params, t5["enc"], adapters=t5["adapters"], max_decode_len=MAX_LEN)
    assert not np.array_equal(np.asarray(without), expected)  # the fused states matter

def test_t5_per_example_adapters_batch_equals_alone(t5):
    tokens, scores = t5["predict"](t5["params"], t5["enc"], adapters=t5["adapters"],
                                   extra_encoder_states=t5["extra"], extra_encoder_mask=t5["extra_mask"],
                                   max_decode_len=MAX_LEN)
    for i in range(t5["enc"].shape[0]):
        alone = jax.tree_util.tree_map(lambda x: x[i:i + 1] if x.ndim == 4 else x, t5["adapters"])
        tokens_i, scores_i = t5["predict"](t5["params"], t5["enc"][i:i + 1], adapters=alone,
                                           extra_encoder_states=t5["extra"][i:i + 1],
                                           extra_encoder_mask=t5["extra_mask"][i:i + 1], max_decode_len=MAX_LEN)
        np.testing.assert_array_equal(np.asarray(tokens_i[0]), np.asarray(tokens[i]))
        np.testing.assert_allclose(np.asarray(scores_i[0]), np.asarray(scores[i]), rtol=1e-5, atol=1e-5)


def test_t5_beam_search_scores_match_teacher_forcing(t5):
    # Beam search with the cache, per-beam adapters and fused states: the returned score must be the
    # teacher-forced log-likelihood of the returned tokens, length-normalised -- wrong cache reordering or
    # extras following the wrong beam would break it. (The "hf" style is checked against transformers below.)
    kwargs = dict(adapters=t5["adapters"], extra_encoder_states=t5["extra"], extra_encoder_mask=t5["extra_mask"])
    alpha = 0.6
    tokens, scores = t5["predict"](t5["params"], t5["enc"], max_decode_len=MAX_LEN, beam_size=3, alpha=alpha,
                                   **kwargs)
    tokens = np.asarray(tokens)
    # (score_targets' default weights, target != 0, are right here: no 0 token was generated before EOS)
    assert np.array_equal(_output_weights(tokens), tokens != 0)
    ref = t5["score"](t5["params"], t5["enc"], _shift_right(jnp.asarray(tokens)), jnp.asarray(tokens), **kwargs)
    for b in range(tokens.shape[0]):
        seq = _strip(tokens[b], 1)  # unnormalised when nothing finished (see decoding.beam_search)
        expected = float(ref.sum[b]) / (_np_brevity(alpha, len(seq), "t5x") if 1 in seq else 1.0)
        np.testing.assert_allclose(float(scores[b]), expected, rtol=1e-4, atol=1e-4)


def test_score_targets_masks_padding_and_averages(t5):
    targets = jnp.asarray([[5, 6, 7, 1, 0, 0, 0, 0, 0, 0], [9, 1, 0, 0, 0, 0, 0, 0, 0, 0],
                           [4, 4, 4, 4, 4, 4, 4, 4, 4, 1]], jnp.int32)
    kwargs = dict(adapters=t5["adapters"], extra_encoder_states=t5["extra"], extra_encoder_mask=t5["extra_mask"])
    out = t5["score"](t5["params"], t5["enc"], _shift_right(targets), targets, **kwargs)
    # Reference: the causal logits (with no target padding mask: it changes no scored position).
    logits = t5["full_logits"](t5["params"], t5["enc"], _shift_right(targets), t5["adapters"], t5["extra"],
                               t5["extra_mask"])
    log_probs = np.asarray(jax.nn.log_softmax(logits, axis=-1), np.float64)
    for b, row in enumerate(np.asarray(targets).tolist()):
        n = sum(t != 0 for t in row)
        total = sum(log_probs[b, t, row[t]] for t in range(n))
        np.testing.assert_allclose(float(out.sum[b]), total, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(out.mean[b]), total / n, rtol=1e-5, atol=1e-5)
        assert float(out.num_tokens[b]) == n


# --------------------------------------------------------------------------------------------------------
# Parity with transformers' generate on a tiny random T5 (saved with save_pretrained, imported with load_t5).
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_t5(tmp_path_factory):
    import torch
    from tiny_hf import build_tiny_t5, make_batch

    from tagi_jax.hf import load_t5
    from tagi_jax.models.t5 import T5

    torch.set_num_threads(1)
    torch_model = build_tiny_t5("v1_1", seed=0)
    with torch.no_grad():  # a larger EOS row: some rows stop early, one row runs to the length limit
        torch_model.lm_head.weight[1] *= 3.0
    directory = str(tmp_path_factory.mktemp("decoding_hf_t5"))
    torch_model.save_pretrained(directory, safe_serialization=True)
    config, params = load_t5(directory)
    model = T5(config)
    enc = make_batch(config.vocab_size, batch=4, enc_len=9, seed=1)["encoder_input_tokens"]
    predict = jax.jit(functools.partial(predict_lib.predict, model),
                      static_argnames=("max_decode_len", "beam_size", "length_penalty_style"))
    return dict(torch_model=torch_model, params=params, enc=enc, predict=predict)


def _hf_generate(hf_t5, **kwargs):
    import torch

    enc = torch.as_tensor(hf_t5["enc"], dtype=torch.long)
    with torch.no_grad():
        out = hf_t5["torch_model"].generate(input_ids=enc, attention_mask=(enc > 0).long(), do_sample=False,
                                            return_dict_in_generate=True, output_scores=True, **kwargs)
    return out


def test_greedy_matches_transformers_generate(hf_t5):
    n = 20
    out = _hf_generate(hf_t5, max_new_tokens=n, num_beams=1)
    tokens, _ = hf_t5["predict"](hf_t5["params"], jnp.asarray(hf_t5["enc"]), max_decode_len=n)
    tokens = np.asarray(tokens)
    hf = out.sequences.numpy()[:, 1:]  # drop the decoder start token; finished rows are padded with 0
    expected = np.zeros_like(tokens)
    expected[:, :hf.shape[1]] = hf
    np.testing.assert_array_equal(tokens, expected)
    lengths = [len(_strip(row, 1)) for row in tokens]
    assert max(lengths) == n and min(lengths) < n  # both the length limit and EOS are exercised


def test_beam_search_matches_transformers_generate(hf_t5):
    # transformers' beam search with early_stopping="never" is our "hf" length-penalty style (see
    # decoding.beam_search; its default early_stopping=False stops on a heuristic instead). Its outputs are
    # padded with EOS after EOS (pad id 0 is falsy there), ours with 0: compare up to the first EOS.
    n, alpha = 12, 0.6
    out = _hf_generate(hf_t5, max_new_tokens=n, num_beams=4, length_penalty=alpha, early_stopping="never")
    tokens, scores = hf_t5["predict"](hf_t5["params"], jnp.asarray(hf_t5["enc"]), max_decode_len=n,
                                      beam_size=4, alpha=alpha, length_penalty_style="hf")
    hf = out.sequences.numpy()[:, 1:]
    for b in range(hf.shape[0]):
        hf_seq = [int(t) for t in hf[b]]
        hf_seq = hf_seq[:hf_seq.index(1) + 1] if 1 in hf_seq else hf_seq
        assert _strip(np.asarray(tokens[b]), 1) == hf_seq, b
    np.testing.assert_allclose(np.asarray(scores), out.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)
    lengths = [len(_strip(row, 1)) for row in np.asarray(tokens)]
    assert max(lengths) == n and min(lengths) < n
