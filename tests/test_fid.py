"""Fusion-in-Decoder (tagi_jax.models.fid) against independent references, on tiny random T5s:

* one passage == the plain T5 encoder-decoder;
* N passages == transformers: its encoder on each passage alone, outputs concatenated, its decoder on them;
* permuting passages leaves the logits unchanged; an all-padding passage is invisible; removing a real one is not;
* per-example adapters == each example alone with its adapter (plain T5 calls), and shared adapters;
* bad shapes raise ValueErrors naming the argument;
* greedy decoding == step-by-step argmax of teacher forcing; beam search over [p, pad, pad] == plain beam
  search on p (per-example adapters repeated per passage and per beam).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.hf import load_t5
from tagi_jax.models import fid, lora
from tagi_jax.models.predict import predict
from tagi_jax.models.t5 import T5
from tiny_hf import make_batch, random_adapters, tiny_hf_t5

EXACT, HF_TOL = 1e-5, 1e-4
TARGETS = lora.DEFAULT_TARGETS + ("encoder_ffn.wo", "decoder_cross.k")


@pytest.fixture(scope="module")
def hf_v1_1(tmp_path_factory):
    """(torch model, T5Config, params)."""
    path, torch_model = tiny_hf_t5(tmp_path_factory, "v1_1")
    config, params = load_t5(path)
    return torch_model, config, params


def _passages(vocab: int, lengths: list[list[int]], length: int, seed: int) -> np.ndarray:
    """int32 [batch, n, length]: row (i, j) has lengths[i][j] tokens, the last one EOS (1); 0 = all padding."""
    rng = np.random.RandomState(seed)
    out = np.zeros((len(lengths), len(lengths[0]), length), np.int32)
    for i, row in enumerate(lengths):
        for j, n in enumerate(row):
            if n:
                out[i, j, :n - 1] = rng.randint(3, vocab, size=n - 1)
                out[i, j, n - 1] = 1
    return out


LENGTHS = [[7, 5, 3], [6, 4, 0]]  # example 1's third passage is all padding


def _decoder_batch(vocab: int, batch: int = 2, dec_len: int = 5, seed: int = 11):
    b = make_batch(vocab, batch=batch, enc_len=3, dec_len=dec_len, seed=seed)
    return b["decoder_input_tokens"], b["decoder_target_tokens"]


@functools.lru_cache(maxsize=None)
def _fid_logits(config):
    return jax.jit(functools.partial(fid.fid_logits, T5(config)))


def _plain_fid_reference(module: T5, passages, dec_in, dec_tgt, adapters):
    """One example (passages [n, L]) with plain T5 calls: encode each passage, concatenate, decode."""
    n, length = passages.shape
    encoded = jnp.concatenate([module.encode(passages[j:j + 1], adapters=adapters) for j in range(n)], axis=1)
    return module.decode(encoded, passages.reshape(1, n * length), dec_in, dec_tgt, adapters=adapters)


@functools.lru_cache(maxsize=None)
def _reference(config):
    model = T5(config)
    return jax.jit(lambda params, *args: model.apply({"params": params}, *args, method=_plain_fid_reference))


def test_one_passage_equals_plain_encoder_decoder(hf_v1_1):
    _, config, params = hf_v1_1
    batch = make_batch(config.vocab_size, batch=3, enc_len=9, dec_len=6, seed=2)
    enc, dec_in, dec_tgt = batch["encoder_input_tokens"], batch["decoder_input_tokens"], batch["decoder_target_tokens"]
    ours = _fid_logits(config)(params, enc[:, None, :], dec_in, dec_tgt)
    plain = jax.jit(lambda p: T5(config).apply({"params": p}, enc, dec_in, dec_tgt))(params)
    assert ours.shape == plain.shape == (3, 6, config.vocab_size)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=EXACT, rtol=0)


def _hf_fid_logits(torch_model, passages, dec_in, dec_tgt) -> np.ndarray:
    """transformers, as the FiD reference code does it: encoder per passage, concatenate, decoder."""
    import torch

    tokens = torch.as_tensor(passages, dtype=torch.long)
    with torch.no_grad():
        states = [torch_model.encoder(input_ids=tokens[:, j], attention_mask=(tokens[:, j] > 0).long())
                  .last_hidden_state for j in range(tokens.shape[1])]
        concat = torch.cat(states, dim=1)
        mask = (tokens > 0).long().reshape(tokens.shape[0], -1)
        out = torch_model(encoder_outputs=(concat,), attention_mask=mask,
                          decoder_input_ids=torch.as_tensor(dec_in, dtype=torch.long),
                          decoder_attention_mask=torch.as_tensor(dec_tgt > 0, dtype=torch.long))
    return out.logits.float().numpy()


def test_three_passages_match_transformers(hf_v1_1):
    torch_model, config, params = hf_v1_1
    passages = _passages(config.vocab_size, LENGTHS, 7, seed=3)
    dec_in, dec_tgt = _decoder_batch(config.vocab_size)
    encoded, flat = jax.jit(functools.partial(fid.fid_encode, T5(config)))(params, passages)
    assert encoded.shape == (2, 21, config.d_model) and flat.shape == (2, 21)
    np.testing.assert_array_equal(np.asarray(flat), passages.reshape(2, 21))
    ours = np.asarray(_fid_logits(config)(params, passages, dec_in, dec_tgt))
    ref = _hf_fid_logits(torch_model, passages, dec_in, dec_tgt)
    assert np.isfinite(ours).all() and np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=HF_TOL, rtol=0)


def test_passage_order_is_irrelevant_and_every_real_passage_is_read(hf_v1_1):
    _, config, params = hf_v1_1
    passages = _passages(config.vocab_size, LENGTHS, 7, seed=4)
    dec_in, dec_tgt = _decoder_batch(config.vocab_size)
    logits = np.asarray(_fid_logits(config)(params, passages, dec_in, dec_tgt))
    # a different permutation per example (example 1 moves its padding passage to the front)
    permuted = np.stack([passages[0, [2, 0, 1]], passages[1, [2, 1, 0]]])
    np.testing.assert_allclose(np.asarray(_fid_logits(config)(params, permuted, dec_in, dec_tgt)), logits,
                               atol=EXACT, rtol=0)
    # without the third passage: example 1 lost only padding (unchanged), example 0 a real passage (changed)
    dropped = np.asarray(_fid_logits(config)(params, passages[:, :2], dec_in, dec_tgt))
    np.testing.assert_allclose(dropped[1], logits[1], atol=EXACT, rtol=0)
    assert np.abs(dropped[0] - logits[0]).max() > 1e-3


def _example_adapter(adapters, i):
    """Example i's factors as a shared (unbatched) adapter."""
    return {t: {"A": e["A"][i], "B": e["B"][i], "scale": e["scale"]} for t, e in adapters.items()}


