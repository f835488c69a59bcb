"""Generated adapters exported as PEFT LoRA directories: Hugging Face T5 + PEFT reproduces our logits.

The references are independent: transformers' T5 loaded from the backbone weights (`hf.save_t5_hf`) with
`peft.PeftModel.from_pretrained` on the exported directory, and, the other way round, an adapter that PEFT
itself wrote (`save_pretrained`) loaded by `export.load_peft_adapter`.
"""
import functools
import json
import os

import jax
import numpy as np
import pytest
from tagi_jax import export, hf
from tagi_jax.eval import adapters as adapters_lib
from tagi_jax.eval import decode as decode_lib
from tagi_jax.models import lora, tagi
from tagi_jax.models.hypernet import HyperNetConfig
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import tiny_config
from tagi_jax.vocab import get_vocabulary
from tagi_jax.api import TAGIPredictor
from tagi_jax.run import pipeline
from test_evaluation import random_tagi  # the shared tiny-TAGI helper (random parameters, no init compile)
from test_pipeline import tiny_config as tiny_pipeline_config
from tiny_hf import hf_logits, make_batch, tiny_hf_t5

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HYPER_LEN = 128
TOL = 1e-4


def build(fusion: str, t5=None, targets=lora.DEFAULT_TARGETS, seed: int = 0):
    """A tiny TAGI with random parameters (hypernetwork B heads included, so adapters are non-zero)."""
    return random_tagi(fusion, seed=seed, t5=t5, targets=targets)


def np_adapters(t5, targets, rank: int, seed: int = 0, batch: int | None = None) -> dict:
    """Random numpy LoRA factors of the right shapes (no device work)."""
    rng = np.random.RandomState(seed)
    lead = () if batch is None else (batch,)
    out = {}
    for target in targets:
        layers, d_in, d_out = lora.adapter_dims(t5, target)
        out[target] = {"A": rng.standard_normal(lead + (layers, d_in, rank)).astype(np.float32),
                       "B": rng.standard_normal(lead + (layers, rank, d_out)).astype(np.float32),
                       "scale": np.float32(2.0)}
    return out


def load_peft(hf_dir: str, adapter_dir: str):
    base = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


def our_logits(model, params, adapters, batch) -> np.ndarray:
    """Logits of our T5 backbone with a shared (unbatched) adapter."""
    apply = jax.jit(functools.partial(T5(model.config.t5).apply, method=T5.__call__))
    return np.asarray(apply({"params": params["t5"]}, batch["encoder_input_tokens"], batch["decoder_input_tokens"],
                            batch["decoder_target_tokens"], adapters=adapters))


@pytest.fixture(scope="module")
def vocab():
    return get_vocabulary("byte")


@pytest.fixture(scope="module")
def no_fusion(tmp_path_factory):
    """A tiny TAGI without instruction fusion and its backbone saved as a Hugging Face T5."""
    model, params = build("none")
    hf_dir = str(tmp_path_factory.mktemp("hf_backbone"))
    hf.save_t5_hf(hf_dir, model.config.t5, jax.device_get(params["t5"]))
    return model, params, hf_dir


