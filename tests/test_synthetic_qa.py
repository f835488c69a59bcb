"""The synthetic closed-book QA suite: determinism, the train/test split, documents, imagined documents,
passages, the pretraining corpus, names and argument checks."""
import collections
import os
import re
import subprocess
import sys
import time

import pytest

from tasks import synthetic_qa as Q

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def suite():
    return Q.make_suite(0, 64)


@pytest.fixture(scope="module")
def big():
    return Q.make_suite(1, 200)


def _states(text, value):
    """Whether `value` occurs in `text` as whole words."""
    return re.search(rf"\b{re.escape(value)}\b", text) is not None


def _sentences(text):
    return re.split(r"(?<=\.) ", text)


def test_interface_basics(suite):
    assert len(Q.ATTRIBUTES) >= 5 and len(set(Q.ATTRIBUTES)) == len(Q.ATTRIBUTES)
    assert len(suite.entities) == 64 and suite.seed == 0 and suite.imagined_accuracy == 0.75
    for entity in suite.entities:
        assert [a for a, _ in entity.facts] == list(Q.ATTRIBUTES)
        assert suite.entity(entity.name) is entity
    for item in suite.train + suite.test:
        assert item.answer == suite.entity(item.entity).fact(item.attribute)
        assert item.entity in item.question and item.question.endswith("?")
        assert item.answer not in item.question
        assert 1 <= len(item.answer.split()) <= 3


def test_value_pools_distinct_and_unambiguous():
    # Pools are what the word-level checks below rely on: no value inside another, within or across pools.
    values = [v.lower() for a in Q.ATTRIBUTES for v in Q._VALUE_POOLS[a]]
    assert len(values) == len(set(values))
    assert all(12 <= len(Q._VALUE_POOLS[a]) <= 30 for a in Q.ATTRIBUTES)
    assert all(1800 <= int(y) <= 1999 and len(y) == 4 for y in Q._VALUE_POOLS["year"])
    for v in values:
        assert not [w for w in values if w != v and v in w], v


def test_deterministic_and_seed_dependent():
    a, b = Q.make_suite(5, 30), Q.make_suite(5, 30)
    assert a == b
    item = a.test[3]
    assert a.document(item.entity) == b.document(item.entity)
    assert a.imagined_document(item) == b.imagined_document(item)
    assert a.passages(item, 4) == b.passages(item, 4)
    assert a.corpus(3) == b.corpus(3)
    c = Q.make_suite(6, 30)
    assert c != a
    assert {e.name for e in c.entities} != {e.name for e in a.entities}
    assert c.corpus() != a.corpus()