@pytest.mark.parametrize("kind", ["per_example", "shared"])
def test_adapters_equal_each_example_alone(hf_v1_1, kind):
    _, config, params = hf_v1_1
    passages = _passages(config.vocab_size, LENGTHS, 7, seed=5)
    dec_in, dec_tgt = _decoder_batch(config.vocab_size)
    batched = random_adapters(config, TARGETS, rank=3, batch=2, seed=6)
    adapters = batched if kind == "per_example" else _example_adapter(batched, 0)
    ours = np.asarray(_fid_logits(config)(params, passages, dec_in, dec_tgt, adapters))
    for i in range(2):
        alone = _example_adapter(batched, i if kind == "per_example" else 0)
        ref = _reference(config)(params, passages[i], dec_in[i:i + 1], dec_tgt[i:i + 1], alone)
        np.testing.assert_allclose(ours[i], np.asarray(ref)[0], atol=EXACT, rtol=0, err_msg=f"example {i}")
    plain = np.asarray(_fid_logits(config)(params, passages, dec_in, dec_tgt))
    assert np.abs(ours - plain).max() > 1e-3  # the adapters matter, so the comparison above means something


def test_bad_shapes_raise_naming_the_argument(hf_v1_1):
    _, config, params = hf_v1_1
    model = T5(config)
    passages = _passages(config.vocab_size, LENGTHS, 7, seed=0)
    dec_in, dec_tgt = _decoder_batch(config.vocab_size)
    shape_of = functools.partial(jax.eval_shape, functools.partial(fid.fid_logits, model), params)
    with pytest.raises(ValueError, match=r"passage_tokens must have shape \[batch, n_passages, length\]"):
        shape_of(passages[0], dec_in)
    with pytest.raises(ValueError, match="passage_tokens must be integer"):
        shape_of(passages.astype(np.float32), dec_in)
    with pytest.raises(ValueError, match="passage_tokens .* empty axis"):
        shape_of(passages[:, :0], dec_in)
    with pytest.raises(ValueError, match=r"decoder_input_tokens must have shape \[batch=2, dec_len\]"):
        shape_of(passages, dec_in[:1])
    with pytest.raises(ValueError, match=r"decoder_target_tokens must have shape \[batch=2, 5\]"):
        shape_of(passages, dec_in, dec_tgt[:, :3])
    three = random_adapters(config, TARGETS, batch=3)
    with pytest.raises(ValueError, match="batch axis 3 does not match the input batch 2"):
        shape_of(passages, dec_in, None, three)
    with pytest.raises(ValueError, match=r"passage_tokens must have shape"):
        jax.eval_shape(functools.partial(fid.fid_encode, model), params, passages.reshape(2, 21))
    with pytest.raises(ValueError, match=r"passage_tokens must have shape"):
        fid.fid_predict(model, params, passages.reshape(2, 21), max_decode_len=3)


