"""P3 / T0: promptsource templates render the real held-out validation sets as promptsource would.

Golden strings below are written by hand from the templates' jinja and the raw rows of ../shared/data/p3_eval.
"""
import importlib
import json
import os
import socket

import pytest
import seqio

from tagi_jax import features as F
from tagi_jax.metrics import group_choice_scores, rank_classification_accuracy
from tagi_jax.vocab import get_vocabulary
from tasks import common
from tasks.p3 import datasets as p3_datasets
from tasks.p3 import register as p3_register
from tasks.p3 import render as p3_render
from tasks.p3 import templates as p3_templates
from tasks.p3.datasets import MTEST11

# T0's held-out templates with metadata.original_task (promptsource 0.2.3).
ORIGINAL_TASK_TEMPLATES = {"rte": 10, "cb": 15, "copa": 12, "wic": 10, "wsc": 10, "anli_r1": 15, "hellaswag": 4,
                           "winogrande": 5, "story_cloze": 5}
VOCAB = get_vocabulary("byte")


@pytest.fixture(scope="module")
def dirs(shared_data):
    return str(shared_data / "promptsource_templates"), str(shared_data / "p3_eval")


def _templates(templates_dir, dataset):
    spec = p3_datasets.P3_EVAL_DATASETS[dataset]
    return {t.name: t for t in p3_templates.load_templates(templates_dir, spec.templates).select(True)}


def _rows(data_dir, dataset):
    spec = p3_datasets.P3_EVAL_DATASETS[dataset]
    return p3_datasets._read_jsonl(os.path.join(data_dir, dataset, "validation.jsonl"), spec.from_raw,
                                   spec.required_fields)


def _render(dirs, dataset, template_name, row):
    spec = p3_datasets.P3_EVAL_DATASETS[dataset]
    template = _templates(dirs[0], dataset)[template_name]
    return p3_render.render_example(template, _rows(dirs[1], dataset)[row], spec.instance_fields, "t",
                                    with_choices=True)


def _gold_label(dataset, ex):
    if dataset == "winogrande":
        return int(ex["answer"]) - 1
    if dataset == "story_cloze":
        return ex["answer_right_ending"] - 1
    return ex["label"]


# ------------------------------------------------------------------------------------------------ templates
def test_original_task_template_counts(dirs):
    for dataset, n in ORIGINAL_TASK_TEMPLATES.items():
        assert len(_templates(dirs[0], dataset)) == n, dataset


def test_template_yaml_tags_are_parsed(dirs):
    t = _templates(dirs[0], "rte")["MNLI crowdsource"]
    assert t.id == "2b52a83c-0021-41fe-b44c-5aaa076d71a2"
    assert t.answer_choices == "Yes ||| No"
    assert t.metadata.original_task is True and t.metadata.metrics == ("Accuracy",)


def test_missing_templates_dir_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="promptsource templates directory not found"):
        p3_register.register_p3_eval(missing, str(tmp_path), VOCAB)
    (tmp_path / "templates").mkdir()
    with pytest.raises(FileNotFoundError, match="no promptsource templates for 'super_glue/rte'"):
        p3_register.register_p3_eval(str(tmp_path / "templates"), str(tmp_path), VOCAB, datasets=["rte"])


# ------------------------------------------------------------------------------------------------ golden renders
RTE0_PREMISE = ("Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
                "according to the Christopher Reeve Foundation.")


def test_rte_golden(dirs):
    ex = _render(dirs, "rte", "MNLI crowdsource", 0)
    assert ex[F.FULL_INPUTS] == (
        RTE0_PREMISE + ' Using only the above description and what you know about the world, is '
        '"Christopher Reeve had an accident." definitely correct? Yes or no?')
    assert ex[F.HYPER_INPUTS] == ('{premise} Using only the above description and what you know about the world, '
                                  'is "{hypothesis}" definitely correct? Yes or no?')
    assert ex[F.INPUTS] == f"premise: {RTE0_PREMISE}\nhypothesis: Christopher Reeve had an accident."
    assert ex[F.TARGETS] == "No" and ex["answer_choices"] == ["Yes", "No"] and ex["label"] == 1  # not_entailment
    assert ex[F.REFERENCES] == ["No"]
    gpt3 = _render(dirs, "rte", "GPT-3 style", 0)
    assert gpt3[F.FULL_INPUTS] == RTE0_PREMISE + "\nQuestion: Christopher Reeve had an accident. True or False?"
    assert (gpt3[F.TARGETS], gpt3["label"]) == ("False", 1)


