"""The training pipeline: config validation (fast, before any work) and tiny end-to-end runs of every stage, on
the synthetic suite and on P3 (rank classification on the real held-out sets)."""
import functools
import json
import os
import re
import string
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from flax import traverse_util

from tagi_jax.eval import report
from tagi_jax import vocab as V
from tagi_jax.run import defaults as run_defaults
from tagi_jax.run import pipeline
from tagi_jax.run import stage_init
from tagi_jax.run import stages
from tagi_jax.run import workdir as run_workdir
from tagi_jax.trainer import checkpoints
from tasks.p3 import datasets as p3_datasets
from tagi_jax.config import ConfigError, load_config
from tagi_jax.jsonl import iter_jsonl
from tasks.p3.datasets import MTEST11
from tagi_jax.models.t5 import is_encoder_fusion_param

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "configs", "demo.py")
P3_T0 = os.path.join(REPO, "configs", "p3_t0.py")


def tiny_config(steps: int = 2):
    c = load_config(DEMO)
    c.model.update(dict(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16))
    c.hypernet.update(dict(rank=2, lora_alpha=4.0, hidden_dim=16, embed_dim=8))
    c.tagi.update(dict(teacher_rank=2, teacher_alpha=4.0))
    c.data.synthetic.update(dict(num_train_tasks=6, num_unseen_tasks=3, train_instances_per_task=8,
                                 eval_instances_per_task=2))
    c.pipeline.stages = stages.STAGES  # every stage, each from its default predecessor
    for stage in stages.STAGES:
        s = c.stages[stage]
        s.init_from = stages.DEFAULT_INIT_FROM[stage]
        s.train.update(dict(steps=steps, batch_size=4, log_every=1, progress_bar=False))
        s.optimizer.update(dict(warmup_steps=0, schedule="constant"))
    c.eval.update(dict(batch_size=8, max_decode_len=8, max_examples_per_task=2))
    c.mesh.update(dict(data=4, model=2))  # the sharded path, on the 8 fake devices of tests/conftest.py
    return c


@pytest.mark.parametrize(
    "override, key",
    [
        (("pipeline.stages", ("backbone", "typo")), "pipeline.stages"),
        (("pipeline.evaluate", ("tagi", "nope")), "pipeline.evaluate"),
        (("loss.kl_teacher", "teacher_bot"), "loss.kl_teacher"),
        (("loss.alignment", "cosine"), "loss.alignment"),
        (("loss.lambda_ins", "often"), "loss.lambda_ins"),
        (("stages.hint.init_from", "pretrained"), "stages.hint.init_from"),
        (("model.checkpoint", "/no/such/t5"), "model.checkpoint"),
        (("stages.finetune.train.num_microbatches", 3), "stages.finetune.train"),
        (("tagi.teachers_per", "dataset"), "tagi.teachers_per"),
        (("tagi.fusion", "decoder_concat"), "tagi.fusion"),
    ],
)
def test_bad_config_fails_fast_naming_the_key(override, key):
    c = tiny_config()
    path, value = override
    node = c
    *parents, leaf = path.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        run_defaults.validate(c)


def test_unknown_override_is_rejected_by_name():
    with pytest.raises(ConfigError, match="stages.finetune.train.stepz"):
        load_config(DEMO, ["stages.finetune.train.stepz=3"])


def test_launch_rejects_unknown_key_before_any_work(tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={DEMO}",
         f"--workdir={tmp_path / 'w'}", "--config.loss.lambda_kll=3"],
        capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: unknown config key 'loss.lambda_kll' (known there: alignment, alignment_reduction, kl_teacher, "
        "label_smoothing, lambda_ins, lambda_kl, temperature, z_loss)")
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "w").exists()


def test_demo_config_is_valid():
    run_defaults.validate(load_config(DEMO))


def test_encoder_fusion_config_is_valid():
    c = load_config(DEMO, ["tagi.fusion=encoder_cross_attention"])
    run_defaults.validate(c)
    assert run_defaults.tagi_config(c, num_teachers=1).fusion == "encoder_cross_attention"