def test_greedy_equals_stepwise_teacher_forcing_argmax(hf_v1_1):
    _, config, params = hf_v1_1
    model, steps = T5(config), 6
    passages = _passages(config.vocab_size, LENGTHS, 7, seed=7)
    adapters = random_adapters(config, TARGETS, batch=2, seed=8)
    tokens, scores = jax.jit(functools.partial(fid.fid_predict, model, max_decode_len=steps))(
        params, passages, adapters=adapters)
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    # Reference: grow the prefix one argmax at a time with teacher-forced logits. The prefix lives in a
    # fixed-length buffer (zeros after it): the decoder is causal, so position t reads only inputs <= t,
    # and one compiled call serves every step.
    prefix = np.zeros((2, steps), np.int32)  # start token 0, then the generated tokens
    ref, log_prob = np.zeros((2, steps), np.int32), np.zeros(2)
    done = np.zeros(2, bool)
    for t in range(steps):
        logits = np.asarray(_fid_logits(config)(params, passages, prefix, None, adapters))[:, t]
        shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        ref[:, t] = np.where(done, 0, logits.argmax(-1))
        log_prob += np.where(done, 0.0, logp[np.arange(2), ref[:, t]])
        done |= ref[:, t] == 1
        if t + 1 < steps:
            prefix[:, t + 1] = ref[:, t]
    np.testing.assert_array_equal(tokens, ref)
    np.testing.assert_allclose(scores, log_prob, atol=1e-4, rtol=0)
    assert len(set(ref[0]) | set(ref[1])) > 2  # a real sequence, not EOS at once


def test_beam_search_over_padding_passages_equals_plain_beam_search(hf_v1_1):
    _, config, params = hf_v1_1
    model = T5(config)
    batch = make_batch(config.vocab_size, batch=2, enc_len=7, dec_len=3, seed=9)
    enc = batch["encoder_input_tokens"]
    passages = np.zeros((2, 3, 7), np.int32)
    passages[:, 1] = enc  # the real passage between two all-padding ones
    adapters = random_adapters(config, TARGETS, batch=2, seed=10)
    search = dict(max_decode_len=5, beam_size=3)
    ours = jax.jit(functools.partial(fid.fid_predict, model, **search))(params, passages, adapters=adapters)
    ref = jax.jit(functools.partial(predict, model, **search))(params, enc, adapters=adapters)
    np.testing.assert_array_equal(np.asarray(ours[0]), np.asarray(ref[0]))
    np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(ref[1]), atol=EXACT, rtol=0)
