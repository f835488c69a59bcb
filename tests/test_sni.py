"""Super-NaturalInstructions tasks: real sample files, hand-written Tk-Instruct golden texts, splits, bad files."""
import importlib
import json
import os
import socket
import string

import pytest
import seqio

from tagi_jax import features as F
from tagi_jax.vocab import get_vocabulary
from tasks import formatting, sni

BYTE = get_vocabulary("byte")

# ---- hand-written from the JSON files (Definition, Positive/Negative Examples) ------------------------------
# task1146: the definition has no final punctuation (Tk-Instruct adds "."), nor do the examples.
DEF_1146 = ("Definition: In this task, you are given a country name and you need to return the capital city "
            "of the given country.\n\n")
POS_1146 = (" Positive Example 1 -\nInput: United States.\n Output: Washington.\n\n"
            " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n\n")
POS_1146_EXPL = (" Positive Example 1 -\nInput: United States.\n Output: Washington.\n"
                 " Explanation: Washington is the capital city of United States.\n\n"
                 " Positive Example 2 -\nInput: India.\n Output: New Delhi.\n"
                 " Explanation: New Delhi is the capital city of India.\n\n")
NEG_1146 = (" Negative Example 1 -\nInput: France.\n Output: Rome.\n\n"
            " Negative Example 2 -\nInput: Italy.\n Output: Beijing.\n\n")
INST_1146 = "Now complete the following example -\nInput: Afghanistan.\nOutput: "

# task1159 (a test task): inputs end with "?" (punctuation: no "." added), outputs do not.
DEF_1159 = ('Definition: Two analogies that relate items to the associated containers is given in the form '
            '"A : B. C : ?". "A : B" relates item A to its associated container B. Your task is to replace the '
            'question mark (?) with the appropriate container for the given item C, following the "A : B" '
            'relation.\n\n')
POS_1159 = (" Positive Example 1 -\nInput: soda : can. water : ?\n Output: bottle.\n\n"
            " Positive Example 2 -\nInput: jam : jar. cereal : ?\n Output: box.\n\n")
POS3_1159 = " Positive Example 3 -\nInput: diapers : bag. honey : ?\n Output: bottle.\n\n"
NEG_1159 = (" Negative Example 1 -\nInput: trash : can. plates : ?\n Output: wash.\n\n"
            " Negative Example 2 -\nInput: detergent : bottle. cereal : ?\n Output: cupboard.\n\n")
INST_1159_0 = "Now complete the following example -\nInput: honey : jar. potatoes : ?\nOutput: "

# task363: definition without final punctuation; example inputs end with " ." already.
DEF_363 = ('Definition: In this task, you are given sentences from movie reviews. The task is to classify a '
           'sentence as "POS" if the sentiment of the sentence is positive or as "NEG" if the sentiment of the '
           'sentence is negative.\n\n')
POS_363 = (" Positive Example 1 -\nInput: It 's a lovely film with lovely performances by Buy and Accorsi .\n"
           " Output: POS.\n\n"
           " Positive Example 2 -\nInput: Here 's yet another studio horror franchise mucking up its storyline "
           "with glitches casual fans could correct in their sleep .\n Output: NEG.\n\n")


@pytest.fixture(scope="module")
def sni_dir(shared_data):
    return str(shared_data / "sni_sample")


@pytest.fixture(scope="module")
def sample_tasks(sni_dir):
    return sni.register_sni(sni_dir, BYTE)


def _load(sni_dir, name):
    return sni.load_task_file(sni.task_path(sni_dir, name))


def _examples(task_name, split, n=None):
    ds = seqio.get_mixture_or_task(task_name).get_dataset(None, split=split, shuffle=False, num_epochs=1)
    if n is not None:
        ds = ds.take(n)
    return list(ds.as_numpy_iterator())


def _s(x):
    return x.decode("utf-8") if isinstance(x, bytes) else x