def _fusion_paths(tree) -> list:
    return [p for p in traverse_util.flatten_dict(tree) if is_encoder_fusion_param(p)]


def test_encoder_fusion_blocks_live_and_train_only_in_student_stages():
    """Stages that run the student hold (and train) the encoder-fusion blocks; the backbone, the baselines,
    the teachers and the finetune teacher have none. Freezing "t5" never freezes them, and vice versa."""
    from tagi_jax.trainer import optim

    cfg = run_defaults.tagi_config(load_config(DEMO, ["tagi.fusion=encoder_cross_attention"]), num_teachers=2)
    for stage in stages.STAGES:
        tree = jax.eval_shape(lambda r: nn.meta.unbox(stages.stage_init_fn(stage, cfg)(r)), jax.random.key(0))
        student = tree["student"] if stage == "finetune" else tree
        assert bool(_fusion_paths(student)) == (stage in stages.FUSION_STAGES), stage
        if stage == "finetune":
            assert not _fusion_paths(tree["teacher"])
        labels = traverse_util.flatten_dict(optim.parameter_labels(tree, stages.frozen_patterns(stage)))
        for path, label in labels.items():
            sub = path[1:] if stage == "finetune" else path
            if path[0] == "teacher":
                assert label == "frozen", path
            elif is_encoder_fusion_param(sub):
                assert label != "frozen", (stage, path)  # only present where it is trained
            elif sub[0] == "t5":  # the default policy (train_backbone="all"): every stage but stage 0 trains it
                assert (label != "frozen") == (stage != "teachers"), (stage, path)
    t5_re, fusion_re = (re.compile(stages.SUBTREE_PATTERNS[k]) for k in ("t5", "fusion"))
    fusion_path = "t5/encoder/layers_3/instruction_attention/out/kernel"
    assert fusion_re.match(fusion_path) and not t5_re.match(fusion_path)
    assert t5_re.match("t5/encoder/layers_3/attention/out/kernel") and not fusion_re.match("t5/encoder/encoder_norm/scale")


def test_hf_import_into_an_encoder_fusion_model_keeps_the_backbone_function(tmp_path):
    """The imported backbone lacks the fusion blocks: they keep their zero-output initialisation, so the
    student computes what it computes without fusion; any other missing parameter is an error."""
    from tagi_jax import features as F
    from tagi_jax import hf
    from tagi_jax.models import tagi
    from tagi_jax.models.t5 import init_params as t5_init
    from tagi_jax.models.t5_config import tiny_config as tiny_t5

    t5_cfg = tiny_t5()
    hf.save_t5_hf(str(tmp_path / "hf"), t5_cfg, t5_init(t5_cfg, jax.random.key(1)))
    _, host = hf.load_t5(str(tmp_path / "hf"))
    cfg = tagi.TAGIConfig(t5=t5_cfg, fusion="encoder_cross_attention")
    fresh = nn.meta.unbox(jax.jit(lambda r: tagi.init_params(cfg, r))(jax.random.key(0)))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), fresh)
    t5 = stage_init.overlay_host(fresh["t5"], host, abstract["t5"], "the checkpoint", "pretrain")
    flat, imported = traverse_util.flatten_dict(t5), traverse_util.flatten_dict(host)
    assert set(flat) == set(imported) | set(_fusion_paths(fresh["t5"]))
    for path, value in imported.items():
        np.testing.assert_array_equal(flat[path], value)
    params = dict(fresh, t5=t5)
    rng = np.random.default_rng(0)
    tokens = lambda: rng.integers(3, t5_cfg.vocab_size, size=(2, 6)).astype(np.int32)
    batch = {F.ENCODER_INPUT_TOKENS: tokens(), F.HYPER_ENCODER_INPUT_TOKENS: tokens(), F.DECODER_INPUT_TOKENS: tokens()}
    logits = {fusion: jax.jit(functools.partial(tagi.student_logits, tagi.TAGI(cfg.replace(fusion=fusion))))(
        params, batch) for fusion in ("encoder_cross_attention", "none")}
    np.testing.assert_array_equal(logits["encoder_cross_attention"], logits["none"])
    del host["encoder"]["layers_0"]["mlp"]
    with pytest.raises(ConfigError, match="no parameter 'encoder/layers_0/mlp/"):
        stage_init.overlay_host(fresh["t5"], host, abstract["t5"], "the checkpoint", "pretrain")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline"))
    result = pipeline.run(tiny_config(), workdir)
    return workdir, result


