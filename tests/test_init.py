"""`launch/init.py`: driven with piped answers and with flags only, the config it writes loads with the repo's
loader, validates and holds the answers; a wrong answer is asked again (interactive) or is one `error: --flag`
line with exit status 2 and nothing written (flags only); an existing work directory is shown and resumed; and the
proposals (lengths covering ~95%, the memory plan) follow from the data and the memory given."""
import importlib.util
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from tagi_jax import hf, init_plan, init_probe, init_wizard
from tagi_jax.config import load_config
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run import defaults
from tiny_hf import tiny_hf_t5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT = os.path.join(REPO, "launch", "init.py")
N_TASKS = 6


def _launcher():
    spec = importlib.util.spec_from_file_location("launch_init", INIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    """A tiny HF T5 (vocabulary 300) with a 300-piece SentencePiece model beside it, as a real checkpoint has."""
    src, _ = tiny_hf_t5(tmp_path_factory, "v1_1")
    d = str(tmp_path_factory.mktemp("backbone"))
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), d)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(init_probe.synthetic_vocabulary_text("def")), model_writer=buf, vocab_size=300,
        model_type="bpe", character_coverage=1.0, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        minloglevel=2)
    with open(os.path.join(d, "spiece.model"), "wb") as f:
        f.write(buf.getvalue())
    return d


@pytest.fixture
def my_tasks(shared_data, tmp_path):
    """The user's own tasks: SNI-format JSON files in one folder (no splits)."""
    d = tmp_path / "my_tasks"
    d.mkdir()
    for path in sorted((shared_data / "sni_sample" / "tasks").glob("*.json"))[:N_TASKS]:
        shutil.copy(path, d)
    return d


