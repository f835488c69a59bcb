"""Bad input, as a user gives it, to the three entry points: every case exits non-zero with exactly one `error:`
line naming the file/key/flag, no traceback, and an existing work directory left as it was. Plus the runs that
must end cleanly: success exits 0, a diverged run stops without saving, SIGTERM saves and resumes, a damaged
checkpoint is named, a data error inside tf.data ends the process instead of hanging it.

Most cases run the launchers' `main(argv)` in this process (each launcher has its own flag set); the exit
statuses of real processes are checked with subprocesses where the process itself is the point.
"""
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = textwrap.dedent(
    """
    from configs.demo import get_config as demo_config


    def get_config():
        c = demo_config()
        c.model.update(dict(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                            relative_attention_num_buckets=8, relative_attention_max_distance=16, vocab_size=512))
        c.hypernet.update(dict(rank=2, lora_alpha=4.0, hidden_dim=16, embed_dim=8))
        c.tagi.update(dict(teacher_rank=2, teacher_alpha=4.0))
        c.data.synthetic.update(dict(num_train_tasks=6, num_unseen_tasks=3, train_instances_per_task=8,
                                     eval_instances_per_task=2, vocab_size=512))
        c.pipeline.stages = ("concat",)
        c.pipeline.evaluate = ("concat",)
        for stage in c.stages:
            c.stages[stage].train.update(dict(steps=4, batch_size=8, log_every=2, checkpoint_every=2,
                                              keep_checkpoints=2, progress_bar=False))
            c.stages[stage].optimizer.update(dict(warmup_steps=0, schedule="constant"))
        c.eval.update(dict(batch_size=8, max_decode_len=8, max_examples_per_task=2))
        return c
    """)