def test_every_stage_trains_and_summary_is_written(tiny_run):
    workdir, result = tiny_run
    assert [r["stage"] for r in result["stages"]] == list(stages.STAGES)
    assert all(r["step"] == 2 for r in result["stages"])
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == set(stages.METHODS)
    # Every figure is the example mean of its predictions file, scored here with rouge-score directly (SNI's
    # official ROUGE-L, max over references) and by plain string comparison for exact match.
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    squash = lambda t: " ".join("".join(ch for ch in t.lower() if ch not in string.punctuation).split())  # noqa: E731
    for method in stages.METHODS:
        for split in ("unseen", "seen"):
            path = os.path.join(workdir, "eval", f"{method}_{split}_predictions.jsonl")
            rows = [json.loads(line) for line in open(path)]
            assert rows, path
            rouge = 100 * np.mean([max(scorer.score(r, row["prediction"])["rougeL"].fmeasure
                                       for r in row["references"]) for row in rows])
            em = 100 * np.mean([max(float(squash(r) == squash(row["prediction"])) for r in row["references"])
                                for row in rows])
            assert summary[method][split]["rougeL"] == pytest.approx(rouge, abs=1e-3), (method, split)
            assert summary[method][split]["exact_match"] == pytest.approx(em, abs=1e-3), (method, split)
    for stage in stages.STAGES:
        log = os.path.join(workdir, stage, "metrics.jsonl")
        rows = [json.loads(line) for line in open(log)]
        assert rows and np.isfinite(rows[-1]["loss"])
    finetune = [json.loads(line) for line in open(os.path.join(workdir, "finetune", "metrics.jsonl"))][-1]
    for term in ("cross_entropy", "kl", "l_ins", "lambda_ins", "adapter_sq_norm", "hypernet_grad_norm/ce",
                 "hypernet_grad_norm/kl", "hypernet_grad_norm/l_ins"):
        assert term in finetune, term
    assert finetune["kl"] > 0.0  # the KL term is live (the original code's was silently zero)


def _saved(workdir, ctx, stage):
    from tagi_jax import partitioning

    abstract, _ = partitioning.abstract_with_shardings(stages.stage_init_fn(stage, ctx.model_cfg), ctx.mesh,
                                                       ctx.rules, jax.random.key(0))
    return abstract, traverse_util.flatten_dict(checkpoints.load_params(os.path.join(workdir, stage), abstract))


def _assert_same(start: dict, source: dict, what: str):
    assert set(start) == set(source), (what, sorted(set(start) ^ set(source))[:3])
    for path, value in source.items():
        np.testing.assert_array_equal(np.asarray(start[path]), np.asarray(value), err_msg=f"{what}: {path}")


def test_stages_hand_their_parameters_on(tiny_run):
    """finetune starts as pretrain's trained student, every parameter bit-identical, with a frozen teacher made
    of the teachers stage's backbone and table; then it trains the student (and only the student)."""
    workdir, _ = tiny_run
    ctx = pipeline.prepare(tiny_config(), workdir)
    abstract, finetune = _saved(workdir, ctx, "finetune")
    start = stage_init.build_initial_params("finetune", ctx, type("T", (), {"abstract_params": abstract}))()
    start = traverse_util.flatten_dict(start)
    _, pretrain = _saved(workdir, ctx, "pretrain")
    _, teachers = _saved(workdir, ctx, "teachers")
    _assert_same({p[1:]: v for p, v in start.items() if p[0] == "student"}, pretrain, "student <- pretrain")
    _assert_same({p[1:]: v for p, v in start.items() if p[0] == "teacher"}, teachers, "teacher <- teachers")
    # pretrain itself started from the backbone stage and trained its hypernetwork: the sources differ.
    _, backbone = _saved(workdir, ctx, "backbone")
    assert any(not np.array_equal(pretrain[p], backbone[p]) for p in backbone if p[0] == "hypernet")
    moved = [p for p, v in finetune.items() if not np.array_equal(v, start[p])]
    assert any(p[:2] == ("student", "hypernet") for p in moved) and not any(p[0] == "teacher" for p in moved)