def _init(args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, INIT, *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


def _config(workdir):
    config = load_config(os.path.join(workdir, "config.py"))
    defaults.validate(config)
    return config


def test_flags_only_own_tasks_on_a_checkpoint(tmp_path, backbone, my_tasks):
    w = tmp_path / "run"
    names = sorted(p.stem for p in my_tasks.glob("*.json"))
    out = _init(["--yes", f"--workdir={w}", f"--backbone={backbone}", "--benchmark=tasks", f"--tasks_dir={my_tasks}",
                 f"--test_tasks={names[1]},{names[3]}", "--setting=def", "--methods=tagi,concat",
                 "--pretrain_source=tasks", "--len_inputs=64", "--len_hyper_inputs=200", "--len_full_inputs=256",
                 "--len_targets=32", "--batch_size=16", "--num_microbatches=2", "--mesh_model=2", "--remat=full"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "T5 v1.1 / LM-adapt" in out.stdout and "vocabulary 300" in out.stdout  # the importer's description
    c = _config(w)
    assert c.model.checkpoint == backbone and c.data.vocabulary == os.path.join(backbone, "spiece.model")
    assert c.data.benchmark == "sni" and c.data.setting == "def"
    assert c.data.sni.dir == str(w / "data" / "sni")
    assert c.data.lengths.to_dict() == dict(inputs=64, hyper_inputs=200, full_inputs=256, targets=32)
    assert tuple(c.pipeline.evaluate) == ("tagi", "concat")
    assert tuple(c.pipeline.stages) == ("teachers", "pretrain", "finetune", "concat")
    for stage in c.pipeline.stages:
        assert (c.stages[stage].train.batch_size, c.stages[stage].train.num_microbatches) == (16, 2)
    assert (c.mesh.data, c.mesh.model, c.model.remat_policy) == (-1, 2, "full")
    split = w / "data" / "sni" / "splits" / "default"
    assert (split / "test_tasks.txt").read_text().split() == [names[1], names[3]]
    assert sorted((split / "train_tasks.txt").read_text().split()) == sorted(set(names) - {names[1], names[3]})
    assert c.data.pretrain.source == str(w / "data" / "pretrain_corpus")
    corpus = (w / "data" / "pretrain_corpus" / "corpus.jsonl").read_text()
    assert corpus and all(name not in corpus for name in (names[1], names[3]))
    run_sh = (w / "run.sh").read_text()
    assert f"launch/train.py --config={w / 'config.py'} --workdir={w}" in run_sh and os.access(w / "run.sh", os.X_OK)
    assert out.stdout.count("==> ") == 2 and "c = base_config('base')" in out.stdout  # both files printed
    # Steps sized from the instances of the training tasks (3 epochs, as configs/sni_t5_lm.py).
    assert c.stages.finetune.train.steps == 3 * c.stages.teachers.train.steps


def test_piped_answers_from_scratch_with_wrong_answers_asked_again(tmp_path):
    w = tmp_path / "demo"
    answers = [str(w), "/no/such/checkpoint", "none", "", "def_pos2", "tagi,nope", "tagi,concat",
               "", "", "abc", "",  # lengths: inputs, hyper_inputs proposed; full_inputs wrong, then proposed
               "40", "",  # targets typed; mesh model proposed
               "-4", "16", "3", "2", "",  # batch wrong then 16, microbatches 3 (uneven) then 2, remat proposed
               "n", "n"]  # no compile check, no start
    out = _init([], stdin="\n".join(answers) + "\n")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert out.stdout.count("; try again") == 5, out.stdout
    assert "/no/such/checkpoint: not a directory" in out.stdout
    assert "'nope' is not one of" in out.stdout and "expected a whole number, got 'abc'" in out.stdout
    assert "3 microbatches of a batch of 16" in out.stdout
    c = _config(w)
    assert c.data.benchmark == "synthetic" and c.data.setting == "def_pos2" and c.model.checkpoint == ""
    assert tuple(c.pipeline.evaluate) == ("tagi", "concat")
    assert tuple(c.pipeline.stages) == ("concat", "teachers", "pretrain", "finetune")  # concat: the backbone
    assert c.data.lengths.targets == 40
    for f in ("inputs", "hyper_inputs", "full_inputs"):  # the proposals, printed before each question
        assert f"len_{f} [{c.data.lengths[f]}]: " in out.stdout
    assert all(c.stages[s].train.batch_size == 16 and c.stages[s].train.num_microbatches == 2
               for s in c.pipeline.stages)
    assert "to start: bash" in out.stdout


@pytest.mark.parametrize("args, flag", [
    (["--backbone=/no/such/ckpt"], "--backbone=/no/such/ckpt"),
    (["--backbone=none", "--benchmark=sni"], "--benchmark=sni"),
    (["--backbone=none", "--len_inputs=ten"], "--len_inputs=ten"),
    (["--backbone=none", "--batch_size=0"], "--batch_size=0"),
    (["--backbone=none", "--methods=tagi,hints"], "--methods=tagi,hints"),
    (["--backbone=none", "--num_microbatches=5"], "--num_microbatches=5"),
])
def test_flag_mode_bad_answer_is_one_error_line_and_nothing_written(tmp_path, capsys, args, flag):
    w = tmp_path / "run"
    status = _launcher().main(["init.py", "--yes", f"--workdir={w}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert err[-1].startswith(f"error: {flag}: ") and "Traceback" not in "\n".join(err)
    assert not w.exists()


def test_flag_mode_needs_a_workdir(capsys):
    assert _launcher().main(["init.py", "--yes"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --workdir is required")


def test_a_bad_task_file_is_named(tmp_path, capsys, backbone, my_tasks):
    bad = my_tasks / "task999_broken.json"
    bad.write_text('{"Definition": ["x"], "Instances": []}')
    status = _launcher().main(["init.py", "--yes", f"--workdir={tmp_path / 'w'}", f"--backbone={backbone}",
                               "--benchmark=tasks", f"--tasks_dir={my_tasks}"])
    assert status == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: --tasks_dir={my_tasks}: {bad}: field 'Instances'"), line
    assert not (tmp_path / "w").exists()


def test_compile_check_prints_the_compilers_figures(tmp_path):
    w = tmp_path / "demo"
    out = _init(["--yes", f"--workdir={w}", "--methods=concat", "--compile_check"])
    assert out.returncode == 0, out.stderr[-2000:]
    table = out.stdout.split("compiling every stage for these devices", 1)[1].splitlines()
    assert table[1].split()[:3] == ["stage", "program", "params"]
    assert table[2].split()[:2] == ["concat", "train"] and table[2].split()[8] == "yes"  # fits
    assert _config(w).pipeline.stages == ("concat",)


def test_rerun_shows_the_config_and_resumes(tmp_path):
    w = tmp_path / "demo"
    assert _init(["--yes", f"--workdir={w}", "--methods=concat"]).returncode == 0
    written = (w / "config.py").read_text()
    out = _init(["--yes", f"--workdir={w}", "--methods=tagi"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "was set up by init; its config:" in out.stdout and written in out.stdout
    assert "note: --methods not applied" in out.stdout and f"to resume: bash {w / 'run.sh'}" in out.stdout
    assert (w / "config.py").read_text() == written  # nothing overwritten
    # --start runs DIR/run.sh (whatever it holds now) in place of init, with its exit status.
    (w / "run.sh").write_text(f"#!/usr/bin/env bash\necho resumed > {w / 'marker'}\nexit 7\n")
    out = _init(["--yes", f"--workdir={w}", "--start"])
    assert out.returncode == 7 and (w / "marker").read_text() == "resumed\n"
    # Interactively, resuming is offered (and declined here).
    out = _init([], stdin=f"{w}\nn\n")
    assert out.returncode == 0 and "resume training" in out.stdout and not out.stdout.count("error")


def test_sni_checkout_without_pretraining(tmp_path, backbone, shared_data):
    w = tmp_path / "sni"
    out = _init(["--yes", f"--workdir={w}", f"--backbone={backbone}", "--benchmark=sni",
                 f"--sni_dir={shared_data / 'sni_sample'}", "--methods=tagi,hint", "--pretrain_source=none"])
    assert out.returncode == 0, out.stderr[-3000:]
    c = _config(w)
    assert c.data.sni.dir == str(shared_data / "sni_sample") and c.data.setting == "def_pos2"
    assert tuple(c.pipeline.stages) == ("teachers", "finetune", "hint")  # no pretrain stage
    assert c.stages.finetune.init_from == "" and c.stages.hint.init_from == ""  # from the checkpoint


def test_p3_with_the_training_datasets_found(tmp_path, backbone, shared_data):
    train = tmp_path / "p3_train"
    (train / "imdb").mkdir(parents=True)
    (train / "imdb" / "train.jsonl").write_text('{"text": "a fine film", "label": 1}\n')
    w = tmp_path / "p3"
    out = _init(["--yes", f"--workdir={w}", f"--backbone={backbone}", "--benchmark=p3",
                 f"--p3_templates_dir={shared_data / 'promptsource_templates'}", f"--p3_train_data_dir={train}",
                 f"--p3_eval_data_dir={shared_data / 'p3_eval'}", "--methods=concat"])
    assert out.returncode == 0, out.stderr[-3000:]
    c = _config(w)
    assert c.data.benchmark == "p3" and tuple(c.data.p3.train_datasets) == ("imdb",)
    assert tuple(c.pipeline.stages) == ("concat",) and c.stages.concat.optimizer.name == "adafactor"


def test_proposed_lengths_cover_95_percent():
    lengths = np.arange(1, 101)  # 1..100 tokens
    # The value at the 95% quantile (numpy's "higher": 96) is already a multiple of 8.
    assert init_probe.propose_length(lengths) == 96
    assert init_probe.propose_length(lengths, coverage=0.5) == 56  # 51, rounded up to a multiple of 8
    assert init_probe.truncation_note(lengths, 96) == ("4 of 100 sampled examples (4.0%) truncated, the longest "
                                                       "from 100 tokens")
    assert init_probe.propose_length(np.asarray([3, 3, 3])) == 8
    text = init_probe.histogram(lengths, "inputs", bins=4)
    assert text.splitlines()[0] == "inputs: median 50, 95% 96, max 100 tokens (100 examples)"
    assert sum(int(ln.split()[-1]) for ln in text.splitlines()[1:]) == 100


def test_the_plan_follows_the_memory():
    c = load_config(os.path.join(REPO, "configs", "demo.py"))
    t5 = T5Config(**{k: v for k, v in c.model.to_dict().items() if k not in ("checkpoint", "backbone_weights")})
    stages = ("concat", "finetune")
    counts = init_plan.stage_param_counts(c, 360, None, stages)
    trained, frozen = counts["finetune"]
    assert trained > 0 and frozen > 0  # the finetune teacher and its table are frozen
    # concat trains the whole backbone; its tree's (unused) hypernetwork is frozen
    assert counts["concat"][0] == sum(int(np.prod(v)) for v in hf.param_shapes(t5).values())
    assert counts["concat"][1] > 0
    free = init_plan.propose(c, t5, counts, 8, None, 32)
    assert (free.batch_size, free.num_microbatches, free.mesh_model, free.remat, free.fits) == (32, 1, 1, "none", True)
    # One device: the fewest microbatches that fit, then remat, then a plan that says it does not fit.
    one, _ = init_plan.peak_bytes(c, t5, counts, 1, 1, False, 32, 1, "none")
    two, stage = init_plan.peak_bytes(c, t5, counts, 1, 1, False, 32, 2, "none")
    assert two < one and stage in stages
    tight = init_plan.propose(c, t5, counts, 1, int(two / init_plan.HEADROOM) + 1, 32)
    assert (tight.num_microbatches, tight.remat, tight.fits) == (2, "none", True)
    hopeless = init_plan.propose(c, t5, counts, 1, 1000, 32)
    assert not hopeless.fits and hopeless.remat == "full" and "does NOT fit" in hopeless.describe()
    # Eight devices whose memory the parameters would crowd: split over a model axis instead.
    state, _ = init_plan.peak_bytes(c, t5, counts, 8, 1, False, 32, 32, "full")
    sharded = init_plan.propose(c, t5, counts, 8, int(state / 0.6 / init_plan.HEADROOM) - 1, 32)
    assert sharded.mesh_model > 1


def test_every_question_is_a_flag():
    fv = init_wizard.flags.FlagValues()
    init_wizard.define_flags(fv)
    assert set(init_wizard.QUESTIONS) | {"yes", "start"} <= set(fv)