# -------------------------------------------------------------------------------------- registration
def test_sample_registers_every_task_and_both_mixtures(sni_dir, sample_tasks):
    split = sni.read_split(sni_dir)
    assert len(split["train"]) == 24 and len(split["test"]) == 12
    assert sorted(sample_tasks) == sorted(sni.seqio_task_name(n) for n in split["train"] + split["test"])
    assert "sni_task177_para_nmt_paraphrasing" in sample_tasks  # "-" is not allowed in SeqIO names
    train_mix = seqio.get_mixture_or_task("sni_train")
    test_mix = seqio.get_mixture_or_task("sni_test")
    assert sorted(t.name for t in train_mix.tasks) == sorted(sni.seqio_task_name(n) for n in split["train"])
    assert sorted(t.name for t in test_mix.tasks) == sorted(sni.seqio_task_name(n) for n in split["test"])
    assert seqio.get_mixture_or_task("sni_task1146_country_capital").splits == ("train",)
    assert seqio.get_mixture_or_task("sni_task1159_bard_analogical_reasoning_containers").splits == ("test",)


def test_every_sample_file_loads_and_formats(sni_dir):
    split = sni.read_split(sni_dir)
    for name in split["train"] + split["test"]:
        task = _load(sni_dir, name)  # task1331 has "URL": [NaN]: unused metadata, tolerated
        for setting in sni.SETTINGS:
            n_pos, n_neg = sni.setting_counts(setting, 2, 2)
            ex = sni.build_examples(task, name, "test", n_pos, n_neg, max_instances=3)[0]
            assert ex[F.FULL_INPUTS] == ex[F.HYPER_INPUTS] + ex[F.INPUTS]
            assert ex[F.HYPER_INPUTS].startswith("Definition: ")
            assert ex[F.INPUTS].startswith("Now complete the following example -\nInput: ")
            assert ex[F.INPUTS].endswith("\nOutput: ")
            assert ex[F.HYPER_INPUTS].count(" Positive Example ") == min(n_pos, len(task["Positive Examples"]))
            assert ex[F.HYPER_INPUTS].count(" Negative Example ") == min(n_neg, len(task["Negative Examples"]))


def test_categories(sni_dir):
    cats = sni.sni_task_categories(sni_dir)
    assert len(cats) == 36
    assert cats["sni_task1146_country_capital"] == "Misc."
    assert cats["sni_task190_snli_classification"] == "Textual Entailment"
    assert cats["sni_task177_para_nmt_paraphrasing"] == "Paraphrasing"


# ------------------------------------------------------------------------------------------ golden text
@pytest.mark.parametrize("setting, kwargs, hyper", [
    ("def", {}, DEF_1146),
    ("def_pos2", {}, DEF_1146 + POS_1146),
    ("def_pos2_neg2", {}, DEF_1146 + POS_1146 + NEG_1146),
    ("def_pos2", {"add_explanation": True}, DEF_1146 + POS_1146_EXPL),
])
def test_golden_task1146(sni_dir, setting, kwargs, hyper):
    task = _load(sni_dir, "task1146_country_capital")
    n_pos, n_neg = sni.setting_counts(setting, 2, 2)
    texts = formatting.tk_instruct_texts(task, "Afghanistan", num_pos=n_pos, num_neg=n_neg, **kwargs)
    assert texts == {F.HYPER_INPUTS: hyper, F.INPUTS: INST_1146, F.FULL_INPUTS: hyper + INST_1146}


@pytest.mark.parametrize("setting, num_pos, hyper", [
    ("def", 2, DEF_1159),
    ("def_pos2", 2, DEF_1159 + POS_1159),
    ("def_pos2", 3, DEF_1159 + POS_1159 + POS3_1159),   # k configurable
    ("def_pos2_neg2", 2, DEF_1159 + POS_1159 + NEG_1159),
])
def test_golden_task1159_through_seqio(sni_dir, setting, num_pos, hyper):
    prefix = f"golden_{setting}_{num_pos}"
    sni.register_sni(sni_dir, BYTE, setting=setting, num_pos=num_pos, prefix=prefix)
    ex = _examples(f"{prefix}_task1159_bard_analogical_reasoning_containers", "test", n=1)[0]
    assert _s(ex["hyper_inputs_pretokenized"]) == hyper
    assert _s(ex["inputs_pretokenized"]) == INST_1159_0
    assert _s(ex["full_inputs_pretokenized"]) == hyper + INST_1159_0
    assert _s(ex["targets_pretokenized"]) == "sack"
    assert [_s(r) for r in ex[F.REFERENCES]] == ["sack"]
    assert _s(ex[F.TASK_NAME]) == f"{prefix}_task1159_bard_analogical_reasoning_containers"
    assert list(ex[F.HYPER_INPUTS]) == BYTE.encode(hyper) + [1]  # tokenised, EOS appended