@pytest.fixture(scope="module")
def fusion_run(tmp_path_factory):
    """Encoder fusion: concat (no fusion blocks) -> pretrain (adds and trains them) -> hint, evaluated."""
    c = tiny_config()
    c.tagi.fusion = "encoder_cross_attention"
    c.pipeline.stages = ("concat", "pretrain", "hint")
    c.pipeline.evaluate = ("hint",)
    c.stages.concat.init_from = ""  # fresh
    c.stages.pretrain.init_from = "concat"  # as the demo: the TAGI stages start from the concat baseline
    workdir = str(tmp_path_factory.mktemp("fusion_pipeline"))
    return workdir, c, pipeline.run(c, workdir)


def test_encoder_fusion_pipeline_adds_trains_and_hands_on_the_fusion_blocks(fusion_run):
    from tagi_jax import partitioning

    workdir, c, result = fusion_run
    assert [r["step"] for r in result["stages"]] == [2, 2, 2] and set(result["summary"]) == {"hint"}
    assert not _fusion_paths_of(checkpoints.saved_param_paths(os.path.join(workdir, "concat")))
    # pretrain starts from concat: its backbone exactly, plus fresh zero-output fusion blocks.
    ctx = pipeline.prepare(c, workdir)
    abstract, _ = partitioning.abstract_with_shardings(stages.stage_init_fn("pretrain", ctx.model_cfg), ctx.mesh,
                                                       ctx.rules, jax.random.key(0))
    start = stage_init.build_initial_params("pretrain", ctx, type("T", (), {"abstract_params": abstract}))()
    _, _, concat = run_workdir.load_trained(workdir, "concat")
    flat_start, flat_concat = traverse_util.flatten_dict(start["t5"]), traverse_util.flatten_dict(concat["t5"])
    fusion = _fusion_paths(start["t5"])
    assert fusion and set(flat_start) == set(flat_concat) | set(fusion)
    for path, value in flat_concat.items():
        np.testing.assert_array_equal(flat_start[path], value)
    outs = [p for p in fusion if p[-2:] == ("out", "kernel")]
    assert outs and not any(np.any(np.asarray(flat_start[p])) for p in outs)
    # Trained in pretrain (the output projections left zero), then carried into hint.
    pretrained = traverse_util.flatten_dict(checkpoints.load_params(os.path.join(workdir, "pretrain"), abstract)["t5"])
    assert all(np.any(np.asarray(pretrained[p])) for p in outs)
    _, _, hint = run_workdir.load_trained(workdir, "hint")
    assert set(_fusion_paths(hint["t5"])) == set(fusion)


def _fusion_paths_of(paths) -> list:
    return [p for p in paths if is_encoder_fusion_param(p)]

def test_rerun_resumes_without_training_again(tiny_run):
    workdir, _ = tiny_run
    ctx = pipeline.prepare(tiny_config(), workdir)
    record = pipeline.run_stage(ctx, "concat")
    assert record["resumed_from"] == 2 and record["step"] == 2


def test_load_trained_errors(tmp_path, tiny_run):
    workdir, _ = tiny_run
    with pytest.raises(ValueError, match="unknown method"):
        run_workdir.load_trained(workdir, "tk_instruct")
    with pytest.raises(FileNotFoundError, match="config.json"):
        run_workdir.load_trained(str(tmp_path), "tagi")


# ------------------------------------------------------------------------------------------------ P3
# Training datasets (promptsource path -> the shared held-out file standing in for its training split) and the
# held-out sets evaluated: disjoint, so the summary's "unseen" is still unseen.
P3_TRAIN = {"super_glue/rte": "rte", "super_glue/wic": "wic"}
P3_EVAL = ("cb", "copa")


