"""Open-domain QA: the DPR/SQuAD exact-match normaliser against an independent copy of the official one and
hand-written values, strict reading of the real QA files and of bad ones, and the tasks rendered through SeqIO."""
import importlib
import json
import re
import string

import pytest
import seqio

from tagi_jax import features as F
from tagi_jax import metrics as M
from tagi_jax.data.batches import eval_examples
from tagi_jax.vocab import get_vocabulary
from tasks import qa

BYTE = get_vocabulary("byte")

# NQ-open dev (nq_open/dev.jsonl), first and last lines, copied from the file.
NQ_FIRST = {"question": "when was the last time anyone was on the moon",
            "answer": ["14 December 1972 UTC", "December 1972"]}
NQ_SECOND = {"question": "who wrote he ain't heavy he's my brother lyrics", "answer": ["Bobby Scott", "Bob Russell"]}
NQ_LAST = {"question": "what is the meaning of the name comanche", "answer": ["enemy"]}


# ---- the reference: SQuAD v1.1's official evaluate-v1.1.py `normalize_answer`, verbatim (DPR's exact match) ----
def squad_normalize_answer(s):
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(r'\b(a|an|the)\b', ' ', text)

    def white_space_fix(text):
        return ' '.join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return ''.join(ch for ch in text if ch not in exclude)

    def lower(text):
        return text.lower()

    return white_space_fix(remove_articles(remove_punc(lower(s))))


NFC_E = "Beyonc\u00e9"  # composed é
NFD_E = "Beyonce\u0301"  # e + combining acute accent