def test_exported_adapter_gives_peft_the_same_logits(no_fusion, vocab, tmp_path):
    model, params, hf_dir = no_fusion
    instruction = "Definition: Reverse the order of the words.\n\n"
    table = adapters_lib.generate_task_adapters(model, params, [instruction, "Definition: Sort the numbers."],
                                              vocab, HYPER_LEN, batch_size=4)
    adapter = table.adapter(instruction)
    out = export.export_peft_adapter(adapter, str(tmp_path / "adapter"), model.config.t5,
                                     base_model_name_or_path=hf_dir, metadata={"instruction": instruction})

    with open(os.path.join(out, export.CONFIG_FILE)) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_2_SEQ_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] / cfg["r"] == pytest.approx(model.config.hypernet.scale)
    assert "encoder.block.1.layer.0.SelfAttention.q" in cfg["target_modules"]
    assert "decoder.block.0.layer.1.EncDecAttention.v" in cfg["target_modules"]
    assert len(cfg["target_modules"]) == 6 * 2  # 6 targets x 2 layers, nothing else wrapped

    batch = make_batch(vocab_size=model.config.t5.vocab_size, batch=3, enc_len=11, dec_len=7, seed=3)
    peft_model = load_peft(hf_dir, out)
    theirs = hf_logits(peft_model, batch)
    # Our model with that adapter: the TAGI student path (fusion none) with the generated adapter...
    student = np.asarray(jax.jit(functools.partial(tagi.student_logits, model))(params, batch, (adapter, None, None)))
    # ... which is the backbone with the adapter applied factorised.
    ours = our_logits(model, params, adapter, batch)
    np.testing.assert_allclose(student, ours, atol=1e-5)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    # The adapter matters (the comparison above could not pass with a mis-mapped or ignored adapter).
    with peft_model.disable_adapter():
        plain = hf_logits(peft_model, batch)
    assert np.abs(plain - theirs).max() > 1e-2

    # Loading it back gives the same factors.
    back = export.load_peft_adapter(out, model.config.t5, rank=4, targets=model.config.adapter_targets)
    for target, entry in adapter.items():
        np.testing.assert_array_equal(back[target]["A"], np.asarray(entry["A"], np.float32))
        np.testing.assert_array_equal(back[target]["B"], np.asarray(entry["B"], np.float32))
        assert float(back[target]["scale"]) == pytest.approx(float(entry["scale"]))
    assert export.read_tagi_info(out)["instruction"] == instruction


def test_every_block_type_maps_to_its_hf_module(vocab, tmp_path):
    """k/o projections, self/cross attention in both stacks and ReLU FFN wi/wo of a tied v1.0-style T5."""
    t5 = tiny_config(feed_forward_proj="relu", tie_word_embeddings=True, num_decoder_layers=3)
    targets = ("encoder_self.k", "encoder_self.o", "encoder_ffn.wi", "decoder_self.q", "decoder_cross.k",
               "decoder_cross.o", "decoder_ffn.wo")
    model, params = build("none", t5=t5, targets=targets, seed=5)
    tokens, _ = decode_lib.tokenize(vocab, ["Definition: Count the vowels."], HYPER_LEN)
    adapters, _, _ = jax.jit(functools.partial(tagi.generate_adapters, model))(params, tokens)  # batch axis of 1
    hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "adapter")
    hf.save_t5_hf(hf_dir, t5, jax.device_get(params["t5"]))
    export.export_peft_adapter(adapters, out, t5)
    with open(os.path.join(out, export.CONFIG_FILE)) as f:
        modules = json.load(f)["target_modules"]
    assert "decoder.block.2.layer.2.DenseReluDense.wo" in modules
    assert "encoder.block.0.layer.1.DenseReluDense.wi" in modules
    assert "decoder.block.1.layer.1.EncDecAttention.o" in modules

    batch = make_batch(vocab_size=t5.vocab_size, batch=2, enc_len=9, dec_len=6, seed=4)
    theirs = hf_logits(load_peft(hf_dir, out), batch)
    ours = our_logits(model, params, adapters, batch)
    np.testing.assert_allclose(ours, theirs, atol=TOL, rtol=0)
    assert np.abs(ours - our_logits(model, params, None, batch)).max() > 1e-2