def test_golden_task363_train_split_text(sni_dir, sample_tasks):
    # All 100 instances are used (max_train_instances=100), so the first file instance is in there somewhere.
    first = _load(sni_dir, "task363_sst2_polarity_classification")["Instances"][0]
    inst = f"Now complete the following example -\nInput: {first['input']}\nOutput: "  # ends with " ."
    exs = [e for e in _examples("sni_task363_sst2_polarity_classification", "train")
           if _s(e["inputs_pretokenized"]) == inst]
    assert len(exs) == 1
    assert _s(exs[0]["hyper_inputs_pretokenized"]) == DEF_363 + POS_363
    assert _s(exs[0]["full_inputs_pretokenized"]) == DEF_363 + POS_363 + inst
    assert _s(exs[0]["targets_pretokenized"]) == "POS"


def test_examples_that_overflow_are_dropped_like_tk_instruct(sni_dir):
    task = _load(sni_dir, "task1146_country_capital")
    nbytes = lambda s: len(s.encode("utf-8")) + 1  # noqa: E731  byte vocabulary + EOS
    pos1, pos2 = POS_1146.split("\n\n ")[0] + "\n\n", " " + POS_1146.split("\n\n ")[1]
    neg1 = NEG_1146.split("\n\n ")[0] + "\n\n"
    # Room for exactly definition + example 1 + instance: example 2 is dropped.
    limit = nbytes(DEF_1146 + pos1 + INST_1146)
    texts = formatting.tk_instruct_texts(task, "Afghanistan", num_pos=2, num_neg=2, token_length=BYTE_LEN,
                                         max_source_length=limit)
    assert texts[F.HYPER_INPUTS] == DEF_1146 + pos1
    # The collator checks negatives against " ".join(positives): one character more than the real text, so
    # a negative that would fit exactly is still dropped (kept quirk) ...
    exact = nbytes(DEF_1146 + pos1 + pos2 + neg1 + INST_1146)
    texts = formatting.tk_instruct_texts(task, "Afghanistan", num_pos=2, num_neg=2, token_length=BYTE_LEN,
                                         max_source_length=exact)
    assert texts[F.HYPER_INPUTS] == DEF_1146 + pos1 + pos2
    # ... and kept with one more token of room.
    texts = formatting.tk_instruct_texts(task, "Afghanistan", num_pos=2, num_neg=2, token_length=BYTE_LEN,
                                         max_source_length=exact + 1)
    assert texts[F.HYPER_INPUTS] == DEF_1146 + pos1 + pos2 + neg1


def BYTE_LEN(text):  # noqa: N802
    return len(BYTE.encode(text)) + 1


def test_register_drops_examples_with_max_source_length(sni_dir):
    limit = BYTE_LEN(DEF_1159 + POS_1159.split("\n\n ")[0] + "\n\n" + INST_1159_0)
    sni.register_sni(sni_dir, BYTE, setting="def_pos2", max_source_length=limit, prefix="short")
    ex = _examples("short_task1159_bard_analogical_reasoning_containers", "test", n=1)[0]
    assert _s(ex["hyper_inputs_pretokenized"]) == DEF_1159 + POS_1159.split("\n\n ")[0] + "\n\n"