def _load_launcher(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", os.path.join(REPO, "launch", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TRAIN, EVAL, GENERATE = (_load_launcher(n) for n in ("train", "eval", "generate_adapter"))


@pytest.fixture(autouse=True)
def _restore_logging():
    """The launchers set up logging (a file handler in the work directory): undo it after each test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers:
        if h not in handlers:
            root.removeHandler(h)
            h.close()
    root.setLevel(level)


def run_main(module, args, capsys):
    capsys.readouterr()
    code = module.main([f"{module.__name__}.py", *args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code, err, *fragments):
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code not in (0, None), (code, err[-2000:])
    assert len(errors) == 1, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def tree_digest(path: str) -> str:
    """A digest of every file (path, bytes) under `path` but the appended-to logs: 'nothing was written or lost'."""
    h = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not (root == path and d == "logs"))
        for name in sorted(files):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("configs") / "tiny.py"
    path.write_text(TINY)
    return str(path)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A tiny work directory trained by a real `launch/train.py` process: success exits 0 and says nothing on
    stderr but warnings (the libraries' INFO lines are in DIR/logs/train.log)."""
    workdir = str(tmp_path_factory.mktemp("runs") / "tiny")
    done = subprocess.run([sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={tiny}",
                           f"--workdir={workdir}"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "error:" not in done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("I1") or line.startswith("I0")
                and "cudart" not in line], done.stderr[-2000:]
    assert os.path.getsize(os.path.join(workdir, "logs", "train.log")) > 0
    assert json.load(open(os.path.join(workdir, "summary.json")))["concat"]["unseen"]["rougeL"] >= 0
    return workdir


def copy_of(workdir, tmp_path):
    dest = str(tmp_path / "copy")
    shutil.copytree(workdir, dest)
    return dest


# ------------------------------------------------------------------------------------------------ the train command
BAD_TRAIN_OVERRIDES = [
    ("--config.train.steps=3", "unknown config key 'train.steps'"),
    ("--config.model.d_model=abc", "'model.d_model' expects an int"),
    ("--config.mesh.fsdp=maybe", "'mesh.fsdp' expects a bool"),
    ("--config.model=3", "'model' is a section"),
    ("--config.pipeline.stages=('concat','typo')", "'pipeline.stages': unknown stage 'typo'"),
    ("--config.pipeline.evaluate=('tk',)", "'pipeline.evaluate': unknown method 'tk'"),
    ("--config.tagi.teachers_per=dataset", "'tagi.teachers_per'"),
    ("--config.tagi.fusion=decoder", "'tagi.fusion'"),
    ("--config.data.benchmark=glue", "'data.benchmark'"),
    ("--config.data.setting=bogus", "'data.setting'"),
    ("--config.data.setting=def_pos2_neg2", "'data.setting'"),
    ("--config.data.vocabulary=/no/such.model", "'data.vocabulary': path does not exist"),
    ("--config.data.synthetic.vocab_size=4096", "'data.synthetic.vocab_size' (4096) exceeds 'model.vocab_size'"),
    ("--config.data.lengths.inputs=1", "'data.lengths.inputs' must be >= 2"),
    ("--config.data.pretrain.lengths.targets=0", "'data.pretrain.lengths.targets' must be >= 2"),
    ("--config.data.synthetic.num_train_tasks=0", "'data.synthetic.num_train_tasks' must be >= 1"),
    ("--config.eval.batch_size=0", "'eval.batch_size' must be >= 1"),
    ("--config.eval.max_decode_len=0", "'eval.max_decode_len' must be >= 1"),
    ("--config.eval.beam_size=0", "'eval.beam_size' must be >= 1"),
    ("--config.eval.max_examples_per_task=0", "'eval.max_examples_per_task' must be >= 1"),
    ("--config.mesh.model=3", "'mesh.data'/'mesh.model'"),
    ("--config.loss.alignment=cosine", "'loss.alignment'"),
    ("--config.loss.alignment_reduction=max", "'loss.alignment_reduction'"),
    ("--config.loss.kl_teacher=gpt", "'loss.kl_teacher'"),
    ("--config.loss.lambda_ins=abc", "'loss.lambda_ins'"),
    ("--config.loss.temperature=0", "'loss.temperature' must be > 0"),
    ("--config.stages.concat.init_from=nowhere", "'stages.concat.init_from': unknown stage 'nowhere'"),
    ("--config.stages.concat.train.steps=0", "'stages.concat.train.steps' must be >= 1"),
    ("--config.stages.concat.train.num_microbatches=3", "'stages.concat.train.num_microbatches'=3 does not divide"),
    ("--config.stages.concat.optimizer.name=sgd", "'stages.concat.optimizer.name'"),
    ("--config.stages.concat.optimizer.schedule=step", "'stages.concat.optimizer.schedule'"),
    ("--config.stages.concat.optimizer.learning_rate=0", "'stages.concat.optimizer.learning_rate' must be > 0"),
    ("--config.stages.concat.optimizer.weight_decay=-1", "'stages.concat.optimizer.weight_decay' must be >= 0"),
    ("--config.stages.concat.optimizer.frozen=('(',)", "'stages.concat.optimizer.frozen[0]': bad regex"),
    ("--config.model.feed_forward_proj=swiglu", "model.feed_forward_proj"),
    ("--config.hypernet.rank=0", "hypernet.rank must be positive"),
    ("--config.hypernet.adapter_targets=('encoder_self.x',)", "unknown target 'encoder_self.x'"),
    ("--config.model.checkpoint=/no/such/t5", "'model.checkpoint': path does not exist"),
    ("--config.data.pretrain.source=/no/such/corpus", "'data.pretrain.source': path does not exist"),
    ("--config.data.benchmark=sni", "'data.vocabulary': 'synthetic_spm' is trained on the synthetic suite"),
    (("--config.data.benchmark=sni", "--config.data.vocabulary=byte"), "'data.sni.dir' is required"),
    (("--config.stages.concat.optimizer.schedule=linear", "--config.stages.concat.optimizer.warmup_steps=10"),
     "'stages.concat.optimizer.warmup_steps'=10 leaves no room"),
    ("--config.data.synthetic.vocab_size=64", "'data.synthetic.vocab_size' (64): SentencePiece cannot train"),
    ("--config.tagi.instruction_source=question", "'tagi.instruction_source' is 'question'; choose one of"),
    ("--config.model.attention=flash", "'model.attention' is 'flash'; choose one of: 'einsum', 'xla', 'cudnn'"),
    (("--config.model.attention=xla", "--config.model.dropout_rate=0.1"),
     "'model.attention' is 'xla', which has no attention dropout, but 'model.dropout_rate' is 0.1"),
    ("--config.model.attention=cudnn", "'model.attention' is 'cudnn', which needs 'model.dtype' bfloat16"),
    (("--config.model.attention=cudnn", "--config.model.dtype=bfloat16"), "'cudnn' (a GPU kernel) but JAX runs"),
    (("--config.data.benchmark=synthetic_qa", "--config.data.qa.num_passages=2"),
     "'data.qa.passage_length' must be >= 2"),
    (("--config.data.benchmark=qa", "--config.data.vocabulary=byte", "--config.data.qa.dir=/no/such/qa"),
     "'data.qa.dir': path does not exist"),
    ("--config.tagi.train_backbone=ffn", "'tagi.train_backbone' is 'ffn'; choose one of"),
    ("--config.prng_impl=philox", "config key 'prng_impl' must be one of threefry2x32, rbg, unsafe_rbg, got 'philox'"),
]


LOAD_TIME_OVERRIDES = ("--config.prng_impl=philox", "--config.model.attention=flash",
                       "--config.tagi.train_backbone=ffn", "--config.hypernet.rank=0")


@pytest.mark.parametrize("override, message", BAD_TRAIN_OVERRIDES, ids=[str(o) for o, _ in BAD_TRAIN_OVERRIDES])
def test_train_bad_override(tiny, tmp_path, capsys, override, message):
    workdir = str(tmp_path / "run")
    overrides = [override] if isinstance(override, str) else list(override)
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}", *overrides], capsys)
    assert_one_error(code, err, message)
    assert not os.path.exists(os.path.join(workdir, "config.json"))  # stopped before any work
    if override in LOAD_TIME_OVERRIDES:  # caught by the load-time check: nothing at all written, not even logs/
        assert not os.path.exists(workdir)


def test_train_bad_command_lines(tiny, tmp_path, capsys):
    workdir = f"--workdir={tmp_path / 'run'}"
    bad_py = tmp_path / "raises.py"
    bad_py.write_text("raise RuntimeError('broken on purpose')\n")
    no_get = tmp_path / "no_get.py"
    no_get.write_text("X = 1\n")
    wrong = tmp_path / "wrong.py"
    wrong.write_text("def get_config():\n    return {'a': 1}\n")
    cases = [
        ([], "--config is required", 2),
        ([f"--config={tiny}"], "--workdir is required", 2),
        ([f"--config={tmp_path / 'missing.py'}", workdir], "config file not found", 1),
        ([f"--config={os.path.join(REPO, 'README.md')}", workdir], "is not a Python file", 1),
        ([f"--config={bad_py}", workdir], "fails to load: RuntimeError: broken on purpose", 1),
        ([f"--config={no_get}", workdir], "defines no get_config()", 1),
        ([f"--config={wrong}", workdir], "returned dict, not a ConfigDict", 1),
        ([f"--config={os.path.join(REPO, 'configs', 'demo.py')}:xl", workdir], "get_config('xl') failed", 1),
        ([f"--config={os.path.join(REPO, 'configs', 'sni_t5_lm.py')}:huge", workdir], "size 'huge'", 1),
        ([f"--config={tiny}", workdir, "--bogus=1"], "Unknown command line flag 'bogus'", 2),
        ([f"--config={tiny}", workdir, "stray"], "unexpected arguments: stray", 2),
        ([f"--config={tiny}", workdir, "--config.pipeline.stages=()", "--config.pipeline.evaluate=()"],
         "nothing to run", 1),
    ]
    for args, message, status in cases:
        code, _, err = run_main(TRAIN, args, capsys)
        assert_one_error(code, err, message)
        assert code == status, (args, code)


def test_train_help_exits_zero(capsys):
    code, out, _ = run_main(TRAIN, ["--help"], capsys)
    assert code == 0 and "--workdir" in out and "launch/train.py" in out


def test_bad_vocabulary_file_is_named(tiny, tmp_path, capsys):
    vocab = tmp_path / "spiece.model"
    vocab.write_text("not a sentencepiece model")
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={tmp_path / 'run'}", "--config.data.vocabulary="
                                    f"{vocab}", "--config.data.benchmark=synthetic"], capsys)
    assert_one_error(code, err, "'data.vocabulary'", "is not a SentencePiece model")