def test_cb_golden(dirs):
    ex = _render(dirs, "cb", "always/sometimes/never", 0)
    assert ex[F.FULL_INPUTS] == (
        "Suppose it's true that Valence the void-brain, Valence the virtuous valet. Why couldn't the figger choose "
        'his own portion of titanic anatomy to shaft? Did he think he was helping? Then, is "Valence was helping" '
        "always, sometimes, or never true?")
    assert ex["answer_choices"] == ["Always", "Never", "Sometimes"]
    assert (ex[F.TARGETS], ex["label"]) == ("Never", 1)  # contradiction -> 1


def test_copa_golden_both_question_types(dirs):
    effect = _render(dirs, "copa", "exercise", 0)
    assert effect[F.FULL_INPUTS] == ("Exercise: choose the most plausible alternative.\n\n"
                                     "The man turned on the faucet.  so... \n"
                                     "- The toilet filled with water.\n- Water flowed from the spout.")
    assert effect[F.HYPER_INPUTS] == ("Exercise: choose the most plausible alternative.\n\n"
                                      "{premise}  so... \n- {choice1}\n- {choice2}")
    assert effect[F.TARGETS] == "Water flowed from the spout." and effect["label"] == 1
    assert effect["answer_choices"] == ["The toilet filled with water.", "Water flowed from the spout."]
    cause = _render(dirs, "copa", "exercise", 4)
    assert cause[F.FULL_INPUTS] == ("Exercise: choose the most plausible alternative.\n\n"
                                    "The hamburger meat browned.  because... \n"
                                    "- The cook froze it.\n- The cook grilled it.")
    assert (cause[F.TARGETS], cause["label"]) == ("The cook grilled it.", 1)
    # A template written for effect questions only renders nothing for a cause question: dropped, as in T0.
    name = "\u2026What could happen next, C1 or C2?"
    assert _render(dirs, "copa", name, 4) is None
    assert _render(dirs, "copa", name, 0)[F.FULL_INPUTS] == (
        'The man turned on the faucet. What could happen next, "The toilet filled with water." or '
        '"Water flowed from the spout."?')


def test_wic_wsc_winogrande_storycloze_anli_golden(dirs):
    wic = _render(dirs, "wic", "GPT-3-prompt", 0)
    assert wic[F.FULL_INPUTS] == ("An emerging professional class.\nApologizing for losing your temper, even though "
                                  "you were badly provoked, showed real class.\nQuestion: Is the word 'class' used "
                                  "in the same sense in the two sentences above?")
    assert (wic[F.TARGETS], wic["label"]) == ("No", 0)  # label false
    wsc = _render(dirs, "wsc", "does the pronoun refer to", 0)
    assert wsc[F.FULL_INPUTS].endswith(' him . In the previous sentence, does the pronoun "him" refer to anyone? '
                                       'Yes or no?')
    assert (wsc[F.TARGETS], wsc["label"]) == ("No", 0)
    wino = _render(dirs, "winogrande", "does underscore refer to", 0)
    assert wino[F.FULL_INPUTS] == ("Sarah was a much better surgeon than Maria so _ always got the easier cases. "
                                   "In the previous sentence, does _ refer to Sarah or  Maria?")
    assert (wino[F.TARGETS], wino["label"]) == ("Maria", 1)  # answer "2"
    story = _render(dirs, "story_cloze", "Answer Given options", 0)
    assert story[F.FULL_INPUTS] == (
        "Rick grew up in a troubled household. He never found good support in family, and turned to gangs. It "
        "wasn't long before Rick got shot in a robbery. The incident caused him to turn a new leaf. What is a "
        "possible continuation for the story given the following options ? - He is happy now.\n- He joined a gang.")
    assert (story[F.TARGETS], story["label"]) == ("He is happy now.", 0)  # AnswerRightEnding "1"
    with open(os.path.join(dirs[1], "anli_r1", "validation.jsonl")) as f:
        raw = json.loads(f.readline())
    anli = _render(dirs, "anli_r1", "GPT-3 style", 0)
    assert anli[F.FULL_INPUTS] == f"{raw['context']}\nQuestion: {raw['hypothesis']} True, False, or Neither?"
    assert (anli[F.TARGETS], anli["label"]) == ("False", 2)  # "c" (contradiction) -> 2