# (text, normalised value written by hand)
CASES = [
    ("The Beatles", "beatles"),
    ("beatles", "beatles"),
    ("an apple", "apple"),
    ("A. Lincoln", "lincoln"),              # "a." -> "a" after punctuation removal -> an article
    ("THE Who", "who"),                     # lowercased before the articles go
    ("theatre", "theatre"),                 # "the" inside a word stays
    ("Anne and the man", "anne and man"),
    ("the-end", "theend"),                  # punctuation goes *before* articles: "theend" is no article
    ("U.S.A.", "usa"),
    ("USA", "usa"),
    ("rock 'n' roll", "rock n roll"),
    ("  New\tYork\n\n City  ", "new york city"),
    ("14\u00a0December", "14 december"),    # NBSP is whitespace for str.split
    (NFC_E, "beyonc\u00e9"),
    (NFD_E, "beyonce\u0301"),
    ("1939\u20141945", "1939\u20141945"),   # em dash is not ASCII punctuation: kept
    ("\u201cHey Jude\u201d", "\u201chey jude\u201d"),  # curly quotes kept
    ("Th\u00e9\u00e2tre", "th\u00e9\u00e2tre"),  # é, â are word characters: no article inside
    ("...", ""),
    ("", ""),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_normalizer_matches_hand_values_and_the_official_reference(text, expected):
    assert M.normalize_qa_answer(text) == expected
    assert M.normalize_qa_answer(text) == squad_normalize_answer(text)


def test_no_unicode_normalisation_as_in_dpr():
    """DPR's exact match compares the strings as they are: a decomposed accent differs from a composed one."""
    assert M.qa_exact_match(NFC_E, [NFD_E]) == 0.0
    assert M.qa_exact_match(NFC_E, ["beyonc\u00e9!"]) == 1.0
    assert M.qa_exact_match("Beyonce", [NFC_E]) == 0.0


def test_sni_normalizer_is_unchanged():
    assert M.normalize_answer("The Beatles") == "the beatles"
    assert M.exact_match("The Beatles", "beatles") == 0.0
    assert M.qa_exact_match("The Beatles", ["beatles"]) == 1.0


def test_exact_match_is_the_max_over_references():
    assert M.qa_exact_match("Beatles", ["Rolling Stones", "the beatles!"]) == 1.0
    assert M.qa_exact_match("Beatles", ["Rolling Stones", "Beatle"]) == 0.0
    assert M.qa_exact_match(b"the Saint Lawrence River.", [b"Saint Lawrence River"]) == 1.0  # bytes as tf.data gives
    r = M.qa_metrics(["The Saint Lawrence River.", "x", "USA", "an"],
                     [["the Saint Lawrence River"], ["y"], ["U.S.A.", "America"], ["the"]])
    assert r == {"em": 75.0}


@pytest.mark.parametrize("predictions,references,message", [
    ([], [], "no predictions"),
    (["a", "b"], [["a"]], "2 predictions but 1 reference lists"),
    (["a"], [[]], r"references\[0\] is empty"),
    (["a", "b"], [["a"], "b"], r"references\[1\] is a string"),
])
def test_qa_metrics_errors(predictions, references, message):
    with pytest.raises(ValueError, match="qa_metrics: " + message):
        M.qa_metrics(predictions, references)


def test_qa_exact_match_errors():
    with pytest.raises(ValueError, match="no references"):
        M.qa_exact_match("a", [])
    with pytest.raises(ValueError, match="is a string"):
        M.qa_exact_match("a", "a")


# ----------------------------------------------------------------------------------------------- reading files
@pytest.fixture(scope="module")
def qa_dir(shared_data):
    path = shared_data / "qa"
    if not path.is_dir():
        pytest.skip(f"QA data not found at {path}")
    return path


def test_read_real_nq_open_dev(qa_dir):
    rows = qa.read_qa_file(str(qa_dir / "nq_open" / "dev.jsonl"))
    assert len(rows) == 3610
    assert rows[0] == NQ_FIRST and rows[1] == NQ_SECOND and rows[-1] == NQ_LAST
    assert qa.read_qa_file(str(qa_dir / "nq_open" / "dev.jsonl"), limit=2) == [NQ_FIRST, NQ_SECOND]


def test_every_listed_file_exists_and_reads(qa_dir):
    sizes = {("nq_open", "validation"): 8757, ("nq_open", "test"): 3610, ("webquestions", "train"): 3417,
             ("webquestions", "validation"): 361, ("webquestions", "test"): 2032,
             ("triviaqa", "validation"): 8837, ("triviaqa", "test"): 11313}
    assert {(d, s) for d, splits in qa.QA_DATASETS.items() for s in splits} == set(sizes)
    for (dataset, split), n in sizes.items():
        assert len(qa.read_qa_file(qa.qa_file(str(qa_dir), dataset, split))) == n


BAD_LINES = {
    "question_missing": ('{"answer": ["x"]}', "'question'", "missing"),
    "question_not_string": ('{"question": 3, "answer": ["x"]}', "'question'", "must be a string, got int"),
    "question_empty": ('{"question": "  ", "answer": ["x"]}', "'question'", "is empty"),
    "answer_missing": ('{"question": "q"}', "'answer'", "missing"),
    "answer_string": ('{"question": "q", "answer": "x"}', "'answer'", "non-empty list of strings, got str"),
    "answer_empty_list": ('{"question": "q", "answer": []}', "'answer'", "empty list"),
    "answer_item_not_string": ('{"question": "q", "answer": ["x", null]}', "'answer[1]'", "got NoneType"),
    "answer_item_empty": ('{"question": "q", "answer": ["x", ""]}', "'answer[1]'", "is empty"),
    "lone_surrogate": ('{"question": "q\\ud83d", "answer": ["x"]}', "'question'", "lone surrogate"),
    "not_an_object": ('["q", ["x"]]', "", "expected a JSON object, got list"),
    "invalid_json": ('{"question": "q", "answer": ["x"]', "", "invalid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_error_names_file_line_and_field(tmp_path, case):
    line, field, why = BAD_LINES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_text(json.dumps(NQ_FIRST) + "\n\n" + line + "\n" + json.dumps(NQ_LAST) + "\n", encoding="utf-8")
    with pytest.raises(qa.QAFormatError) as info:
        qa.read_qa_file(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}:3: ")  # the blank line 2 still counts
    if field:
        assert f"field {field}" in message
    else:
        assert "field" not in message
    assert why in message
    assert qa.read_qa_file(str(path), limit=1) == [NQ_FIRST]  # rows after the limit are not read


# ----------------------------------------------------------------------------------------------- SeqIO tasks
def test_nq_open_task_renders_through_seqio_and_keeps_references(qa_dir):
    names = qa.register_qa(str(qa_dir), ["nq_open"], BYTE, splits=["test"], max_examples=3, prefix="qatest")
    assert names == ["qatest_nq_open_test"]
    task = seqio.get_mixture_or_task("qatest_nq_open_test")
    assert list(task.splits) == ["test"]
    exs = list(task.get_dataset(None, split="test", shuffle=False, num_epochs=1).as_numpy_iterator())
    assert len(exs) == 3
    ex = exs[0]
    question = NQ_FIRST["question"]
    assert ex["inputs_pretokenized"].decode() == "question: " + question
    assert ex["hyper_inputs_pretokenized"].decode() == question
    assert ex["full_inputs_pretokenized"].decode() == "question: " + question
    assert ex["targets_pretokenized"].decode() == "14 December 1972 UTC"
    assert ex[F.TASK_NAME].decode() == "qatest_nq_open_test"
    assert [r.decode() for r in ex[F.REFERENCES]] == NQ_FIRST["answer"]
    assert list(ex[F.INPUTS]) == BYTE.encode("question: " + question) + [1]  # tokenised, EOS appended
    assert list(ex[F.HYPER_INPUTS]) == BYTE.encode(question) + [1]

    # What the evaluator reads, scored with the QA metric.
    rows = eval_examples("qatest_nq_open_test")
    refs = [r[F.REFERENCES] for r in rows]
    assert refs == [NQ_FIRST["answer"], NQ_SECOND["answer"], ["one", "one season"]]
    assert M.qa_metrics([r[0] for r in refs], refs) == {"em": 100.0}
    assert M.qa_metrics([r[-1] + " ." for r in refs], refs) == {"em": 100.0}  # normalisation
    assert M.qa_metrics(["1969", "Elton John", "two"], refs) == {"em": 0.0}


def test_register_every_dataset_and_train_split_has_no_references(qa_dir):
    names = qa.register_qa(str(qa_dir), None, BYTE, max_examples=2, prefix="qaall")
    assert names == ["qaall_nq_open_validation", "qaall_nq_open_test", "qaall_webquestions_train",
                     "qaall_webquestions_validation", "qaall_webquestions_test", "qaall_triviaqa_validation",
                     "qaall_triviaqa_test"]
    train = list(seqio.get_mixture_or_task("qaall_webquestions_train")
                 .get_dataset(None, split="train", shuffle=False, num_epochs=1).as_numpy_iterator())
    assert F.REFERENCES not in train[0]
    assert train[0]["hyper_inputs_pretokenized"].decode() == "what is the name of justin bieber brother?"
    assert train[0]["targets_pretokenized"].decode() == "Jazmyn Bieber"
    assert set(train[0]) >= set(F.TEXT_FEATURES) | {F.TASK_NAME} | {f"{n}_pretokenized" for n in F.TEXT_FEATURES}


def test_missing_file_and_bad_arguments(tmp_path, qa_dir):
    (tmp_path / "nq_open").mkdir()
    (tmp_path / "nq_open" / "dev.jsonl").write_text(json.dumps(NQ_FIRST) + "\n", encoding="utf-8")
    missing = str(tmp_path / "nq_open" / "dpr_dev.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        qa.register_qa(str(tmp_path), ["nq_open"], BYTE, prefix="qamiss")
    assert qa.register_qa(str(tmp_path), ["nq_open"], BYTE, splits=["test"], prefix="qamiss") == ["qamiss_nq_open_test"]
    with pytest.raises(FileNotFoundError, match="directory not found"):
        qa.register_qa(str(tmp_path / "nowhere"), ["nq_open"], BYTE)
    with pytest.raises(ValueError, match="unknown dataset"):
        qa.register_qa(str(qa_dir), ["squad"], BYTE)
    with pytest.raises(ValueError, match="unknown split"):
        qa.register_qa(str(qa_dir), ["nq_open"], BYTE, splits=["dev"])
    with pytest.raises(ValueError, match="none of"):
        qa.register_qa(str(qa_dir), ["nq_open"], BYTE, splits=["train"])
    with pytest.raises(ValueError, match="max_examples"):
        qa.register_qa(str(qa_dir), ["nq_open"], BYTE, max_examples=0)


def test_nothing_is_registered_at_import():
    before = set(seqio.TaskRegistry.names())
    importlib.reload(qa)
    assert set(seqio.TaskRegistry.names()) == before