def test_max_instruction_chars_cuts_the_definition(sni_dir):
    task = _load(sni_dir, "task1146_country_capital")
    texts = formatting.tk_instruct_texts(task, "Afghanistan", num_pos=0, max_instruction_chars=12)
    assert texts[F.HYPER_INPUTS] == "Definition: In this task.\n\n"  # cut to "In this task", then "." added


# ----------------------------------------------------------------------------------------------- splits
def test_test_split_keeps_first_100_instances_and_all_references(sni_dir, sample_tasks):
    task = _load(sni_dir, "task1159_bard_analogical_reasoning_containers")
    exs = _examples("sni_task1159_bard_analogical_reasoning_containers", "test")
    assert len(exs) == 100
    for ex, inst in zip(exs, task["Instances"][:100]):
        assert _s(ex["inputs_pretokenized"]) == (
            f"Now complete the following example -\nInput: {inst['input']}\nOutput: ")
        assert [_s(r) for r in ex[F.REFERENCES]] == inst["output"]
        assert _s(ex["targets_pretokenized"]) == inst["output"][0]
    assert [_s(r) for r in exs[4][F.REFERENCES]] == ["jug", "bottle"]


def test_test_split_respects_max_test_instances(sni_dir):
    task = _load(sni_dir, "task039_qasc_find_overlapping_words")
    exs = sni.build_examples(task, "t", "test", 2, 0, max_instances=7)
    assert [e[F.REFERENCES] for e in exs] == [i["output"] for i in task["Instances"][:7]]


def _instance_text(raw_input):
    text = "Input: " + raw_input.strip()
    if text[-1] not in string.punctuation:
        text += "."
    return f"Now complete the following example -\n{text}\nOutput: "


def test_train_split_is_deterministic_from_the_seed(sni_dir):
    task = _load(sni_dir, "task582_naturalquestion_answer_generation")  # several references per instance
    refs_of = {_instance_text(i["input"]): i["output"] for i in task["Instances"]}

    def run(seed):
        exs = sni.build_examples(task, "t", "train", 2, 0, max_instances=30, seed=seed, rng_key="task582")
        return [(e[F.INPUTS], e[F.TARGETS]) for e in exs]

    a, b, c = run(1), run(1), run(2)
    assert a == b and a != c
    assert len(a) == 30 and len({x for x, _ in a}) == 30
    assert all(target in refs_of[x] for x, target in a)
    multi = [(x, t) for x, t in run(1) + run(2) if len(refs_of[x]) > 1]
    assert multi, "the sample should exercise the reference choice"
    assert any(t != refs_of[x][0] for x, t in multi), "references are chosen, not always the first"


def test_registered_train_task_uses_max_train_instances(sni_dir):
    sni.register_sni(sni_dir, BYTE, max_train_instances=5, seed=3, prefix="few")
    a = _examples("few_task1146_country_capital", "train")
    sni.register_sni(sni_dir, BYTE, max_train_instances=5, seed=3, prefix="few")
    b = _examples("few_task1146_country_capital", "train")
    assert len(a) == 5 and [x["inputs_pretokenized"] for x in a] == [x["inputs_pretokenized"] for x in b]
    assert F.REFERENCES not in a[0]


# -------------------------------------------------------------------------------------------- bad input
GOOD_TASK = {
    "Categories": ["Misc."],
    "URL": [float("nan")],
    "Definition": ["Say the word"],
    "Positive Examples": [{"input": "a", "output": "a", "explanation": "same"}],
    "Negative Examples": [{"input": "a", "output": "b", "explanation": "different"}],
    "Instances": [{"id": "x-1", "input": "a", "output": ["a"]}, {"id": "x-2", "input": "b", "output": ["b"]}],
}


def _write_sni(root, tasks, train=None, test=()):
    os.makedirs(root / "tasks", exist_ok=True)
    os.makedirs(root / "splits" / "default", exist_ok=True)
    for name, content in tasks.items():
        text = content if isinstance(content, str) else json.dumps(content)  # json writes nan as NaN
        (root / "tasks" / f"{name}.json").write_text(text)
    train = list(tasks) if train is None else train
    (root / "splits" / "default" / "train_tasks.txt").write_text("\n".join(train) + "\n")
    (root / "splits" / "default" / "test_tasks.txt").write_text("\n".join(test) + "\n")
    return str(root)