def test_wsc_fixed_span_normalisation(dirs):
    rows = _rows(dirs[1], "wsc")
    assert all(ex["span1_text"] in ex["text"] and ex["span2_text"] in ex["text"] for ex in rows)
    fixed = p3_datasets.fix_wsc_spans({"text": "Then the table fell over because it was old.", "span1_index": 1,
                                       "span1_text": "The table.", "span2_index": 5, "span2_text": "it"})
    assert fixed["span1_text"] == "the table"


@pytest.mark.parametrize("dataset", [d for d in MTEST11 if d != "hellaswag"])
def test_answer_choices_line_up_with_labels(dirs, dataset):
    """Every original-task template, first 25 rows: target == answer_choices[label] == the dataset's label."""
    spec = p3_datasets.P3_EVAL_DATASETS[dataset]
    rows = _rows(dirs[1], dataset)[:25]
    rendered = 0
    for template in _templates(dirs[0], dataset).values():
        for ex in rows:
            out = p3_render.render_example(template, ex, spec.instance_fields, "t", with_choices=True)
            if out is None:
                continue
            rendered += 1
            assert out[F.TARGETS] == out["answer_choices"][out["label"]]
            assert out["label"] == _gold_label(dataset, ex), (template.name, ex)
            assert out[F.FULL_INPUTS] and out[F.HYPER_INPUTS] and out[F.INPUTS]
    assert rendered >= 25 * len(_templates(dirs[0], dataset)) // 2


# ------------------------------------------------------------------------------------------------ HellaSwag (no data)
HELLASWAG_ROW = {
    "ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
    "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY",
}


def test_hellaswag_mapping_and_render(dirs, tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "validation.jsonl").write_text(json.dumps(HELLASWAG_ROW) + "\n")
    reg = p3_register.register_p3_eval(dirs[0], str(tmp_path), VOCAB, datasets=["hellaswag"], mixture_name="hs_test")
    assert len(reg["hellaswag"]) == 4
    spec = p3_datasets.P3_EVAL_DATASETS["hellaswag"]
    ex = spec.from_raw(HELLASWAG_ROW)
    assert ex["label"] == "3"  # HF keeps the label as a string
    templates = _templates(dirs[0], "hellaswag")
    out = p3_render.render_example(templates["complete_first_then"], ex, spec.instance_fields, "t", True)
    assert out[F.FULL_INPUTS] == (
        "Complete the description with an appropriate ending:\nFirst, a man is sitting on a roof. Then, he ...\n\n"
        "(a) is using wrap to wrap a pair of skis.\n\n(b) is ripping level tiles off.\n\n"
        "(c) is holding a rubik's cube.\n\n(d) starts pulling up roofing on a roof.")
    assert out[F.HYPER_INPUTS] == (
        "Complete the description with an appropriate ending:\nFirst, {ctx_a} Then, {ctx_b} ...\n\n"
        "(a) {endings[0]}\n\n(b) {endings[1]}\n\n(c) {endings[2]}\n\n(d) {endings[3]}")
    # Only the fields the instruction shows: not ctx or activity_label.
    assert out[F.INPUTS].splitlines()[:2] == ["ctx_a: A man is sitting on a roof.", "ctx_b: he"]
    assert len(out[F.INPUTS].splitlines()) == 6
    assert (out[F.TARGETS], out["label"]) == ("starts pulling up roofing on a roof.", 3)
    # The randomised template picks its prompt from the example deterministically, the same in both renders.
    randomized = templates["Randomized prompts template"]
    a = p3_render.render_example(randomized, ex, spec.instance_fields, "t", True)
    assert a == p3_render.render_example(randomized, ex, spec.instance_fields, "t", True)
    assert a[F.FULL_INPUTS].split("\n")[0] == a[F.HYPER_INPUTS].split("\n")[0]


