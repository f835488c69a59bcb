"""Metrics against values computed by hand: the official SNI scorer's rules and the T0/HyperT5 P3 averages."""
import pytest

from tagi_jax import metrics as M
from tasks.p3.datasets import ANLI_ROUNDS, HYPERT5, MTEST11

# The T0 dataset lists p3_summary averages over (they live with the P3 tasks; metrics takes them as arguments).
P3_LISTS = dict(mtest11=MTEST11, hypert5=HYPERT5, anli_rounds=ANLI_ROUNDS)


# ------------------------------------------------------------------------------------------------ SNI: exact match
def test_normalize_lowercases_strips_punctuation_collapses_whitespace_keeps_articles():
    assert M.normalize_answer("  The  Cat's,\n hat!  ") == "the cats hat"
    assert M.normalize_answer("A dog.") == "a dog"  # the article stays (unlike SQuAD)


def test_exact_match_punctuation_case_whitespace():
    r = M.sni_metrics(["Yes.", "  NO ", "a cat"], [["yes"], ["no!"], ["cat"]])
    # 2 of 3 match after normalisation; "a cat" != "cat" because articles are kept.
    assert r["exact_match"] == pytest.approx(round(100 * 2 / 3, 4))


def test_hyphen_is_removed_for_exact_match_but_splits_tokens_for_rouge():
    # EM: "well-known" -> "wellknown" != "well known"; ROUGE's tokenizer turns "-" into a space: 2/2 tokens.
    r = M.sni_metrics(["well-known"], [["well known"]])
    assert r["exact_match"] == 0.0
    assert r["rougeL"] == pytest.approx(100.0)


# ------------------------------------------------------------------------------------------------ SNI: ROUGE-L
def test_rouge_l_by_hand():
    # pred [the cat sat on the mat] vs ref [the cat is on the mat]: LCS = the cat on the mat = 5 -> P = R = 5/6.
    assert M.rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred [cat on mat] vs ref [the cat is on the mat]: LCS 3, P = 1, R = 1/2, F = 2/3.
    assert M.rouge_l("cat on mat", "the cat is on the mat") == pytest.approx(2 / 3)


def test_rouge_l_uses_the_porter_stemmer():
    # "running" -> "run", "runs" -> "run", "dogs" -> "dog": identical token sequences after stemming.
    assert M.rouge_l("running dogs", "runs dog") == pytest.approx(1.0)
    r = M.sni_metrics(["running dogs"], [["runs dog"]])
    assert r["rougeL"] == pytest.approx(100.0)
    assert r["exact_match"] == 0.0  # exact match does not stem


def test_multiple_references_take_the_best_one():
    preds = ["the cat sat", "blue"]
    refs = [["a dog ran", "the cat sat down"], ["red", "Blue!"]]
    r = M.sni_metrics(preds, refs)
    # instance 1: best ROUGE-L vs "the cat sat down": LCS 3, P 1, R 3/4 -> F = 6/7; EM 0.  instance 2: EM 1, RL 1.
    assert r["rougeL"] == pytest.approx(round(100 * (6 / 7 + 1) / 2, 4))
    assert r["exact_match"] == pytest.approx(50.0)


def test_empty_prediction():
    r = M.sni_metrics(["", ""], [["hello world"], ["..."]])
    # "" vs "hello world": 0 / 0. "" vs "...": both normalise to "" -> exact match, ROUGE-L 0 (no tokens).
    assert r["exact_match"] == pytest.approx(50.0)
    assert r["rougeL"] == 0.0


def test_micro_average_and_per_task_per_category():
    preds = ["yes", "no", "yes", "maybe"]
    refs = [["yes"], ["yes"], ["yes"], ["no"]]
    tasks = ["task1", "task1", "task1", "task2"]
    cats = ["Textual Entailment", "Textual Entailment", "Textual Entailment", "Answer Verification"]
    r = M.sni_metrics(preds, refs, task_names=tasks, categories=cats)
    assert r["exact_match"] == pytest.approx(50.0)           # 2 of 4 instances (micro), not mean of tasks (33.3)
    assert r["per_task"]["task1"]["exact_match"] == pytest.approx(66.6667)  # rounded to 4 decimals, officially
    assert r["per_task"]["task2"]["exact_match"] == 0.0
    assert r["per_task"]["task1"]["rougeL"] == pytest.approx(66.6667)
    assert set(r["per_category"]) == {"textual_entailment", "answer_verification"}
    assert r["per_category"]["textual_entailment"] == r["per_task"]["task1"]


def test_bytes_from_tf_data_are_decoded():
    r = M.sni_metrics([b"Caf\xc3\xa9 au lait"], [[b"caf\xc3\xa9 au lait", "x"]], task_names=[b"task1"])
    assert r["exact_match"] == 100.0 and list(r["per_task"]) == ["task1"]