def _with(**changes):
    task = json.loads(json.dumps(GOOD_TASK))
    for key, value in changes.items():
        if value is None:
            task.pop(key)
        else:
            task[key] = value
    return task


BAD_CASES = {
    "invalid_json": ('{"Definition": ["x"], "Instances": [}', "invalid JSON"),
    "no_definition": (_with(Definition=None), "'Definition': missing"),
    "no_instances": (_with(Instances=None), "'Instances': missing"),
    "empty_output": (_with(Instances=[{"input": "a", "output": ["a"]}, {"input": "b", "output": []}]),
                     "'Instances[1].output': empty"),
    "blank_outputs": (_with(Instances=[{"input": "a", "output": ["", " "]}]),
                      "'Instances[0].output': every reference is empty"),
    "nan_definition": ('{"Definition": [NaN], "Instances": [{"input": "a", "output": ["a"]}]}',
                       "'Definition[0]': is NaN"),
    "nan_input": ('{"Definition": ["d"], "Instances": [{"input": NaN, "output": ["a"]}]}',
                  "'Instances[0].input': is NaN"),
    "nan_example_output": (_with(**{"Positive Examples": [{"input": "a", "output": float("nan")}]}),
                           "'Positive Examples[0].output': is NaN"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_task_file_error_names_file_and_field(tmp_path, case):
    content, expected = BAD_CASES[case]
    root = _write_sni(tmp_path / "ni", {"task1_good": GOOD_TASK, f"task2_{case}": content})
    names = sni.register_sni(root, BYTE, prefix=f"bad_{case}")  # lazy: registration does not parse
    assert len(names) == 2
    with pytest.raises(sni.SNIFormatError) as err:
        _examples(f"bad_{case}_task2_{case}", "train")
    message = str(err.value)
    assert f"task2_{case}.json" in message and expected in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["invalid_json", "empty_output", "nan_input"])
def test_bad_task_files_skipped_with_warning(tmp_path, monkeypatch, case):
    content, expected = BAD_CASES[case]
    root = _write_sni(tmp_path / "ni", {"task1_good": GOOD_TASK, f"task2_{case}": content})
    warnings = []
    monkeypatch.setattr(sni.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    names = sni.register_sni(root, BYTE, skip_bad_tasks=True, prefix=f"skip_{case}")
    assert names == [f"skip_{case}_task1_good"]
    assert [t.name for t in seqio.get_mixture_or_task(f"skip_{case}_train").tasks] == names
    assert any(f"task2_{case}.json" in w and expected in w for w in warnings), warnings
    assert len(_examples(names[0], "train")) == 2


def test_missing_files_and_directories(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        sni.register_sni(str(tmp_path / "nowhere"), BYTE)
    root = _write_sni(tmp_path / "ni", {"task1_good": GOOD_TASK}, train=["task1_good", "task9_missing"])
    with pytest.raises(FileNotFoundError, match="task9_missing.json"):
        sni.register_sni(root, BYTE, prefix="miss")
    with pytest.raises(FileNotFoundError, match=r"splits/other/train_tasks.txt.*available: \['default'\]"):
        sni.register_sni(root, BYTE, split_name="other")
    warnings = []
    monkeypatch.setattr(sni.logging, "warning", lambda msg, *args: warnings.append(msg % args))
    assert sni.register_sni(root, BYTE, skip_bad_tasks=True, prefix="miss") == ["miss_task1_good"]
    assert any("task9_missing" in w for w in warnings)


def test_bad_arguments():
    with pytest.raises(ValueError, match="setting"):
        sni.setting_counts("pos2", 2, 2)
    with pytest.raises(ValueError, match="num_pos"):
        sni.setting_counts("def_pos2", -1, 2)


def test_no_network_at_import_or_registration(sni_dir, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    importlib.reload(sni)
    sni.register_sni(sni_dir, BYTE, prefix="offline")
    sni.sni_task_categories(sni_dir)
