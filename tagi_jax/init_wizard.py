"""The `launch/init.py` questionnaire: each question is also a flag, every answer is checked on the spot (asked
again when it is wrong, or with flags only one `error: --flag: ...` line, exit 2, nothing written), and the answers
become DIR/config.py and DIR/run.sh; on a work directory that has them, init shows them and resumes instead.
"""
from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Callable, TextIO

import jax
from absl import flags

from tagi_jax import cli
from tagi_jax import features as F
from tagi_jax import init_files, init_plan, init_probe
from tagi_jax.config import ConfigError, load_config
from tagi_jax.data.benchmarks import BENCHMARKS
from tagi_jax.init_files import CONFIG_FILE, RUN_FILE, Answers
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run import compile_plan
from tagi_jax.run.defaults import RUN_MODEL_KEYS, validate
from tagi_jax.run.stages import METHODS
from tasks import sni
from tasks.synthetic.suite import SETTINGS as SYNTHETIC_SETTINGS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICES = BENCHMARKS + ("tasks",)  # "tasks": the user's own SNI-format task files
# name: help (the flag's, and the question's explanation)
QUESTIONS = {
    "workdir": "Work directory for the run (checkpoints, logs, config.py, run.sh).",
    "backbone": "A Hugging Face T5 directory (config.json + weights), or 'none' to train from scratch (the "
                "synthetic demo).",
    "vocabulary": "The backbone's SentencePiece model (default: <backbone>/spiece.model).",
    "benchmark": "synthetic (the demo suite), sni (a natural-instructions checkout), p3 (T0's datasets), or "
                 "tasks (your own SNI-format task JSON files).",
    "sni_dir": "natural-instructions directory (tasks/ and splits/default/).",
    "tasks_dir": "Folder of your SNI-format task files (*.json: Definition, Positive Examples, Instances).",
    "test_tasks": "Comma-separated names of your tasks held out for evaluation (default: every fifth).",
    "p3_templates_dir": "promptsource templates directory.",
    "p3_train_data_dir": "P3 training data: <dir>/<promptsource path>/train.jsonl.",
    "p3_eval_data_dir": "T0 held-out sets: <dir>/<dataset>/validation.jsonl.",
    "setting": "def (the definition) or def_pos2 (definition and two positive examples).",
    "methods": "Comma-separated methods to train and evaluate: " + ", ".join(METHODS) + ".",
    "pretrain_source": "Text for hypernetwork pretraining: 'tasks' (documents from your training tasks), 'none' "
                       "(skip pretraining), 'tfds:c4/en', or a folder of .jsonl/.txt files.",
    **{f"len_{f}": f"Token length of '{f}' (default: covers ~95% of a sample of your data)."
       for f in F.TEXT_FEATURES},
    "mesh_model": "Devices per model-parallel group (mesh.model).",
    "batch_size": "Global batch size of every stage.",
    "num_microbatches": "Gradient-accumulation steps per batch.",
    "remat": "Rematerialisation: none or full (recompute each layer in the backward pass).",
    "memory_gib": "Memory per device in GiB, for the plan (default: what the backend reports).",
}


def define_flags(fv: flags.FlagValues) -> None:
    for name, text in QUESTIONS.items():
        flags.DEFINE_string(name, None, text, flag_values=fv)
    flags.DEFINE_bool("yes", False, "Ask nothing: take the flags and otherwise the proposals (scripts).",
                      flag_values=fv)
    flags.DEFINE_bool("compile_check", False, "Check the plan with the compiler: every stage's step compiled for "
                      "these devices (launch/compile.py's planner; minutes for large models).", flag_values=fv)
    flags.DEFINE_bool("start", False, "Start training (DIR/run.sh) once the files are written.", flag_values=fv)