# ------------------------------------------------------------------------------------------------ SNI task files
def _sni_copy(shared_data, tmp_path, break_it):
    src = shared_data / "sni_sample"
    dest = tmp_path / "sni"
    shutil.copytree(src, dest)
    train = (dest / "splits" / "default" / "train_tasks.txt").read_text().split()
    break_it(dest, train[0])
    return str(dest)


SNI_BREAKAGE = {
    "truncated JSON": (lambda d, t: (d / "tasks" / f"{t}.json").write_text('{"Definition": ["x"'), "invalid JSON"),
    "no Definition": (lambda d, t: _edit(d / "tasks" / f"{t}.json", lambda j: j.pop("Definition")), "Definition"),
    "empty Instances": (lambda d, t: _edit(d / "tasks" / f"{t}.json", lambda j: j.update(Instances=[])),
                        "Instances"),
    "split lists a missing task": (lambda d, t: (d / "tasks" / f"{t}.json").unlink(), "not found"),
}


def _edit(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("breakage", sorted(SNI_BREAKAGE))
def test_malformed_sni_task_files(shared_data, tiny, tmp_path, capsys, breakage):
    break_it, message = SNI_BREAKAGE[breakage]
    sni_dir = _sni_copy(shared_data, tmp_path, break_it)
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={tmp_path / 'run'}", "--config.data.benchmark=sni",
                                    "--config.data.vocabulary=byte", f"--config.data.sni.dir={sni_dir}",
                                    f"--config.data.pretrain.source={os.path.join(sni_dir, 'tasks')}",
                                    "--config.model.vocab_size=384"], capsys)
    line = assert_one_error(code, err, message)
    assert sni_dir in line or "task" in line, line