# ------------------------------------------------------------------------------------------------ registration
@pytest.fixture(scope="module")
def registered(dirs):
    with pytest.warns(UserWarning, match="'hellaswag' skipped"):
        return p3_register.register_p3_eval(dirs[0], dirs[1], VOCAB)


def test_register_eval_all_present_datasets(registered):
    assert set(registered) == set(MTEST11) - {"hellaswag"}
    for dataset, names in registered.items():
        assert len(names) == ORIGINAL_TASK_TEMPLATES.get(dataset, 15) and len(set(names)) == len(names)
        assert all(n.startswith(f"p3_{dataset}_") for n in names)
        assert sorted(t.name for t in seqio.get_mixture_or_task(f"p3_{dataset}").tasks) == sorted(names)
    assert len(seqio.get_mixture_or_task("p3_t0_eval").tasks) == sum(map(len, registered.values()))
    expected = common.output_features(VOCAB)
    for names in registered.values():
        for name in names:
            task = seqio.get_mixture_or_task(name)
            assert set(task.output_features) == set(expected) == set(F.TEXT_FEATURES)
            assert task.splits == ("validation",)


def test_registered_task_dataset_and_rank_classification(registered):
    task = seqio.get_mixture_or_task(registered["cb"][0])
    ds = task.get_dataset(sequence_length=None, split="validation", shuffle=False)
    rows = list(ds.as_numpy_iterator())
    assert len(rows) == 56
    first = rows[0]
    for name in F.STRING_FEATURES:
        assert name in first or f"{name}_pretokenized" in first
    assert first[F.TASK_NAME].decode() == registered["cb"][0]
    assert first["idx"] == 0 and list(first[F.REFERENCES]) == [first["targets_pretokenized"]]
    assert first["answer_choices"][first["label"]] == first["targets_pretokenized"]
    assert first["targets"][-1] == VOCAB.eos_id
    # One row per choice; scoring each choice 1.0 if correct else 0.0 must give 100% back.
    expanded = list(p3_render.expand_rank_classification(ds, VOCAB).as_numpy_iterator())
    assert len(expanded) == sum(len(r["answer_choices"]) for r in rows)
    assert expanded[1]["targets_pretokenized"] == rows[0]["answer_choices"][1]
    assert list(expanded[1]["targets"]) == list(VOCAB.encode(rows[0]["answer_choices"][1].decode())) + [1]
    scores, labels = group_choice_scores([int(r["idx"][0]) for r in expanded], [int(r["idx"][1]) for r in expanded],
                                         [float(r["is_correct"]) for r in expanded],
                                         [bool(r["is_correct"]) for r in expanded])
    assert labels == [int(r["label"]) for r in rows]
    assert rank_classification_accuracy(scores, labels) == 100.0


def test_bad_rows_name_file_line_and_field(dirs, tmp_path):
    (tmp_path / "rte").mkdir()
    path = tmp_path / "rte" / "validation.jsonl"
    path.write_text(json.dumps({"premise": "p.", "hypothesis": "h.", "label": "entailment", "idx": 0}) + "\n"
                    + json.dumps({"premise": "p.", "label": "entailment", "idx": 1}) + "\n")
    reg = p3_register.register_p3_eval(dirs[0], str(tmp_path), VOCAB, datasets=["rte"], mixture_name="bad_rte")
    task = seqio.get_mixture_or_task(reg["rte"][0])
    with pytest.raises(Exception, match=r"validation.jsonl:2: missing field 'hypothesis'"):
        list(task.get_dataset(sequence_length=None, split="validation", shuffle=False).as_numpy_iterator())
    spec = p3_datasets.P3_EVAL_DATASETS["rte"]
    path.write_text(json.dumps({"premise": "p.", "hypothesis": "h.", "label": "maybe", "idx": 0}) + "\n")
    with pytest.raises(ValueError, match=r"validation.jsonl:1: unknown label 'maybe'"):
        list(p3_datasets._iter_jsonl(str(path), spec.from_raw, spec.required_fields))