@dataclasses.dataclass
class Console:
    """Where questions go and answers come from (stdin/stdout; tests pipe answers in)."""
    given: dict
    interactive: bool
    stdin: TextIO = sys.stdin
    stdout: TextIO = sys.stdout

    def say(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def ask(self, name: str, default: str | None, check: Callable[[str], object], prompt: str = ""):
        """The checked answer to question `name`: its flag, else (interactively) a typed line, else `default`."""
        flag = self.given.get(name)
        if not self.interactive:
            text = flag if flag is not None else default
            if text is None:
                raise cli.UsageError(f"--{name} is required ({QUESTIONS.get(name, '')})")
            try:
                return check(text)
            except (ValueError, OSError, KeyError) as e:
                raise cli.UsageError(f"--{name}={text}: {cli.error_line(e)[len('error: '):]}") from None
        if flag is not None:
            try:
                value = check(flag)
                self.say(f"{name}: {flag} (from --{name})")
                return value
            except (ValueError, OSError, KeyError) as e:
                self.say(f"  --{name}={flag}: {cli.error_line(e)[len('error: '):]}")
        while True:
            shown = f" [{default}]" if default not in (None, "") else ""
            print(f"{prompt or QUESTIONS.get(name, name)}\n{name}{shown}: ", end="", file=self.stdout, flush=True)
            line = self.stdin.readline()
            if not line:
                raise cli.UsageError(f"--{name}: no answer (the input ended)")
            if not self.stdin.isatty():  # piped answers: shown, so the transcript reads as a terminal would
                print(line.rstrip("\n"), file=self.stdout, flush=True)
            text = line.strip() or default
            if not text:
                self.say("  an answer is needed")
                continue
            try:
                return check(text)
            except (ValueError, OSError, KeyError) as e:
                self.say(f"  {cli.error_line(e)[len('error: '):]}; try again")

    def confirm(self, name: str, question: str, default: bool) -> bool:
        if self.given.get(name) or not self.interactive:
            return bool(self.given.get(name))
        print(f"{question} [{'Y/n' if default else 'y/N'}]: ", end="", file=self.stdout, flush=True)
        line = self.stdin.readline()
        if not line:  # the input ended: start nothing that was not asked for
            return False
        if not self.stdin.isatty():
            print(line.rstrip("\n"), file=self.stdout, flush=True)
        return default if not line.strip() else line.strip().lower() in ("y", "yes")


# ------------------------------------------------------------------------------------------------ checks
def _choice(options):
    def check(text):
        if text not in options:
            raise ValueError(f"{text!r} is not one of: {', '.join(options)}")
        return text
    return check


def _positive(text) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise ValueError(f"expected a number >= 1, got {value}")
    return value


_directory = init_probe.check_directory


def _methods(text) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    if not names:
        raise ValueError("name at least one method")
    for m in names:
        _choice(tuple(METHODS))(m)
    return names


# ------------------------------------------------------------------------------------------------ the flow
def run(given: dict, interactive: bool, console: Console | None = None) -> tuple[str, bool]:
    """Ask, check and write; returns (the run script, whether to start it now)."""
    io = console or Console(given, interactive)
    devices = init_probe.detect_devices()
    io.say(f"devices: {devices.describe()}")
    workdir = io.ask("workdir", None, lambda t: os.path.abspath(os.path.expanduser(t)))
    if os.path.isfile(os.path.join(workdir, CONFIG_FILE)):
        return _resume(io, workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise cli.UsageError(f"--workdir={workdir}: exists and is not a directory")
    if os.path.isfile(os.path.join(workdir, "config.json")):
        raise cli.UsageError(f"--workdir={workdir}: holds a run launched without init (config.json, no "
                             f"{CONFIG_FILE}); choose another work directory")
    a = Answers(workdir)
    a.backbone = io.ask("backbone", "none", lambda t: None if t == "none" else init_probe.check_backbone(t))
    if a.backbone is not None:
        io.say(f"  {a.backbone.describe()}")
        guess = os.path.join(a.backbone.path, "spiece.model")
        a.vocabulary = io.ask("vocabulary", guess if os.path.isfile(guess) else None,
                              lambda t: _vocabulary(t, a.backbone))
    else:
        a.vocabulary = "synthetic_spm"
    a.benchmark = io.ask("benchmark", "synthetic" if a.backbone is None else "sni", lambda t: _benchmark(t, a))
    _data_questions(io, a)
    if a.benchmark != "p3":
        settings = SYNTHETIC_SETTINGS if a.benchmark == "synthetic" else sni.SETTINGS
        a.setting = io.ask("setting", "def" if a.benchmark == "synthetic" else "def_pos2", _choice(settings))
    a.methods = io.ask("methods", ",".join(METHODS), _methods)
    if a.benchmark != "synthetic" and ({"tagi", "hint"} & set(a.methods)):
        a.pretrain_source = io.ask("pretrain_source", "none" if a.benchmark == "p3" else "tasks",
                                   lambda t: _pretrain_source(t, a))
    _length_questions(io, a)
    base_stages, config = _draft(a, devices)
    _plan_questions(io, a, devices, base_stages, config)
    text = init_files.config_text(a, base_stages, devices.describe())
    _check_config(a, text)  # loads and validates exactly what will be written, before anything is
    if io.confirm("compile_check", "check the plan with the compiler now (minutes for large models)?", False):
        _compile_check(io, a, text, devices)
    script = init_plan.render_run_script(REPO, sys.executable, os.path.join(workdir, CONFIG_FILE), workdir)
    config_path, run_path = init_files.write_all(a, text, script)
    io.say(f"\n==> {config_path}\n{text}\n==> {run_path}\n{script}")
    start = io.confirm("start", f"start training now (bash {run_path})?", False)
    if not start:
        io.say(f"to start: bash {run_path}   (or re-run init with --workdir={workdir})")
    return run_path, start


def _resume(io: Console, workdir: str) -> tuple[str, bool]:
    """An existing DIR/config.py: show it and resume (nothing is overwritten; answers given as flags are not
    applied to it)."""
    config_path, run_path = os.path.join(workdir, CONFIG_FILE), os.path.join(workdir, RUN_FILE)
    ignored = [k for k, v in io.given.items() if v is not None and k in QUESTIONS and k != "workdir"]
    with open(config_path) as f:
        io.say(f"{workdir} was set up by init; its config:\n\n==> {config_path}\n{f.read()}")
    if ignored:
        io.say(f"note: --{', --'.join(ignored)} not applied: edit {config_path} to change it")
    if not os.path.isfile(run_path):
        script = init_plan.render_run_script(REPO, sys.executable, config_path, workdir)
        with open(run_path, "w") as f:  # only missing: written again, as init first wrote it
            f.write(script)
        os.chmod(run_path, 0o755)
    start = io.confirm("start", f"resume training (bash {run_path})?", True)
    if not start:
        io.say(f"to resume: bash {run_path}")
    return run_path, start


def _vocabulary(text: str, backbone) -> str:
    path = os.path.abspath(os.path.expanduser(text))
    init_probe.check_vocabulary(path, backbone.t5.vocab_size)
    return path


def _benchmark(text: str, a: Answers) -> str:
    _choice(CHOICES)(text)
    if a.backbone is None and text != "synthetic":
        raise ValueError("training from scratch ('--backbone=none') is for the synthetic suite; name a T5 "
                         "checkpoint as --backbone to train on your data")
    return text


def _data_questions(io: Console, a: Answers) -> None:
    if a.benchmark == "sni":
        a.sni_dir = io.ask("sni_dir", None, init_probe.check_sni_dir)
    elif a.benchmark == "tasks":
        a.task_files = tuple(io.ask("tasks_dir", None, init_probe.check_task_files))
        names = [init_files.task_name(p) for p in a.task_files]
        a.test_tasks = io.ask("test_tasks", ",".join(names[4::5] or names[-1:]), lambda t: init_probe.check_test_tasks(t, names))
        io.say(f"  {len(names) - len(a.test_tasks)} training tasks, {len(a.test_tasks)} held out")
    elif a.benchmark == "p3":
        a.p3_templates_dir = io.ask("p3_templates_dir", None, _directory)
        a.p3_train_data_dir, a.p3_train_datasets = io.ask("p3_train_data_dir", None, lambda t: init_probe.check_p3_train(t, a.p3_templates_dir))
        io.say(f"  {len(a.p3_train_datasets)} training datasets found")
        a.p3_eval_data_dir = io.ask("p3_eval_data_dir", None, _directory)


def _pretrain_source(text: str, a: Answers) -> str:
    if text in ("none", "tasks") or (text.startswith("tfds:") and len(text) > 5):
        if text == "tasks" and a.benchmark == "p3":
            raise ValueError("'tasks' writes documents from SNI-format tasks; for P3 name a folder, tfds: or none")
        return text
    return _directory(text)


def _length_questions(io: Console, a: Answers) -> None:
    """Tokenise a sample of the data with the run's vocabulary, show the histograms, ask each length."""
    count = init_probe.tokenizer(a.vocabulary, lambda: init_probe.synthetic_vocabulary_text(a.setting))
    if a.benchmark == "synthetic":
        examples = init_probe.synthetic_examples(a.setting)
    elif a.benchmark == "p3":
        examples = init_probe.p3_examples(a.p3_templates_dir, a.p3_eval_data_dir)
    else:
        files = init_files.training_task_files(a)
        examples = init_probe.sni_examples(files, a.setting, count)
        if a.benchmark == "tasks":  # configs/sni_t5_lm.py's cap of 500 instances per training task
            a.train_examples = sum(min(len(sni.load_task_file(p)["Instances"]), 500) for p in files)
    lengths = init_probe.token_lengths(examples, count)
    what = "held-out examples (P3's training files are not sampled)" if a.benchmark == "p3" else "training examples"
    io.say(f"\ntoken lengths of {len(examples)} sampled {what} (vocabulary {a.vocabulary}):")
    notes = []
    for f in F.TEXT_FEATURES:
        io.say(init_probe.histogram(lengths[f], f))
        proposal = init_probe.propose_length(lengths[f])
        io.say(f"  proposed {proposal}: {init_probe.truncation_note(lengths[f], proposal)}")
        a.lengths[f] = io.ask(f"len_{f}", str(proposal), _positive)
        notes.append(f"{f} {init_probe.truncation_note(lengths[f], a.lengths[f])}")
    a.sample_note = f"Lengths from {len(examples)} sampled {what}: " + "; ".join(notes) + "."


def _draft(a: Answers, devices) -> tuple[tuple[str, ...], object]:
    """The base config's stage order and the config as the answers so far make it (for the memory plan)."""
    base_import, base_call, base_name = init_files.base_of(a)
    base = load_config(os.path.join(REPO, base_name))
    stages = tuple(base.pipeline.stages)
    a.plan = init_plan.Plan(int(base.stages[stages[0]].train.batch_size), 1, 1, False, "none", 0, None, True, "")
    config = _load_text(init_plan.render_config("draft", base_import, base_call, init_files.config_lines(a, stages)))
    return stages, config


def _plan_questions(io: Console, a: Answers, devices, base_stages, config) -> None:
    memory = devices.memory_bytes
    if io.given.get("memory_gib") is not None:
        memory = int(float(io.ask("memory_gib", None, lambda t: str(float(t)))) * init_plan.GIB)
    stages = init_files.stages_for(a, base_stages)
    t5 = a.backbone.t5 if a.backbone is not None else None
    counts = init_plan.stage_param_counts(config, _num_teachers(a, config), t5, stages)
    from_config = config.stages[stages[0]].train.batch_size
    t5 = t5 or T5Config(**{k: v for k, v in config.model.to_dict().items() if k not in RUN_MODEL_KEYS})
    plan = init_plan.propose(config, t5, counts, devices.count, memory, from_config)
    io.say(f"\nplan: {plan.describe()}")
    model = io.ask("mesh_model", str(plan.mesh_model), lambda t: _divides(_positive(t), devices.count, "devices"))
    data_axis = devices.count // model
    batch = io.ask("batch_size", str(plan.batch_size),
                   lambda t: _divides(data_axis, _positive(t), f"batch (mesh data axis {data_axis})", reverse=True))
    default_micro = plan.num_microbatches if batch == plan.batch_size else 1
    micro = io.ask("num_microbatches", str(default_micro),
                   lambda t: _microbatches(_positive(t), batch, data_axis))
    remat = io.ask("remat", plan.remat, _choice(("none", "full")))
    fsdp = plan.fsdp and model == plan.mesh_model
    need, stage = init_plan.peak_bytes(config, t5, counts, devices.count, model, fsdp, batch, micro, remat)
    a.plan = init_plan.Plan(batch, micro, model, fsdp, remat, int(need), memory,
                            memory is None or need <= init_plan.HEADROOM * memory, stage)
    if not a.plan.fits:
        io.say(f"warning: {a.plan.describe()}")


def _divides(small: int, big: int, what: str, reverse: bool = False) -> int:
    if big % small:
        raise ValueError(f"{small} does not divide the {what} {big}" if not reverse
                         else f"{big} is not a multiple of the {what}")
    return big if reverse else small


def _microbatches(micro: int, batch: int, data_axis: int) -> int:
    if batch % micro or (batch // micro) % data_axis:
        raise ValueError(f"{micro} microbatches of a batch of {batch} do not split evenly over {data_axis} "
                         "data shard(s)")
    return micro


def _num_teachers(a: Answers, config) -> int:
    if config.tagi.teachers_per == "task":
        if a.benchmark == "synthetic":
            return int(config.data.synthetic.num_train_tasks)
        if a.benchmark == "p3":
            return len(a.p3_train_datasets)
        return len(init_files.training_task_files(a))
    if a.benchmark == "p3":
        return len(a.p3_train_datasets)
    if a.benchmark == "synthetic":
        return 10
    return len({sni.task_category(p) for p in init_files.training_task_files(a)})


def _load_text(text: str):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.remove(f.name)


def _compile_check(io: Console, a: Answers, text: str, devices) -> None:
    """The compile planner's figures for the plan (each stage's train step and each method's decoding compiled
    for these devices, memory from the compiler): what the estimate above only approximates."""
    config = _load_text(text)
    hbm = float(a.plan.memory_bytes or devices.memory_bytes or 0) or float("inf")
    io.say("\ncompiling every stage for these devices (GiB per device):\n" + compile_plan.HEADER)
    reports = compile_plan.plan(config, jax.devices(), hbm, backbone=a.backbone.t5 if a.backbone else None,
                                num_teachers=_num_teachers(a, config),
                                on_report=lambda r: io.say(compile_plan.format_report(r, None, init_plan.HEADROOM)))
    short = [f"{r.stage}/{r.program}" for r in reports if not r.fits(init_plan.HEADROOM)]
    if short:
        io.say(f"warning: {', '.join(short)} need more than {init_plan.HEADROOM:.0%} of a device: more "
               "microbatches, remat 'full', a larger mesh.model or shorter lengths")


def _check_config(a: Answers, text: str) -> None:
    """Load and validate the text to be written; the folders init creates next are stood in for by the user's
    task folder (validation only checks that they exist)."""
    config = _load_text(text)
    with config.unlocked():
        if a.benchmark == "tasks":
            config.data.sni.dir = os.path.dirname(a.task_files[0])
        if a.pretrain_source == "tasks":
            config.data.pretrain.source = os.path.dirname(a.task_files[0]) if a.task_files else a.sni_dir
    try:
        validate(config)
    except ConfigError as e:
        raise cli.UsageError(f"the answers give a config that does not validate: {e}") from None