# ------------------------------------------------------------------------------------------------ work directories
def test_resume_refuses_other_shapes_and_leaves_the_work_directory_intact(trained, tiny, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    before = tree_digest(workdir)
    for override, key in (("--config.model.d_model=32", "model.d_model (16 -> 32)"),
                          ("--config.data.synthetic.seed=3", "data.synthetic.seed"),
                          ("--config.stages.concat.optimizer.learning_rate=0.5",
                           "stages.concat.optimizer.learning_rate")):
        code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}", override], capsys)
        assert_one_error(code, err, "was trained with other settings", key)
        assert tree_digest(workdir) == before, override


def test_resume_accepts_harmless_changes_and_records_them(trained, tiny, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    code, out, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}", "--config.eval.max_decode_len=6",
                                      "--config.stages.finetune.optimizer.learning_rate=0.5"], capsys)
    assert code == 0, err[-2000:]
    assert "eval.max_decode_len 8 -> 6" in out
    history = json.load(open(os.path.join(workdir, "run.json")))["history"]
    assert history[-1]["changed"]["eval.max_decode_len"] == [8, 6]
    assert history[-1]["changed"]["stages.finetune.optimizer.learning_rate"][1] == 0.5  # finetune never started


def test_hand_edited_or_broken_config_json_is_detected(trained, tiny, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    path = os.path.join(workdir, "config.json")
    text = open(path).read()
    open(path, "w").write(text.replace('"max_decode_len": 8', '"max_decode_len": 9'))
    before = tree_digest(workdir)
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}"], capsys)
    assert_one_error(code, err, f"{path} was changed by hand")
    assert tree_digest(workdir) == before
    open(path, "w").write(text[:40])
    os.remove(os.path.join(workdir, "run.json"))
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}"], capsys)
    assert_one_error(code, err, f"{path} is not valid JSON")


def test_damaged_checkpoint_falls_back_or_is_named(trained, tiny, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    ckpts = os.path.join(workdir, "concat", "checkpoints")
    assert sorted(os.listdir(ckpts)) == ["2", "4"]
    os.remove(os.path.join(ckpts, "4", "default", "_METADATA"))
    code, out, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}",
                                      "--config.stages.concat.train.steps=6"], capsys)
    assert code == 0, err[-2000:]
    assert f"warning: checkpoint {ckpts}/4 is unreadable" in out and "using step 2 instead" in out
    assert "resuming from checkpoint at step 2" in out + err
    assert os.path.isdir(os.path.join(ckpts, "4.unreadable"))  # kept, never deleted
    for step in os.listdir(ckpts):
        if step.isdigit():
            shutil.rmtree(os.path.join(ckpts, step, "default"))
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}",
                                    "--config.stages.concat.train.steps=8"], capsys)
    assert_one_error(code, err, "is unreadable", "no older step", ckpts)


# ------------------------------------------------------------------------------------------------ runs that go wrong
def test_diverged_run_stops_at_the_first_non_finite_step_without_saving(tiny, tmp_path, capsys):
    workdir = str(tmp_path / "nan")
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}",
                                    "--config.stages.concat.optimizer.learning_rate=1e30",
                                    "--config.stages.concat.train.steps=40",
                                    "--config.stages.concat.train.checkpoint_every=1"], capsys)
    line = assert_one_error(code, err, "stage 'concat' step", "non-finite", "stopped without saving")
    step = int(line.split(" step ")[1].split(":")[0])
    saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "concat", "checkpoints")) if s.isdigit())
    assert saved and max(saved) < step  # only finite states were saved
    assert f"the last good checkpoint, step {max(saved)}" in line
    assert not os.path.exists(os.path.join(workdir, "summary.json"))