def test_missing_data_skips_with_warning_and_unknown_dataset(dirs, tmp_path):
    with pytest.warns(UserWarning, match="'cb' skipped: no data at"):
        with pytest.raises(FileNotFoundError, match="no data found"):
            p3_register.register_p3_eval(dirs[0], str(tmp_path), VOCAB, datasets=["cb"])
    with pytest.raises(ValueError, match="unknown dataset"):
        p3_register.register_p3_eval(dirs[0], str(tmp_path), VOCAB, datasets=["boolq"])


# ------------------------------------------------------------------------------------------------ training registry
TOY_TEMPLATES = """\
dataset: toy
subset: null
templates:
  aaaa-1: !Template
    answer_choices: negative ||| positive
    id: aaaa-1
    jinja: 'Review: {{text}} Is this review positive? ||| {{ answer_choices[label] }}'
    metadata: !TemplateMetadata
      choices_in_prompt: false
      metrics:
      - Accuracy
      original_task: true
    name: is positive
    reference: ''
  bbbb-2: !Template
    answer_choices: null
    id: bbbb-2
    jinja: '{{ ["Summarize:", "Sum up:", "Shorten:"] | choice }} {{text}} ||| {{title}}'
    metadata: !TemplateMetadata
      choices_in_prompt: null
      metrics:
      - ROUGE
      original_task: false
    name: summarize
    reference: ''
"""
TOY_ROWS = [{"text": "Great movie.", "title": "Good", "label": 1}, {"text": "Dull plot.", "title": "Bad", "label": 0},
            {"text": "Fine acting.", "title": "Okay", "label": 1}]


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "templates" / "toy").mkdir(parents=True)
    (tmp_path / "templates" / "toy" / "templates.yaml").write_text(TOY_TEMPLATES)
    (tmp_path / "data" / "toy").mkdir(parents=True)
    for split in ("train", "validation"):
        (tmp_path / "data" / "toy" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TOY_ROWS))
    return str(tmp_path / "templates"), str(tmp_path / "data")


def _examples(task_name, split):
    task = seqio.get_mixture_or_task(task_name)
    return list(task.get_dataset(sequence_length=None, split=split, shuffle=False).as_numpy_iterator())


def test_register_p3_train_from_jsonl(toy):
    templates_dir, data_dir = toy
    with pytest.warns(UserWarning, match="'absent' skipped"):
        reg = p3_register.register_p3_train(templates_dir, data_dir, ["toy", "absent"], VOCAB,
                                            splits=("train", "validation"), mixture_name="toy_train")
    assert reg == {"toy": ["p3_train_toy_is_positive", "p3_train_toy_summarize"]}
    assert seqio.get_mixture_or_task("p3_train_toy_summarize").splits == ("train",)  # no choices: no eval split
    train = _examples("p3_train_toy_is_positive", "train")
    assert [r["full_inputs_pretokenized"].decode() for r in train] == [
        "Review: Great movie. Is this review positive?", "Review: Dull plot. Is this review positive?",
        "Review: Fine acting. Is this review positive?"]
    assert [r["targets_pretokenized"] for r in train] == [b"positive", b"negative", b"positive"]
    assert train[0]["hyper_inputs_pretokenized"] == b"Review: {text} Is this review positive?"
    assert train[0]["inputs_pretokenized"] == b"text: Great movie."
    assert "references" not in train[0] and "answer_choices" not in train[0]
    val = _examples("p3_train_toy_is_positive", "validation")
    assert [int(r["label"]) for r in val] == [1, 0, 1] and list(val[0]["answer_choices"]) == [b"negative", b"positive"]
    summ = _examples("p3_train_toy_summarize", "train")
    for r in summ:  # the `choice` filter: seeded per example, the same pick in the prompt and the instruction
        full = r["full_inputs_pretokenized"].decode()
        prefix = [p for p in ("Summarize:", "Sum up:", "Shorten:") if full.startswith(p + " ")]
        assert len(prefix) == 1, full
        assert r["hyper_inputs_pretokenized"].decode() == prefix[0] + " {text}"
    again = _examples("p3_train_toy_summarize", "train")
    assert [r["full_inputs_pretokenized"] for r in summ] == [r["full_inputs_pretokenized"] for r in again]
    assert summ[0]["targets_pretokenized"] == b"Good"