@pytest.mark.parametrize(
    "preds, refs, match",
    [
        (["a"], ["a"], "is a string"),
        (["a", "b"], [["a"]], "2 predictions but 1"),
        (["a"], [[]], "references\\[0\\] is empty"),
        ([], [], "no predictions"),
    ],
)
def test_sni_bad_input(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        M.sni_metrics(preds, refs)


# ------------------------------------------------------------------------------------------------ rank classification
def test_rank_classification_accuracy():
    scores = [[-0.1, -0.9], [-0.5, -0.2], [-0.3, -0.3, -0.1], [-1.0, -1.0]]
    labels = [0, 0, 2, 1]
    # argmax: 0 (right), 1 (wrong), 2 (right), tie -> first choice 0 (wrong): 2 / 4.
    assert M.rank_classification_accuracy(scores, labels) == pytest.approx(50.0)


def test_rank_classification_bad_input():
    with pytest.raises(ValueError, match="labels\\[0\\]=2 but only 2 choices"):
        M.rank_classification_accuracy([[0.0, 1.0]], [2])
    with pytest.raises(ValueError, match="1 score rows but 2 labels"):
        M.rank_classification_accuracy([[0.0, 1.0]], [0, 1])


def test_group_choice_scores_regroups_the_expanded_layout():
    # rows in any order: (example, choice, score, is_correct)
    rows = [(1, 1, -0.2, False), (0, 0, -1.0, False), (0, 1, -0.5, True), (1, 0, -0.7, True), (1, 2, -3.0, False)]
    scores, labels = M.group_choice_scores(*zip(*rows))
    assert scores == [[-1.0, -0.5], [-0.7, -0.2, -3.0]]
    assert labels == [1, 0]
    assert M.rank_classification_accuracy(scores, labels) == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------------ P3 aggregation
def test_p3_summary_mtest11_vs_hypert5():
    acc = {
        "rte": {"t1": 60.0, "t2": 80.0},        # 70
        "cb": {"a": 50.0},                       # 50
        "anli_r1": {"x": 30.0, "y": 40.0},      # 35
        "anli_r2": {"x": 45.0},                  # 45
        "story_cloze": {"s": 90.0},              # 90
    }
    s = M.p3_summary(acc, **P3_LISTS)
    assert s["per_dataset"] == {"rte": 70.0, "cb": 50.0, "anli_r1": 35.0, "anli_r2": 45.0, "story_cloze": 90.0}
    # MTest11: every present dataset once, ANLI rounds separately, StoryCloze included.
    assert s["mtest11_average"] == pytest.approx((70 + 50 + 35 + 45 + 90) / 5)
    assert s["mtest11_missing"] == ["anli_r3", "copa", "hellaswag", "wsc", "wic", "winogrande"]
    # HyperT5: no StoryCloze, ANLI = mean of its rounds counted once: (70 + 50 + 40) / 3.
    assert s["anli"] == pytest.approx(40.0)
    assert s["hypert5_average"] == pytest.approx(160 / 3)
    assert s["hypert5_missing"] == ["copa", "hellaswag", "wsc", "wic", "winogrande"]


def test_p3_summary_all_eleven():
    values = {d: float(i * 10) for i, d in enumerate(MTEST11)}
    s = M.p3_summary({d: {"t": v} for d, v in values.items()}, **P3_LISTS)
    assert s["mtest11_missing"] == [] and s["hypert5_missing"] == []
    assert s["mtest11_average"] == pytest.approx(sum(values.values()) / 11)
    anli = (values["anli_r1"] + values["anli_r2"] + values["anli_r3"]) / 3
    others = [values[d] for d in ("rte", "cb", "copa", "hellaswag", "wsc", "wic", "winogrande")]
    assert s["hypert5_average"] == pytest.approx((sum(others) + anli) / 8)


def test_p3_summary_from_registered_task_names():
    s = M.p3_summary({"p3_rte_t1": 60.0, "p3_rte_t2": 80.0, "p3_anli_r1_GPT_3_style": 30.0, "p3_wic_x": 55.0},
                     **P3_LISTS)
    assert s["per_dataset"] == {"rte": 70.0, "anli_r1": 30.0, "wic": 55.0}
    assert s["hypert5_average"] == pytest.approx((70 + 30 + 55) / 3)
    with pytest.raises(ValueError, match="cannot tell the dataset of task 'p3_boolq_x'"):
        M.p3_summary({"p3_boolq_x": 1.0}, **P3_LISTS)


def test_p3_summary_empty_and_conflicting():
    s = M.p3_summary({}, **P3_LISTS)
    assert s["mtest11_average"] is None and s["hypert5_average"] is None
    assert len(s["mtest11_missing"]) == 11 and len(s["hypert5_missing"]) == 8
    with pytest.raises(ValueError, match="both 'anli' and per-round"):
        M.p3_summary({"anli": {"t": 1.0}, "anli_r1": {"t": 2.0}}, **P3_LISTS)