def test_sigterm_saves_the_step_reached_and_the_next_run_resumes(tiny, tmp_path, capsys):
    workdir = str(tmp_path / "preempted")
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={tiny}", f"--workdir={workdir}",
           "--config.stages.concat.train.steps=100000", "--config.stages.concat.train.checkpoint_every=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics = os.path.join(workdir, "concat", "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and os.path.getsize(metrics) > 0) and time.time() < deadline:
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    lines = [line for line in err.splitlines() if line.startswith("preempted: ")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    step = int(lines[0].split("after step ")[1].split()[0])
    assert sorted(os.listdir(os.path.join(workdir, "concat", "checkpoints"))) == [str(step)]
    end = step + (4 - step % 2)  # a logged step (log_every=2) after the resume
    code, out, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}",
                                      f"--config.stages.concat.train.steps={end}"], capsys)
    assert code == 0, err[-2000:]
    assert f"resuming from checkpoint at step {step}" in out + err
    # The resumed run is the uninterrupted one: the same loss terms at the last step.
    straight = str(tmp_path / "straight")
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={straight}",
                                    f"--config.stages.concat.train.steps={end}"], capsys)
    assert code == 0, err[-2000:]

    def last(path):
        row = json.loads(open(os.path.join(path, "concat", "metrics.jsonl")).read().splitlines()[-1])
        return {k: v for k, v in row.items() if not k.endswith("per_second")}
    assert last(workdir) == last(straight) and last(workdir)["step"] == end


def test_a_data_error_inside_tf_data_ends_the_process(shared_data, tiny, tmp_path):
    """A malformed line in a P3 train.jsonl is read by a tf.data generator: the process prints the line's error
    and exits promptly (it used to hang at interpreter shutdown)."""
    train = tmp_path / "p3_train" / "super_glue" / "rte"
    train.mkdir(parents=True)
    rows = [json.loads(line) for line in open(shared_data / "p3_eval" / "rte" / "validation.jsonl")][:8]
    rows = [{"premise": r["premise"], "hypothesis": r["hypothesis"], "label": 0, "idx": i} for i, r in enumerate(rows)]
    lines = [json.dumps(r) for r in rows]
    lines[5] = "{not json"
    (train / "train.jsonl").write_text("\n".join(lines) + "\n")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(r["premise"] for r in rows) + "\n")
    cmd = [sys.executable, os.path.join(REPO, "launch", "train.py"), f"--config={tiny}",
           f"--workdir={tmp_path / 'run'}", "--config.data.benchmark=p3", "--config.data.vocabulary=byte",
           "--config.model.vocab_size=384", f"--config.data.pretrain.source={corpus}",
           f"--config.data.p3.templates_dir={shared_data / 'promptsource_templates'}",
           f"--config.data.p3.train_data_dir={tmp_path / 'p3_train'}",
           f"--config.data.p3.eval_data_dir={shared_data / 'p3_eval'}",
           "--config.data.p3.train_datasets=('super_glue/rte',)", "--config.data.p3.eval_datasets=('cb',)"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert_one_error(done.returncode, done.stderr, "train.jsonl:6: invalid JSON")


def test_the_api_refuses_non_finite_adapters():
    """A checkpoint whose hypernetwork holds NaN would "predict" empty strings: generating its adapter raises."""
    import jax

    from tagi_jax.api import TAGIPredictor
    from tagi_jax.vocab import get_vocabulary
    from test_evaluation import LENGTHS, random_tagi

    model, params = random_tagi("none")
    broken = jax.tree.map(lambda x: x * float("nan"), params)
    predictor = TAGIPredictor(None, model, broken, "tagi", get_vocabulary("byte"), LENGTHS)
    with pytest.raises(ValueError, match="non-finite values .* NaN/Inf parameters"):
        predictor.generate_adapter("Sort the numbers.")


def test_partly_trained_method_is_reported_as_such(trained, tiny, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    code, out, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={workdir}", "--config.pipeline.stages=()",
                                      "--config.stages.concat.train.steps=40"], capsys)
    assert code == 0, err[-2000:]
    assert "stage 'concat' stopped at step 4 of 40" in out
    entry = json.load(open(os.path.join(workdir, "summary.json")))["concat"]["unseen"]
    assert entry["complete"] is False and entry["step"] == 4 and entry["steps"] == 40