def test_register_p3_train_options(toy):
    templates_dir, data_dir = toy
    reg = p3_register.register_p3_train(templates_dir, data_dir, ["toy"], VOCAB, original_task_only=True,
                                        max_examples_per_task=2, mixture_name="toy_train_small")
    assert reg == {"toy": ["p3_train_toy_is_positive"]}
    assert len(_examples("p3_train_toy_is_positive", "train")) == 2
    with pytest.raises(ValueError, match="field_maps names datasets not in dataset_names"):
        p3_register.register_p3_train(templates_dir, data_dir, ["toy"], VOCAB, field_maps={"other": dict})


def test_register_p3_train_t0_mixing_rates(toy):
    """T0's examples-proportional mixing: rate = the dataset's size, or cap // its templates above the cap."""
    templates_dir, data_dir = toy

    def rates(**kwargs):
        p3_register.register_p3_train(templates_dir, data_dir, ["toy"], VOCAB, mixture_name="toy_mix", **kwargs)
        mixture = seqio.get_mixture_or_task("toy_mix")
        return [mixture.get_rate(t) for t in mixture.tasks]

    assert rates() == [1.0, 1.0]  # no cap: every template alike
    assert rates(mixing_cap=100) == [3.0, 3.0]  # 3 training rows, under the cap
    assert rates(mixing_cap=2) == [1.0, 1.0]  # over the cap: 2 // 2 templates
    assert rates(mixing_cap=100, max_examples_per_task=2) == [2.0, 2.0]  # never above what a task yields
    with pytest.raises(ValueError, match="mixing_cap must be >= 1"):
        rates(mixing_cap=0)


# ------------------------------------------------------------------------------------------------ no network, lazy
def test_registration_reads_no_data_and_no_network(dirs, toy, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access during registration")

    def no_reading(*args, **kwargs):
        raise AssertionError("data read during registration")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    importlib.reload(importlib.import_module("tagi_jax.metrics"))  # import time: no network either
    for module in (p3_templates, p3_datasets, p3_render, p3_register):  # import time too, in dependency order
        importlib.reload(module)
    monkeypatch.setattr(p3_datasets, "_iter_jsonl", no_reading)
    monkeypatch.setattr(p3_datasets, "_iter_tfds", no_reading)
    with pytest.warns(UserWarning):
        p3_register.register_p3_eval(dirs[0], dirs[1], VOCAB, mixture_name="lazy_eval")
    with pytest.warns(UserWarning, match="no TFDS version"):
        reg = p3_register.register_p3_eval(dirs[0], None, VOCAB, datasets=["rte", "story_cloze"], use_tfds=True,
                                           mixture_name="lazy_tfds")
    assert list(reg) == ["rte"]
    monkeypatch.setattr(p3_datasets, "_count_records", no_reading)
    p3_register.register_p3_train(toy[0], toy[1], ["toy"], VOCAB, tfds_names={}, mixing_cap=10,
                                  mixture_name="lazy_train")
    p3_register.register_p3_train(toy[0], None, ["toy"], VOCAB, tfds_names={"toy": "imdb_reviews:1.0.0"},
                                  mixture_name="lazy_train_tfds")