@pytest.fixture(scope="module")
def p3_dirs(shared_data, tmp_path_factory):
    """Directories for a P3 run: no T0 training data is shared, so `train/<path>/train.jsonl` holds rows of
    two shared held-out validation files, converted to the Hugging Face fields `register_p3_train` expects;
    `corpus/` is pretraining text made of RTE premises."""
    from tasks.p3 import datasets as p3

    root = tmp_path_factory.mktemp("p3_data")
    premises = []
    for path, name in P3_TRAIN.items():
        spec = p3.P3_EVAL_DATASETS[name]
        source = shared_data / "p3_eval" / name / "validation.jsonl"
        rows = [spec.from_raw(raw) for _, raw in iter_jsonl(str(source))]
        out = root / "train" / path / "train.jsonl"
        out.parent.mkdir(parents=True)
        out.write_text("".join(json.dumps(r) + "\n" for r in rows[:32]))
        premises += [r["premise"] for r in rows[:32] if "premise" in r]
    (root / "corpus").mkdir()
    (root / "corpus" / "premises.txt").write_text("\n\n".join(premises) + "\n")
    return {"templates_dir": str(shared_data / "promptsource_templates"), "train_data_dir": str(root / "train"),
            "eval_data_dir": str(shared_data / "p3_eval"), "corpus": str(root / "corpus")}


def tiny_p3_config(dirs, steps: int = 2):
    c = tiny_config(steps)
    c.data.benchmark = "p3"
    c.data.vocabulary = "byte"
    c.data.lengths.update(dict(inputs=64, hyper_inputs=64, full_inputs=96, targets=16))
    c.data.pretrain.source = dirs["corpus"]
    c.data.p3.update(dict(templates_dir=dirs["templates_dir"], train_data_dir=dirs["train_data_dir"],
                          eval_data_dir=dirs["eval_data_dir"], train_datasets=tuple(P3_TRAIN),
                          eval_datasets=P3_EVAL))
    c.tagi.teachers_per = "category"  # one teacher per dataset
    return c


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train_datasets", ("super_glue/rte", "super_glue/rtee"),
         r"'data\.p3\.train_datasets': unknown dataset\(s\) super_glue/rtee: no promptsource templates"),
        ("train_datasets", ("super_glue/rte", "super_glue/cb"),
         r"'data\.p3\.train_data_dir': no .*/<dataset>/train\.jsonl for super_glue/cb"),
        ("train_datasets", (), r"'data\.p3\.train_datasets' is empty"),
        ("train_datasets", ("super_glue/rte",) * 2, r"'data\.p3\.train_datasets' lists \['super_glue/rte'\] more"),
        ("eval_datasets", ("cb", "mnli"), r"'data\.p3\.eval_datasets': unknown dataset\(s\) mnli; known: rte, cb"),
        ("eval_datasets", ("hellaswag",), r"'data\.p3\.eval_data_dir': none of hellaswag has .*validation\.jsonl"),
        ("train_data_dir", "/no/such/p3_train", r"'data\.p3\.train_data_dir': path does not exist"),
        ("templates_dir", "", r"'data\.p3\.templates_dir' is required"),
        ("eval_data_dir", "/no/such/p3_eval", r"'data\.p3\.eval_data_dir': path does not exist"),
        ("mixing_cap", -1, r"'data\.p3\.mixing_cap' must be >= 0"),
    ],
)
def test_bad_p3_config_fails_fast_in_one_line_naming_the_key(p3_dirs, key, value, message):
    c = tiny_p3_config(p3_dirs)
    c.data.p3[key] = value
    with pytest.raises(ConfigError, match=message) as e:
        run_defaults.validate(c)
    assert "\n" not in str(e.value)


def _dummy_p3_paths(root) -> list[str]:
    """Overrides that make configs/p3_t0.py valid: empty stand-ins for every file it names (the vocabulary is
    checked to be a SentencePiece model, so a small real one)."""
    for name in p3_datasets.T0_TRAIN_DATASETS:
        for sub, file in (("templates", "templates.yaml"), ("train", "train.jsonl")):
            (root / sub / name).mkdir(parents=True)
            (root / sub / name / file).touch()
    (root / "eval" / "rte").mkdir(parents=True)
    (root / "eval" / "rte" / "validation.jsonl").touch()
    (root / "ckpt").mkdir()
    V.train_sentencepiece([f"word{i} and more text {i % 7}" for i in range(200)], str(root / "spiece.model"), 300)
    return [f"model.checkpoint={root / 'ckpt'}", f"data.vocabulary={root / 'spiece.model'}",
            f"data.p3.templates_dir={root / 'templates'}", f"data.p3.train_data_dir={root / 'train'}",
            f"data.p3.eval_data_dir={root / 'eval'}"]