def test_adapter_written_by_peft_loads_into_our_model(no_fusion, tmp_path):
    """The reverse direction: a LoRA that PEFT itself saved (short target names, its own key format)."""
    model, params, hf_dir = no_fusion
    base = transformers.T5ForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager")
    config = peft.LoraConfig(task_type="SEQ_2_SEQ_LM", r=3, lora_alpha=7, target_modules=["q", "v", "wo"])
    peft_model = peft.get_peft_model(base, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    adapters = export.load_peft_adapter(str(tmp_path / "peft"), model.config.t5)
    assert set(adapters) == {"encoder_self.q", "encoder_self.v", "decoder_self.q", "decoder_self.v",
                             "decoder_cross.q", "decoder_cross.v", "encoder_ffn.wo", "decoder_ffn.wo"}
    assert float(adapters["encoder_ffn.wo"]["scale"]) == pytest.approx(7 / 3)
    batch = make_batch(vocab_size=model.config.t5.vocab_size, batch=2, seed=8)
    np.testing.assert_allclose(our_logits(model, params, adapters, batch), hf_logits(peft_model.eval(), batch),
                               atol=TOL, rtol=0)


@pytest.mark.parametrize("fusion, reader", [("prepend", "the decoder"),
                                            ("encoder_cross_attention", "every encoder layer")])
def test_fusion_model_export_is_refused_unless_allowed(vocab, tmp_path, fusion, reader):
    model, params = build(fusion, seed=2)
    table = adapters_lib.generate_task_adapters(model, params, ["Definition: Add 3 to every number."], vocab,
                                              HYPER_LEN, batch_size=4)
    adapter = table.adapter("Definition: Add 3 to every number.")
    with pytest.raises(export.FusionNotExportable, match=f"instruction fusion.*{reader}.*allow_fusion_loss"):
        export.export_peft_adapter(adapter, str(tmp_path / "refused"), model.config.t5, uses_fusion=True,
                                   fusion=fusion)
    assert not os.path.exists(tmp_path / "refused" / export.WEIGHTS_FILE)
    with pytest.warns(UserWarning, match="instruction fusion"):
        out = export.export_peft_adapter(adapter, str(tmp_path / "lossy"), model.config.t5, uses_fusion=True,
                                         allow_fusion_loss=True, fusion=fusion, instruction_states=table.states[0],
                                         instruction_mask=table.mask[0])
    info = export.read_tagi_info(out)
    assert info["instruction_fusion"] is True and info["fusion"] == fusion
    states, mask = export.load_instruction_states(out)
    np.testing.assert_array_equal(states, table.states[0])
    np.testing.assert_array_equal(mask, table.mask[0])


def test_bad_adapters_give_clear_errors(no_fusion, vocab, tmp_path):
    model, params, _ = no_fusion
    t5 = model.config.t5
    good = np_adapters(t5, ("encoder_self.q", "decoder_cross.v"), 4)
    out = export.export_peft_adapter(good, str(tmp_path / "good"), t5)

    with pytest.raises(export.AdapterFormatError, match=r"rank r=4 but the model expects rank 8"):
        export.load_peft_adapter(out, t5, rank=8)
    with pytest.raises(export.AdapterFormatError, match=r"lora_A.weight has shape \(4, 32\), expected \[r=4, d_in=48\]"):
        export.load_peft_adapter(out, tiny_config(d_model=48))
    with pytest.raises(export.AdapterFormatError, match="differ from the model's adapter_targets"):
        export.load_peft_adapter(out, t5, targets=lora.DEFAULT_TARGETS)
    with pytest.raises(export.AdapterFormatError, match=r"no module '(en|de)coder.block.1.layer.\d.\w+.[qv]' in a T5 with 1\+1 layers"):
        export.load_peft_adapter(out, tiny_config(num_encoder_layers=1, num_decoder_layers=1))
    with pytest.raises(FileNotFoundError, match="adapter directory not found"):
        export.load_peft_adapter(str(tmp_path / "missing"), t5)

    # A layer missing from the weights file.
    from safetensors.numpy import load_file, save_file
    weights = load_file(os.path.join(out, export.WEIGHTS_FILE))
    del weights["base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight"]
    save_file(weights, os.path.join(out, export.WEIGHTS_FILE))
    with pytest.raises(export.AdapterFormatError, match=r"'decoder_cross.v'.*lacks lora_A/lora_B for layer\(s\) \[1\]"):
        export.load_peft_adapter(out, t5)
    # Not a LoRA.
    with open(os.path.join(out, export.CONFIG_FILE), "w") as f:
        json.dump({"peft_type": "IA3", "r": 4}, f)
    with pytest.raises(export.AdapterFormatError, match="peft_type is 'IA3'"):
        export.load_peft_adapter(out, t5)

    # Export side: a batch of adapters, a wrong shape, mixed ranks.
    batched = np_adapters(t5, ("encoder_self.q",), 4, batch=2)
    with pytest.raises(export.AdapterFormatError, match="batch of 2 adapters"):
        export.export_peft_adapter(batched, str(tmp_path / "b"), t5)
    with pytest.raises(ValueError, match=r"adapters\['encoder_self.q'\]: A .* do not match"):
        export.export_peft_adapter(good, str(tmp_path / "s"), tiny_config(d_model=48))
    mixed = {**good, **np_adapters(t5, ("decoder_self.q",), 2)}
    with pytest.raises(export.AdapterFormatError, match="different ranks"):
        export.export_peft_adapter(mixed, str(tmp_path / "m"), t5)


@pytest.fixture(scope="module")
def trained_from_checkpoint(tmp_path_factory):
    """A tiny pipeline run (teachers, pretrain, finetune) from a Hugging Face T5 checkpoint, fusion none, whose
    TAGI stages train the whole backbone (`tagi.train_backbone = "all"`): the student's W0 is not the
    checkpoint's."""
    hf_dir, _ = tiny_hf_t5(tmp_path_factory, "v1_1")
    c = tiny_pipeline_config(steps=2)
    c.model.checkpoint = hf_dir
    c.data.vocabulary = "byte"  # 259 ids, within the checkpoint's 300 embeddings
    c.tagi.update(dict(fusion="none", train_backbone="all"))
    c.pipeline.stages = ("teachers", "pretrain", "finetune")
    c.pipeline.evaluate = ()
    c.stages.teachers.init_from = c.stages.pretrain.init_from = ""  # from the checkpoint
    c.stages.pretrain.optimizer.learning_rate = 1e-2  # so two steps visibly move the backbone
    workdir = str(tmp_path_factory.mktemp("trained_backbone"))
    pipeline.run(c, workdir)
    return workdir, hf_dir


def _student_and_peft_logits(predictor, out):
    adapter = export.load_peft_adapter(out, predictor.model.config.t5, rank=predictor.model.config.hypernet.rank,
                                       targets=predictor.model.config.adapter_targets)
    with open(os.path.join(out, export.CONFIG_FILE)) as f:
        base = json.load(f)["base_model_name_or_path"]
    batch = make_batch(vocab_size=64, batch=3, enc_len=11, dec_len=7, seed=5)
    student = jax.jit(functools.partial(tagi.student_logits, predictor.model))(predictor.params, batch,
                                                                               (adapter, None, None))
    return np.asarray(student), hf_logits(load_peft(base, out), batch), base


def test_export_reproduces_a_student_whose_backbone_was_trained(trained_from_checkpoint, tmp_path):
    """HF T5 + PEFT from the exported files alone give the student's logits: the adapter's base is the trained
    backbone written beside it, not the checkpoint the run imported (on which the adapter computes something
    else)."""
    workdir, hf_dir = trained_from_checkpoint
    predictor = TAGIPredictor.load(workdir)
    adapter = predictor.generate_adapter("Sort the numbers in increasing order.")
    out = predictor.save_adapter(str(tmp_path / "adapter"), adapter)
    student, theirs, base = _student_and_peft_logits(predictor, out)
    assert base == os.path.abspath(os.path.join(out, export.BACKBONE_DIR)) and os.path.isdir(base)
    np.testing.assert_allclose(student, theirs, atol=TOL, rtol=0)
    on_checkpoint = hf_logits(load_peft(hf_dir, out), make_batch(vocab_size=64, batch=3, enc_len=11, dec_len=7, seed=5))
    assert np.abs(on_checkpoint - student).max() > 1e-3  # the checkpoint is not the student's backbone
    with pytest.raises(ValueError, match="leave base_model_name_or_path unset"):
        predictor.save_adapter(str(tmp_path / "explicit"), adapter, base_model_name_or_path=hf_dir)
    assert not os.path.exists(tmp_path / "explicit")

    # A student whose backbone is exactly the checkpoint's (as with train_backbone="none") exports the adapter
    # alone, with the checkpoint as its base.
    untouched = TAGIPredictor.load(workdir)
    untouched.params = {**untouched.params, "t5": hf.load_t5(hf_dir)[1]}
    again = untouched.generate_adapter("Sort the numbers in increasing order.")
    out = untouched.save_adapter(str(tmp_path / "adapter_only"), again)
    student, theirs, base = _student_and_peft_logits(untouched, out)
    assert base == hf_dir and not os.path.exists(os.path.join(out, export.BACKBONE_DIR))
    np.testing.assert_allclose(student, theirs, atol=TOL, rtol=0)
