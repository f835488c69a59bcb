"""What `launch/init.py` writes from the answers: the lines of DIR/config.py over the closest configs/*.py, the
natural-instructions layout for the user's own task files (DIR/data/sni), a pretraining corpus from the training
tasks (DIR/data/pretrain_corpus), and the files themselves (nothing is written until every answer is checked).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import shutil
from typing import Sequence

from tagi_jax import features as F
from tagi_jax import init_plan
from tagi_jax.init_probe import Backbone
from tagi_jax.run.stages import METHODS
from tasks import sni

CONFIG_FILE, RUN_FILE = "config.py", "run.sh"
SNI_LAYOUT = os.path.join("data", "sni")  # the user's own tasks, linked into a natural-instructions layout
CORPUS_DIR = os.path.join("data", "pretrain_corpus")
# What each evaluated method needs trained (the base config's order is kept).
METHOD_STAGES = {"tagi": ("teachers", "pretrain", "finetune"), "hint": ("pretrain", "hint"),
                 "concat": ("concat",), "no_instruction": ("no_instruction",)}
EPOCHS = 3  # the paper's finetuning epochs (configs/sni_t5_lm.py); the LoRA teachers get one


@dataclasses.dataclass
class Answers:
    workdir: str
    backbone: Backbone | None = None
    vocabulary: str = ""
    benchmark: str = "synthetic"
    sni_dir: str = ""
    task_files: tuple[str, ...] = ()  # the user's own tasks (benchmark "tasks")
    test_tasks: tuple[str, ...] = ()
    p3_templates_dir: str = ""
    p3_train_data_dir: str = ""
    p3_eval_data_dir: str = ""
    p3_train_datasets: tuple[str, ...] = ()
    setting: str = "def"
    methods: tuple[str, ...] = tuple(METHODS)
    pretrain_source: str = ""  # "tasks", "none", "tfds:<name>" or a directory; "" for the synthetic suite
    lengths: dict = dataclasses.field(default_factory=dict)
    sample_note: str = ""
    train_examples: int = 0  # the user's own tasks: training instances (capped per task), for the epoch steps
    plan: init_plan.Plan | None = None

    @property
    def data_benchmark(self) -> str:
        return "sni" if self.benchmark == "tasks" else self.benchmark

    @property
    def uses_pretrain(self) -> bool:
        return self.benchmark == "synthetic" or self.pretrain_source not in ("", "none")


def task_name(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def stages_for(a: Answers, base_stages: Sequence[str]) -> tuple[str, ...]:
    """The base config's stages the chosen methods need (from scratch, `concat` is every stage's backbone)."""
    need = {s for m in a.methods for s in METHOD_STAGES[m]}
    if a.backbone is None:
        need.add("concat")
    if not a.uses_pretrain:
        need.discard("pretrain")
    return tuple(s for s in base_stages if s in need)


def base_of(a: Answers) -> tuple[str, str, str]:
    """(import line, call, what it is) of the configs/*.py the answers start from."""
    if a.benchmark == "synthetic":
        return "from configs.demo import get_config as base_config", "base_config()", "configs/demo.py"
    module = "p3_t0" if a.benchmark == "p3" else "sni_t5_lm"
    size = a.backbone.config_size
    return (f"from configs.{module} import get_config as base_config", f"base_config({size!r})",
            f"configs/{module}.py:{size}")


def config_lines(a: Answers, base_stages: Sequence[str]) -> list[str]:
    """The assignments over the base config, each with the answer (or the measurement) it comes from."""
    lines = []
    b = a.backbone
    if b is not None:
        lines += [f"c.model.checkpoint = {b.path!r}  # {b.describe()}",
                  f"c.data.vocabulary = {a.vocabulary!r}"]
    lines.append(f"c.data.benchmark = {a.data_benchmark!r}")
    if a.benchmark == "sni":
        lines.append(f"c.data.sni.dir = {a.sni_dir!r}")
    elif a.benchmark == "tasks":
        lines += [f"# Your {len(a.task_files)} task files, linked by init into a natural-instructions layout; "
                  f"held out for evaluation: {', '.join(a.test_tasks)}.",
                  f"c.data.sni.dir = {os.path.join(a.workdir, SNI_LAYOUT)!r}"]
    elif a.benchmark == "p3":
        lines += [f"c.data.p3.templates_dir = {a.p3_templates_dir!r}",
                  f"c.data.p3.train_data_dir = {a.p3_train_data_dir!r}",
                  f"c.data.p3.eval_data_dir = {a.p3_eval_data_dir!r}",
                  f"c.data.p3.train_datasets = {tuple(a.p3_train_datasets)!r}  # those found with train.jsonl"]
    if a.benchmark != "p3":
        lines.append(f"c.data.setting = {a.setting!r}")
    lengths = ", ".join(f"{k}={int(a.lengths[k])}" for k in F.TEXT_FEATURES)
    lines += [f"# {a.sample_note}", f"c.data.lengths.update(dict({lengths}))"]
    if a.pretrain_source == "tasks":
        lines += ["# Hypernetwork pretraining on documents init wrote from the training tasks (no C4 needed).",
                  f"c.data.pretrain.source = {os.path.join(a.workdir, CORPUS_DIR)!r}",
                  "c.data.pretrain.min_words = 16"]
    elif a.pretrain_source not in ("", "none"):
        lines.append(f"c.data.pretrain.source = {a.pretrain_source!r}")
    stages = stages_for(a, base_stages)
    lines += [f"c.pipeline.stages = {stages!r}", f"c.pipeline.evaluate = {tuple(a.methods)!r}"]
    if b is not None and a.benchmark == "synthetic":  # the demo trains concat first as the backbone
        lines.append("for stage in c.pipeline.stages:  # every stage starts from the imported checkpoint")
        lines.append("    c.stages[stage].init_from = ''")
    if not a.uses_pretrain:
        source = "concat" if b is None else ""
        lines.append(f"# No pretraining text: finetune and hint start from {'concat' if source else 'the checkpoint'}.")
        lines += [f"c.stages.{s}.init_from = {source!r}" for s in ("finetune", "hint") if s in stages]
    p = a.plan
    lines.append(f"# {p.describe()}")
    lines.append("for stage in c.pipeline.stages:")
    lines.append(f"    c.stages[stage].train.update(dict(batch_size={p.batch_size}, "
                 f"num_microbatches={p.num_microbatches}))")
    if a.benchmark == "tasks" and a.train_examples:
        epoch = math.ceil(a.train_examples / p.batch_size)
        lines += [f"# {a.train_examples} training instances: one epoch is {epoch} steps; the teachers train one, "
                  f"the other stages {EPOCHS} (as configs/sni_t5_lm.py).",
                  f"for stage, n in dict(teachers={epoch}, pretrain={EPOCHS * epoch}, finetune={EPOCHS * epoch}, "
                  f"concat={EPOCHS * epoch}, no_instruction={EPOCHS * epoch}, hint={EPOCHS * epoch}).items():",
                  "    c.stages[stage].train.steps = n",
                  "    c.stages[stage].train.checkpoint_every = min(c.stages[stage].train.checkpoint_every, n)",
                  "    c.stages[stage].optimizer.warmup_steps = max(1, int(0.03 * n))"]
    lines += [f"c.mesh.update(dict(data=-1, model={p.mesh_model}, fsdp={p.fsdp}))",
              f"c.model.remat_policy = {p.remat!r}"]
    return lines


def config_text(a: Answers, base_stages: Sequence[str], devices: str) -> str:
    base_import, base_call, base_name = base_of(a)
    doc = (f"Written by `python launch/init.py` on {datetime.date.today().isoformat()} for {devices}, starting "
           f"from {base_name}.\n\nAn ordinary config file: edit it freely, then run `bash "
           f"{os.path.join(a.workdir, RUN_FILE)}` (or re-run init on this work directory, which shows it and resumes).")
    return init_plan.render_config(doc, base_import, base_call, config_lines(a, base_stages))


# ------------------------------------------------------------------------------------------------ data files
def split_lists(a: Answers) -> dict[str, list[str]]:
    test = set(a.test_tasks)
    names = [task_name(p) for p in a.task_files]
    return {"train": [n for n in names if n not in test], "test": [n for n in names if n in test]}


def write_sni_layout(a: Answers, root: str) -> str:
    """`root`/tasks/<name>.json (links to the user's files, copies where links fail) and splits/default/."""
    os.makedirs(os.path.join(root, "tasks"), exist_ok=True)
    for path in a.task_files:
        dest = sni.task_path(root, task_name(path))
        if not os.path.lexists(dest):
            try:
                os.symlink(os.path.abspath(path), dest)
            except OSError:  # file systems without links: a copy
                shutil.copyfile(path, dest)
    split_dir = os.path.join(root, "splits", "default")
    os.makedirs(split_dir, exist_ok=True)
    for split, names in split_lists(a).items():
        with open(os.path.join(split_dir, f"{split}_tasks.txt"), "w") as f:
            f.write("".join(n + "\n" for n in names))
    return root


def training_task_files(a: Answers) -> list[str]:
    if a.benchmark == "tasks":
        train = set(split_lists(a)["train"])
        return [p for p in a.task_files if task_name(p) in train]
    return [sni.task_path(a.sni_dir, n) for n in sni.read_split(a.sni_dir)["train"]]


def write_task_corpus(files: Sequence[str], path: str, docs_per_task: int = 8, per_doc: int = 4) -> str:
    """JSON Lines documents {"text"} from training tasks only: the definition and a few worked instances each
    (tasks/pretrain.py cuts them into a | b | c); no evaluation task is read."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for file in files:
            task = sni.load_task_file(file)
            definition = task["Definition"][0] if isinstance(task["Definition"], list) else task["Definition"]
            instances = task["Instances"]
            for d in range(min(docs_per_task, math.ceil(len(instances) / per_doc))):
                parts = [definition.strip()]
                for inst in instances[d * per_doc:(d + 1) * per_doc]:
                    out = inst["output"] if isinstance(inst["output"], str) else inst["output"][0]
                    parts.append(f"Input: {inst['input'].strip()} Output: {out.strip()}")
                f.write(json.dumps({"text": " ".join(parts)}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def write_all(a: Answers, config: str, run_script: str) -> tuple[str, str]:
    """Create the work directory and write the data files, config.py and run.sh (executable)."""
    os.makedirs(a.workdir, exist_ok=True)
    if a.benchmark == "tasks":
        write_sni_layout(a, os.path.join(a.workdir, SNI_LAYOUT))
    if a.pretrain_source == "tasks":
        write_task_corpus(training_task_files(a), os.path.join(a.workdir, CORPUS_DIR, "corpus.jsonl"))
    config_path, run_path = os.path.join(a.workdir, CONFIG_FILE), os.path.join(a.workdir, RUN_FILE)
    with open(config_path, "w") as f:
        f.write(config)
    with open(run_path, "w") as f:
        f.write(run_script)
    os.chmod(run_path, 0o755)
    return config_path, run_path