@pytest.mark.parametrize("size", ["base", "xl", "xxl"])
def test_p3_t0_config_is_valid_for_every_size(size, tmp_path):
    c = load_config(f"{P3_T0}:{size}", _dummy_p3_paths(tmp_path))
    run_defaults.validate(c)
    # The published values the docstring attributes to T0 and the TAGI paper.
    assert c.data.benchmark == "p3" and tuple(c.data.p3.eval_datasets) == MTEST11
    assert tuple(c.data.p3.train_datasets) == p3_datasets.T0_TRAIN_DATASETS and len(p3_datasets.T0_TRAIN_DATASETS) == 38
    assert c.data.p3.mixing_cap == 500_000 and not c.data.p3.train_original_task_only
    assert (c.data.lengths.full_inputs, c.data.lengths.targets) == (1024, 256)
    for stage in ("concat", "no_instruction", "finetune", "hint"):
        s = c.stages[stage]
        assert (s.optimizer.name, s.optimizer.learning_rate, s.optimizer.schedule) == ("adafactor", 1e-3, "constant")
        assert (s.train.batch_size, s.train.steps) == (1024, 12_200)
    with pytest.raises(ValueError, match="size 'small' is not one of"):
        load_config(f"{P3_T0}:small")


def test_p3_t0_config_requires_the_users_paths():
    with pytest.raises(ConfigError, match=r"config key 'data\.vocabulary' is required"):
        run_defaults.validate(load_config(P3_T0))


@pytest.fixture(scope="module")
def tiny_p3_run(p3_dirs, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pipeline_p3"))
    with pytest.warns(UserWarning, match="truncated"):  # byte-level toy lengths cut the longer prompts
        result = pipeline.run(tiny_p3_config(p3_dirs), workdir)
    return workdir, result


def test_p3_pipeline_trains_every_stage_and_reports_accuracy(tiny_p3_run, p3_dirs):
    """Plumbing only (a tiny model, 2 steps a stage, two held-out validation files standing in for T0's training
    data): every stage trains on the P3 training mixture and every method gets rank-classification accuracy
    on the held-out sets in summary.json."""
    from tasks.p3 import templates as p3

    workdir, result = tiny_p3_run
    assert [r["stage"] for r in result["stages"]] == list(stages.STAGES)
    assert all(r["step"] == 2 for r in result["stages"])
    with open(os.path.join(workdir, "tasks.json")) as f:
        tasks = json.load(f)
    templates = {path: len(p3.load_templates(p3_dirs["templates_dir"], path).templates) for path in P3_TRAIN}
    assert len(tasks["train_task_names"]) == sum(templates.values())  # every template of each dataset
    assert tasks["teacher_keys"] == sorted(P3_TRAIN)  # teachers_per="category": one per dataset
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    assert set(summary) == set(stages.METHODS)
    for method in stages.METHODS:
        m = summary[method]["unseen"]
        assert 0.0 <= m["accuracy"] <= 100.0
        assert set(m["per_dataset"]) == set(P3_EVAL)
        assert m["mtest11_average"] == pytest.approx(np.mean([m["per_dataset"][d] for d in P3_EVAL]))
        assert set(m["mtest11_missing"]) == set(MTEST11) - set(P3_EVAL)
        with open(os.path.join(workdir, "eval", f"{method}_unseen_predictions.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert all((r["prediction"] == r["references"][0]) == (r["choice"] == r["label"]) for r in records)
        assert {r["task_name"].split("_")[1] for r in records} == set(P3_EVAL)
    table = report.format_summary(summary)
    assert "unseen acc" in table and "MTest11" in table and "copa" in table and "ROUGE-L" not in table