def test_nothing_to_evaluate_is_an_error(tiny, tmp_path, capsys):
    code, _, err = run_main(TRAIN, [f"--config={tiny}", f"--workdir={tmp_path / 'empty'}",
                                    "--config.pipeline.stages=()"], capsys)
    assert_one_error(code, err, "none of the methods concat has a trained stage")


# ------------------------------------------------------------------------------------------------ the eval command
def test_eval_bad_inputs(trained, tiny, tmp_path, capsys):
    os.makedirs(tmp_path / "empty")
    before = tree_digest(trained)
    cases = [
        ([], "--workdir is required"),
        ([f"--workdir={tmp_path / 'nowhere'}"], "work directory not found"),
        ([f"--workdir={tmp_path / 'empty'}"], "no config.json"),
        ([f"--workdir={trained}", "--method=tagii"], "unknown method 'tagii'"),
        ([f"--workdir={trained}", "--method=,"], "--method names no method"),
        ([f"--workdir={trained}", "--method=hint"], "method 'hint' has no checkpoint"),
        ([f"--workdir={trained}", "--method=concat", "--benchmark=glue"], "unknown benchmark 'glue'"),
        ([f"--workdir={trained}", "--method=concat", "--tasks=no_task"], "unknown task 'no_task'"),
        ([f"--workdir={trained}", "--method=concat", "--batch_size=0"], "batch_size"),
        ([f"--workdir={trained}", "--method=concat", "--benchmark=sni"],
         "'data.vocabulary': 'synthetic_spm' is trained on the synthetic suite"),
        ([f"--workdir={trained}", "--method=concat", "--benchmark=sni", f"--config={tiny}",
          "--config.data.vocabulary=byte"], "'data.sni.dir' is required"),
        ([f"--workdir={trained}", "--method=concat", "--benchmark=sni", f"--config={tiny}",
          "--config.data.vocabulary=byte", f"--sni_dir={tmp_path}"], "no tasks/ folder"),
        ([f"--workdir={trained}", "--method=concat", "--benchmark=p3", "--p3_datasets=mnli", f"--config={tiny}",
          "--config.data.vocabulary=byte", f"--p3_data_dir={tmp_path}", f"--p3_templates_dir={tmp_path}"],
         "unknown dataset(s) mnli"),
        ([f"--workdir={trained}", "--config=/no/such.py"], "config file not found"),
    ]
    for args, message in cases:
        code, _, err = run_main(EVAL, args, capsys)
        assert_one_error(code, err, message)
    assert tree_digest(trained) == before


# ------------------------------------------------------------------------------------------------ generate_adapter
def test_generate_adapter_bad_inputs(trained, tmp_path, capsys):
    existing = tmp_path / "file.txt"
    existing.write_text("keep me")
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep me too")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"input": "1", "output": "2"}\n{oops\n')
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"input": "1"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    base = [f"--workdir={trained}", "--instruction=Sort the numbers."]
    out = f"--out={tmp_path / 'adapter'}"
    cases = [
        ([f"--workdir={trained}", out], "--instruction is required", 2),
        (base, "--out is required", 2),
        (base + [f"--out={existing}"], "is a file, not a directory", 1),
        (base + [f"--out={full}"], "already holds files; pass --overwrite", 1),
        (base + [out, f"--examples={tmp_path / 'none.jsonl'}"], "--examples: file not found", 1),
        (base + [out, f"--examples={bad_json}"], "bad.jsonl:2: invalid JSON", 1),
        (base + [out, f"--examples={wrong}"], "wrong.jsonl:1: expected an object with 'input' and 'output'", 1),
        (base + [out, f"--examples={empty}"], "holds no examples", 1),
        (base + [out, "--method=concat"], "--method", 2),
        (base + [out], "method 'tagi' has no checkpoint", 1),
        ([f"--workdir={tmp_path / 'nowhere'}", "--instruction=x", out], "work directory not found", 1),
    ]
    for args, message, status in cases:
        code, _, err = run_main(GENERATE, args, capsys)
        assert_one_error(code, err, message)
        assert code == status, (args, code, err[-500:])
    assert existing.read_text() == "keep me" and (full / "x").read_text() == "keep me too"
    assert not (tmp_path / "adapter").exists()