def test_deterministic_across_processes():
    # A fresh interpreter with another string-hash seed builds the same texts (no hash() or global random).
    code = ("from tasks.synthetic_qa import make_suite; s = make_suite(2, 10); i = s.test[1]; "
            "print(repr((s.document(i.entity), s.imagined_document(i), s.passages(i, 3), s.corpus(2))))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout.strip()
    s = Q.make_suite(2, 10)
    i = s.test[1]
    assert out == repr((s.document(i.entity), s.imagined_document(i), s.passages(i, 3), s.corpus(2)))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_split(k):
    s = Q.make_suite(3, 40, test_attributes_per_entity=k)
    train_keys = {(i.entity, i.attribute) for i in s.train}
    test_keys = {(i.entity, i.attribute) for i in s.test}
    assert len(train_keys) == len(s.train) and len(test_keys) == len(s.test)
    assert not train_keys & test_keys
    assert len(train_keys | test_keys) == 40 * len(Q.ATTRIBUTES)
    test_count = collections.Counter(i.entity for i in s.test)
    train_count = collections.Counter(i.entity for i in s.train)
    for e in s.entities:
        assert test_count[e.name] == k
        assert train_count[e.name] == len(Q.ATTRIBUTES) - k
    assert {i.attribute for i in s.test} == set(Q.ATTRIBUTES)


def test_questions_have_several_phrasings_shared_by_both_splits(big):
    def phrasings(items, attribute):
        return {i.question.replace(i.entity, "{}") for i in items if i.attribute == attribute}

    for attribute in Q.ATTRIBUTES:
        train, test = phrasings(big.train, attribute), phrasings(big.test, attribute)
        assert len(train | test) >= 2, attribute
        assert test <= train, attribute


def test_documents_state_every_fact(suite):
    first_sentences = set()
    for entity in suite.entities:
        doc = suite.document(entity.name)
        sentences = _sentences(doc)
        assert len(sentences) == len(Q.ATTRIBUTES)
        assert all(entity.name in s and s.endswith(".") for s in sentences)
        for _, value in entity.facts:
            assert sum(_states(s, value) for s in sentences) == 1, (entity.name, value)
        # Only this entity is mentioned.
        assert not [e.name for e in suite.entities if e.name != entity.name and e.name in doc]
        first_sentences.add(sentences[0].replace(entity.name, "").split()[0])
    assert len(first_sentences) >= 3  # the sentence order is shuffled per entity


def test_test_answers_only_in_documents(suite):
    train_keys = {(i.entity, i.attribute) for i in suite.train}
    for item in suite.test:
        doc = suite.document(item.entity)
        stating = [s for s in _sentences(doc) if _states(s, item.answer)]
        assert len(stating) == 1 and item.entity in stating[0]
        assert (item.entity, item.attribute) not in train_keys


def test_example_document_reads_as_sentences():
    s = Q.make_suite(0, 4)
    name = s.entities[0].name
    assert re.fullmatch(rf"({re.escape(name)} |The favorite color of {re.escape(name)} )[^.]+\."
                        rf"( [^.]*{re.escape(name)}[^.]+\.){{{len(Q.ATTRIBUTES) - 1}}}", s.document(name))


def test_imagined_documents_accuracy(big):
    correct = 0
    for item in big.test:
        doc = big.imagined_document(item)
        sentences = _sentences(doc)
        assert doc and 2 <= len(sentences) <= 3
        assert all(item.entity in s for s in sentences)
        correct += _states(doc, item.answer)
    assert abs(correct / len(big.test) - 0.75) <= 0.08


@pytest.mark.parametrize("accuracy", [0.0, 1.0])
def test_imagined_documents_extremes(accuracy):
    s = Q.make_suite(1, 200, imagined_accuracy=accuracy)
    for item in s.test:
        doc = s.imagined_document(item)
        entity = s.entity(item.entity)
        stated = {a: [v for v in Q._VALUE_POOLS[a] if _states(doc, v)] for a in Q.ATTRIBUTES}
        # The queried attribute is always stated, with exactly one value of its own pool.
        assert len(stated[item.attribute]) == 1
        assert 1 <= sum(len(v) == 1 for a, v in stated.items() if a != item.attribute) <= 2
        if accuracy == 1.0:
            assert all(v == [entity.fact(a)] for a, v in stated.items() if v)
        else:
            assert stated[item.attribute] != [item.answer]
            assert not _states(doc, item.answer)


def test_imagined_accurate_sentences_match_gold(suite):
    perfect = Q.make_suite(0, 64, imagined_accuracy=1.0)
    for item in perfect.test[:20]:
        gold = set(_sentences(perfect.document(item.entity)))
        assert set(_sentences(perfect.imagined_document(item))) <= gold


def test_passages(suite):
    documents = {e.name: suite.document(e.name) for e in suite.entities}
    gold_positions = []
    for item in suite.test:
        gold = documents[item.entity]
        passages = suite.passages(item, 5)
        assert len(passages) == 5 and passages.count(gold) == 1
        gold_positions.append(passages.index(gold))
        others = {d for name, d in documents.items() if name != item.entity}
        distractors = [p for p in passages if p != gold]
        assert len(set(distractors)) == 4 and set(distractors) <= others
    assert len(set(gold_positions)) >= 3 and gold_positions.count(0) < len(gold_positions) / 2
    item = suite.test[0]
    assert suite.passages(item, 1) == [documents[item.entity]]
    assert sorted(suite.passages(item, 64)) == sorted(documents.values())


def test_corpus(suite):
    assert sorted(suite.corpus()) == sorted(suite.document(e.name) for e in suite.entities)
    texts = suite.corpus(copies=2)
    assert len(texts) == 2 * 64
    by_entity = collections.defaultdict(list)
    for text in texts:
        mentioned = [e.name for e in suite.entities if e.name in text]
        assert len(mentioned) == 1
        by_entity[mentioned[0]].append(text)
    reordered = 0
    for name, pair in by_entity.items():
        assert len(pair) == 2 and suite.document(name) in pair
        first, second = (_sentences(t) for t in pair)
        assert sorted(first) == sorted(second)
        reordered += first != second
    assert reordered >= 0.9 * 64


def test_names(big):
    names = [e.name for e in big.entities]
    assert len(set(names)) == 200
    assert all(re.fullmatch(r"[A-Z][a-z]{2,} [A-Z][a-z]{2,}", n) for n in names)
    for n in names:
        assert not [m for m in names if m != n and n in m], n
    values = {v.lower() for pool in Q._VALUE_POOLS.values() for v in pool}
    assert not [n for n in names if n.lower() in values or set(n.lower().split()) & values]


def test_vocabulary_covers_every_word(suite):
    vocabulary = set(" ".join(suite.vocabulary_text()).split())
    texts = suite.corpus(2) + [suite.imagined_document(i) for i in suite.test]
    texts += [f"question: {i.question} context: {suite.document(i.entity)}" for i in suite.train + suite.test]
    words = {w.rstrip(".?:") for t in texts for w in t.split()}
    words |= {"question", "context"} | set("0123456789")
    stripped = {w.rstrip(".?:") for w in vocabulary}
    assert words <= stripped, words - stripped


def test_fast():
    start = time.perf_counter()
    Q.make_suite(0, 64)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("kwargs", [
    dict(num_entities=1), dict(num_entities=0),
    dict(test_attributes_per_entity=0), dict(test_attributes_per_entity=len(Q.ATTRIBUTES)),
    dict(imagined_accuracy=-0.1), dict(imagined_accuracy=1.5), dict(imagined_accuracy=float("nan")),
])
def test_bad_suite_arguments(kwargs):
    with pytest.raises(ValueError):
        Q.make_suite(**kwargs)


@pytest.mark.parametrize("num_passages", [0, -1, 65])
def test_bad_num_passages(suite, num_passages):
    with pytest.raises(ValueError, match="num_passages"):
        suite.passages(suite.test[0], num_passages)


def test_unknown_entity(suite):
    with pytest.raises(ValueError, match="Nobody Here"):
        suite.entity("Nobody Here")
    with pytest.raises(ValueError):
        suite.document("Nobody Here")


def test_entity_split_holds_out_whole_entities():
    suite = Q.make_suite(2, 30, imagined_accuracy=0.5, test_entity_fraction=0.2)
    test_entities = {it.entity for it in suite.test}
    train_entities = {it.entity for it in suite.train}
    assert len(test_entities) == 6 and not test_entities & train_entities
    assert len(train_entities) == 24
    assert len(suite.test) == 6 * len(Q.ATTRIBUTES) and len(suite.train) == 24 * len(Q.ATTRIBUTES)
    for item in suite.test:  # the fact is still stated in the entity's document
        assert item.answer in suite.document(item.entity)
    with pytest.raises(ValueError, match="test_entity_fraction"):
        Q.make_suite(0, 10, test_entity_fraction=1.0)
