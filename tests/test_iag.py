"""IAG in the pipeline: passages in text features (separator -> EOS-terminated segments, the same on the SeqIO and
the evaluation paths), the Fusion-in-Decoder layout and reader inside TAGI, the QA benchmarks' files and checks,
the IAG backbone policy, and a tiny synthetic-QA pipeline (FiD reader, closed-book, IAG student with an imagined
document) on the (4, 2) fake-device mesh."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from tagi_jax import features as F
from tagi_jax.config import ConfigError, load_config
from tagi_jax.eval import decode, report
from tagi_jax.jsonl import iter_jsonl
from tagi_jax.models import fid
from tagi_jax.models import tagi as tagi_lib
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run import defaults as run_defaults
from tagi_jax.run import pipeline
from tagi_jax.run import workdir as run_workdir
from tasks import qa
from tasks.common import function_source, register_task

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEP = F.PASSAGE_SEPARATOR
BYTE = seqio.ByteVocabulary()


# ------------------------------------------------------------------------------------------------ passages
def test_fid_layout_puts_each_segment_in_its_slot():
    tokens = np.array([[5, 6, 1, 7, 8, 9, 1, 4, 1, 0],     # three passages, the middle one too long for a slot
                       [5, 1, 0, 0, 0, 0, 0, 0, 0, 0],     # one passage: the second slot stays padding
                       [5, 6, 7, 1, 8, 1, 9, 9, 1, 1]])    # more passages than slots
    want = np.array([[5, 6, 1, 7, 8, 1],
                     [5, 1, 0, 0, 0, 0],
                     [5, 6, 1, 8, 1, 0]])
    np.testing.assert_array_equal(np.asarray(fid.fid_layout(tokens, 2, 3)), want)
    np.testing.assert_array_equal(np.asarray(jax.jit(fid.fid_layout, static_argnums=(1, 2))(tokens, 2, 3)), want)
    with pytest.raises(ValueError, match="passage_length >= 2"):
        fid.fid_layout(tokens, 2, 1)


def test_passages_tokenise_alike_in_seqio_and_in_evaluation():
    """Byte ids are the byte + 3; EOS (1) after every passage."""
    text = f"ab{SEP}c"
    ex = {F.INPUTS: "q", F.HYPER_INPUTS: "h", F.FULL_INPUTS: text, F.TARGETS: "t", F.TASK_NAME: "x"}
    register_task("iag_passages_test", function_source(lambda split: [ex], splits=("train",)), BYTE, passages=True)
    ds = seqio.get_mixture_or_task("iag_passages_test").get_dataset({k: 16 for k in F.TEXT_FEATURES}, split="train",
                                                                    shuffle=False)
    got = next(iter(ds.as_numpy_iterator()))
    np.testing.assert_array_equal(got[F.FULL_INPUTS], [100, 101, 1, 102, 1])
    np.testing.assert_array_equal(got[F.INPUTS], [116, 1])  # no separator: as plain tokenisation
    host, truncated = decode.tokenize(BYTE, [text, "q"], 6)
    np.testing.assert_array_equal(host, [[100, 101, 1, 102, 1, 0], [116, 1, 0, 0, 0, 0]])
    assert truncated == 0


def _tiny_tagi(fid_passages: int, fid_passage_length: int):
    t5 = T5Config(vocab_size=64, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1,
                  num_decoder_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                  dropout_rate=0.0)
    cfg = tagi_lib.TAGIConfig(t5=t5, fusion="none", fid_passages=fid_passages, fid_passage_length=fid_passage_length)
    return tagi_lib.TAGI(cfg), tagi_lib.init_params(cfg, jax.random.key(0))


def test_tagi_reads_full_inputs_with_fusion_in_decoder():
    """TAGI's FiD reader on EOS-segmented full inputs == `fid_logits` on the same passages laid out by hand;
    a model without FiD reads the same tokens as one text (different logits); the backbone stage never uses FiD."""
    model, params = _tiny_tagi(2, 4)
    params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
    full = jnp.array([[5, 6, 1, 7, 8, 9, 1, 0], [9, 1, 0, 0, 0, 0, 0, 0]], jnp.int32)
    by_hand = jnp.array([[[5, 6, 1, 0], [7, 8, 9, 1]], [[9, 1, 0, 0], [0, 0, 0, 0]]], jnp.int32)
    dec_in = jnp.array([[0, 3, 4], [0, 5, 0]], jnp.int32)
    dec_tgt = jnp.array([[3, 4, 1], [5, 1, 0]], jnp.int32)
    batch = {F.FULL_ENCODER_INPUT_TOKENS: full, F.DECODER_INPUT_TOKENS: dec_in, F.DECODER_TARGET_TOKENS: dec_tgt}
    got = tagi_lib.concat_logits(model, params, batch)
    want = fid.fid_logits(T5(model.config.t5), params["t5"], by_hand, dec_in, dec_tgt)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    plain = tagi_lib.concat_logits(model, params, batch, passages=False)
    assert np.abs(np.asarray(plain) - np.asarray(got))[0].max() > 1e-3


# ------------------------------------------------------------------------------------------------ QA files
def test_passages_file_rows_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text(json.dumps({"question": "who?", "passages": ["A did.", "B did not."]}) + "\n")
    assert qa.read_passages_file(str(good)) == {"who?": ["A did.", "B did not."]}
    cases = [
        ({"question": "who?"}, "field 'passages': must be a non-empty list"),
        ({"question": "who?", "passages": []}, "field 'passages': must be a non-empty list"),
        ({"question": "who?", "passages": ["a" + SEP + "b"]}, "passages[0]': holds the passage separator"),
        ({"passages": ["x"]}, "field 'question': missing"),
    ]
    for i, (row, message) in enumerate(cases):
        bad = tmp_path / f"bad{i}.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(qa.QAFormatError, match=message.replace("[", r"\[").replace("]", r"\]")):
            qa.read_passages_file(str(bad))
    twice = tmp_path / "twice.jsonl"
    twice.write_text(2 * (json.dumps({"question": "q", "passages": ["p"]}) + "\n"))
    with pytest.raises(qa.QAFormatError, match=r"twice.jsonl:2: field 'question': listed twice \(first at .*:1\)"):
        qa.read_passages_file(str(twice))


def test_nq_open_with_passages_renders_for_the_reader_and_the_student(shared_data, tmp_path):
    """Real NQ-open rows + a passages file: full_inputs = one "question: q context: p" per passage, the student's
    inputs the question with its imagined document; a question the file lacks is an error naming it."""
    qa_dir = shared_data / "qa"
    rows = qa.read_qa_file(qa.qa_file(str(qa_dir), "nq_open", "test"), limit=3)
    passages = tmp_path / "retrieved.jsonl"
    passages.write_text("".join(json.dumps({"question": r["question"], "passages": [f"P{i}a", f"P{i}b", "P3"]}) + "\n"
                                for i, r in enumerate(rows)))
    imagined = tmp_path / "imagined.jsonl"
    imagined.write_text("".join(json.dumps({"question": r["question"], "passages": [f"I{i}"]}) + "\n"
                                for i, r in enumerate(rows)))
    train, test = qa.register_qa_run(BYTE, train_file=None, eval_file=qa.qa_file(str(qa_dir), "nq_open", "test"),
                                     dataset="nq_open", eval_split="test", passages_file=str(passages),
                                     num_passages=2, imagined_file=str(imagined), max_eval_examples=3,
                                     prefix="iagtest")
    assert train is None and test == "iagtest_nq_open_test"
    from tagi_jax.data.batches import eval_examples
    examples = eval_examples(test)
    assert len(examples) == 3
    q0 = rows[0]["question"]
    assert examples[0][F.FULL_INPUTS] == f"question: {q0} context: P0a{SEP}question: {q0} context: P0b"
    assert examples[0][F.INPUTS] == f"question: {q0} context: I0"
    assert examples[0][F.HYPER_INPUTS] == q0 and examples[0][F.REFERENCES] == rows[0]["answer"]
    passages.write_text(json.dumps({"question": "something else", "passages": ["x"]}) + "\n")
    qa.register_qa_run(BYTE, train_file=None, eval_file=qa.qa_file(str(qa_dir), "nq_open", "test"),
                       dataset="nq_open", eval_split="test", passages_file=str(passages), num_passages=1,
                       max_eval_examples=1, prefix="iagmiss")
    with pytest.raises(Exception, match="passages file: no entry for question"):
        eval_examples("iagmiss_nq_open_test")


def test_qa_summary_reports_exact_match():
    summary = {"concat": {"test": {"em": 87.5}}, "tagi": {"test": {"em": 12.5}}}
    text = report.format_summary(summary)
    assert "test EM" in text and "87.5" in text and "12.5" in text
    assert report.summary_entry({"em": 50.0, "per_task": {}}) == {"em": 50.0}


# ------------------------------------------------------------------------------------------------ the pipeline
def tiny_iag_config(student_document: str = "none"):
    c = load_config(os.path.join(REPO, "configs", "iag_demo.py"))
    c.model.update(dict(vocab_size=512, d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1,
                        num_decoder_layers=1, relative_attention_num_buckets=8, relative_attention_max_distance=16))
    c.hypernet.update(dict(rank=2, lora_alpha=4.0, hidden_dim=16, embed_dim=8))
    c.data.synthetic_qa.update(dict(num_entities=10, vocab_size=512, corpus_copies=1))  # 2 test entities
    c.data.qa.update(dict(num_passages=2, passage_length=24, student_document=student_document))
    c.data.lengths.update(dict(inputs=32, hyper_inputs=16, full_inputs=48, targets=8))
    for stage in c.pipeline.stages:
        s = c.stages[stage]
        s.train.update(dict(steps=2, batch_size=8, log_every=1, progress_bar=False))
        s.optimizer.update(dict(warmup_steps=0, schedule="constant"))
    c.eval.update(dict(batch_size=8, max_decode_len=4))
    c.mesh.update(dict(data=4, model=2))
    return c


def test_tiny_iag_pipeline_on_a_4x2_mesh(tmp_path):
    """Every IAG stage trains (no LoRA teachers: the KL teacher is the FiD reader), each method is scored with the
    QA exact match on all 12 test questions (2 held-out entities); the imagined-document student then trains from the same stages."""
    workdir = str(tmp_path / "closed_book")
    result = pipeline.run(tiny_iag_config(), workdir)
    assert set(result["summary"]) == {"no_instruction", "tagi", "concat"}
    for method, by_split in result["summary"].items():
        assert 0.0 <= by_split["test"]["em"] <= 100.0
        records = [r for _, r in iter_jsonl(os.path.join(workdir, "eval", f"{method}_test_predictions.jsonl"))]
        assert len(records) == 12 and all(r["task_name"] == "sqa_test" for r in records)
    assert not os.path.exists(os.path.join(workdir, "teachers"))
    _, reader, _ = run_workdir.load_trained(workdir, "concat")
    assert (reader.config.fid_passages, reader.config.fid_passage_length) == (2, 24)

    imagined = str(tmp_path / "imagined")
    for part in ("backbone", "pretrain", "concat", "data"):
        shutil.copytree(os.path.join(workdir, part), os.path.join(imagined, part))
    c = tiny_iag_config("imagined")
    c.pipeline.stages, c.pipeline.evaluate = ("finetune",), ("tagi",)
    result = pipeline.run(c, imagined)
    records = [r for _, r in iter_jsonl(os.path.join(imagined, "eval", "tagi_test_predictions.jsonl"))]
    assert len(records) == 12 and 0.0 <= result["summary"]["tagi"]["test"]["em"] <= 100.0


@pytest.mark.parametrize("overrides, message", [
    ({"data.qa.num_passages": 2, "data.qa.passage_length": 0}, "'data.qa.passage_length' must be >= 2"),
    ({"data.qa.num_passages": 0, "data.qa.passage_length": 8}, "'data.qa.passage_length' is set but"),
    ({"data.qa.student_document": "retrieved"}, "'data.qa.student_document'"),
    ({"data.qa.num_passages": 100}, "'data.qa.num_passages' (100) exceeds 'data.synthetic_qa.num_entities'"),
    ({"data.synthetic_qa.imagined_accuracy": 1.5}, "'data.synthetic_qa.imagined_accuracy' must be in [0, 1]"),
    ({"data.benchmark": "qa", "data.vocabulary": "byte"}, "'data.qa.dir'"),
    ({"tagi.train_backbone": "ffn"}, "'tagi.train_backbone'"),
])
def test_bad_qa_settings_fail_at_load_time(overrides, message):
    c = tiny_iag_config()
    for key, value in overrides.items():
        section, *rest = key.split(".")
        node = c[section]
        for part in rest[:-1]:
            node = node[part]
        node[rest[-1]] = value
    with pytest.raises(ConfigError) as e:
        run_defaults.validate(c)
    assert message in str(e.value)


def test_qa_benchmark_needs_its_files(shared_data, tmp_path):
    c = tiny_iag_config()
    c.data.benchmark, c.data.vocabulary = "qa", "byte"
    c.data.qa.update(dict(dir=str(shared_data / "qa"), dataset="nq_open", num_passages=0, passage_length=0))
    with pytest.raises(ConfigError, match="'data.qa.train_file' is empty and nq_open has no train split"):
        run_defaults.validate(c)
    c.data.qa.train_file = str(shared_data / "qa" / "nq_open" / "dev.jsonl")
    c.data.qa.update(dict(num_passages=2, passage_length=16))
    with pytest.raises(ConfigError, match="'data.qa.num_passages' is set but 'data.qa.passages_file' is empty"):
        run_defaults.validate(c)
    c.data.qa.update(dict(num_passages=0, passage_length=0, student_document="imagined"))
    with pytest.raises(ConfigError, match="'data.qa.imagined_file'"):
        run_defaults.validate(c)


@pytest.mark.parametrize("size", ["base", "large", "xl"])
def test_iag_nq_config_is_the_papers_setting(size):
    c = load_config(os.path.join(REPO, "configs", f"iag_nq.py:{size}"))
    assert (c.data.benchmark, c.loss.kl_teacher, float(c.loss.lambda_ins)) == ("qa", "concat", 0.0)
    assert (c.tagi.instruction_source, c.tagi.train_backbone) == ("instance", "ffn_norms_embeddings")
    assert "teachers" not in c.pipeline.stages
    assert c.data.qa.num_passages * c.data.qa.passage_length <= c.data.lengths.full_inputs
    with pytest.raises(ConfigError, match="data.vocabulary"):  # the user's checkpoint and files are required
        run_defaults.validate(c)


def test_iag_demo_students_differ_only_in_what_they_read_and_their_budget():
    """`configs/iag_demo.py:imagined` is the closed-book config with the imagined document and 1,200 student steps
    (warm-up 100, not 30);
    the reader's passages fit its encoder input; any other argument is refused naming the choices."""
    closed = load_config(os.path.join(REPO, "configs", "iag_demo.py"))
    imagined = load_config(os.path.join(REPO, "configs", "iag_demo.py:imagined"))
    assert (closed.data.qa.student_document, imagined.data.qa.student_document) == ("none", "imagined")
    assert (closed.stages.finetune.train.steps, imagined.stages.finetune.train.steps) == (300, 1200)
    assert (closed.stages.finetune.optimizer.warmup_steps, imagined.stages.finetune.optimizer.warmup_steps) == (30, 100)
    imagined.data.qa.student_document, imagined.stages.finetune.train.steps = "none", 300
    imagined.stages.finetune.optimizer.warmup_steps = 30
    assert imagined.to_dict() == closed.to_dict()
    assert closed.data.qa.num_passages * closed.data.qa.passage_length <= closed.data.lengths.full_inputs
    run_defaults.validate(closed)
    with pytest.raises(ConfigError, match="closed_book, imagined"):
        load_config(os.path.join(REPO, "configs", "iag_demo.py:retrieved"))
