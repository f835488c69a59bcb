"""The synthetic instruction suite: determinism, disjoint splits, the instruction matters, the feature contract.

The "instruction matters" test scores two predictors with the project's SNI scorer on the very instances the
suite generates: an oracle that reads only the definition text (parses it and executes it) and the best
possible instruction-blind predictor (for each input, the answer most often correct across the tasks that
contain it: on a fixed evaluation set no predictor that sees only the input can exceed its exact match).
"""
import collections
import pathlib
import statistics
import subprocess
import sys

import pytest

from tagi_jax import features as F
from tagi_jax import metrics
from tasks import formatting
from tasks.synthetic import operations as O
from tasks.synthetic import suite as S
from tasks.synthetic.task import SyntheticTask

N_TRAIN, N_EVAL = 40, 20  # instances per task in the module suite


def _build(seed, num_train=60, num_unseen=30):
    # The pool sizes register_synthetic uses for these instance counts.
    return S.build_suite(seed, num_train, num_unseen, train_pool_size=max(200, 5 * N_TRAIN),
                         test_pool_size=max(200, 3 * N_EVAL))


@pytest.fixture(scope="module")
def suite():
    return _build(0)


@pytest.fixture(scope="module")
def full_suite():
    return S.build_suite(0)  # the default size: several hundred tasks


def _snapshot(suite):
    return [
        (t.name, t.definition, t.category, tuple(tuple(sorted(e.items())) for e in t.positive_examples),
         [(i["input"], i["output"][0]) for i in t.instances(O.TEST, 5)])
        for t in suite.tasks
    ]


def _rows(tasks, split, n):
    return [(t, inst["input"], inst["output"][0]) for t in tasks for inst in t.instances(split, n)]


# ----------------------------------------------------------------------------------------------- structure
def test_golden_task_text_and_answers():
    steps = (O.Step("reverse"), O.Step("add", 3))
    definition = O.definition_text(O.NUMBERS, steps)
    assert definition == "Given a list of numbers, reverse the order of the numbers, then add 3 to each number."
    assert O.parse_definition(definition) == (O.NUMBERS, steps)
    assert O.execute(O.NUMBERS, steps, "5 1 9") == "12 4 8"
    rule = (O.Step("any_gt", 20, ("hot", "cold")),)
    assert O.definition_text(O.NUMBERS, rule) == (
        "Given a list of numbers, answer hot if any number is greater than 20, otherwise answer cold.")
    assert [O.execute(O.NUMBERS, rule, x) for x in ("3 25 7", "3 20 7")] == ["hot", "cold"]
    swap = (O.Step("replace_letter", ("a", "o")),)
    assert O.execute(O.WORDS, swap, "cat map dog") == "cot mop dog"
    assert O.execute(O.WORDS, swap, "dog sun") is None  # nothing to replace: not an instance
    assert O.execute(O.NUMBERS, (O.Step("keep_gt", 40),), "3 25 7") is None  # empty answer: not an instance


def test_golden_tk_instruct_features():
    task = SyntheticTask(
        name="reverse_then_add_3", definition=O.definition_text(O.NUMBERS, (O.Step("reverse"), O.Step("add", 3))),
        category="composition", kind=O.NUMBERS, steps=(O.Step("reverse"), O.Step("add", 3)),
        positive_examples=({"input": "1 2 3", "output": "6 5 4"}, {"input": "10 0", "output": "3 13"}),
        seen=True, pools=None)
    ex = S.format_example(task, {"input": "5 1 9", "output": ["12 4 8"]}, num_pos=2, with_references=True)
    instruction = (
        "Definition: Given a list of numbers, reverse the order of the numbers, then add 3 to each number.\n\n"
        " Positive Example 1 -\nInput: 1 2 3.\n Output: 6 5 4.\n\n"
        " Positive Example 2 -\nInput: 10 0.\n Output: 3 13.\n\n")
    instance = "Now complete the following example -\nInput: 5 1 9.\nOutput: "
    assert ex == {F.HYPER_INPUTS: instruction, F.INPUTS: instance, F.FULL_INPUTS: instruction + instance,
                  F.TARGETS: "12 4 8", F.TASK_NAME: "reverse_then_add_3", F.REFERENCES: ["12 4 8"]}
    assert S.format_example(task, {"input": "5 1 9", "output": ["12 4 8"]}, num_pos=0)[F.HYPER_INPUTS] == (
        "Definition: Given a list of numbers, reverse the order of the numbers, then add 3 to each number.\n\n")


def test_full_suite_size_categories_and_parsable_definitions(full_suite):
    assert len(full_suite.train_tasks) == 360 and len(full_suite.unseen_tasks) == 90
    names = full_suite.task_names
    assert len(set(names)) == len(names)
    for tasks in (full_suite.train_tasks, full_suite.unseen_tasks):
        counts = collections.Counter(t.category for t in tasks)
        assert set(counts) == set(O.CATEGORIES)
        assert min(counts.values()) >= len(tasks) // (2 * len(O.CATEGORIES))  # roughly balanced
    for t in full_suite.tasks:
        # The definition alone determines the task (the oracle below relies on it).
        assert O.parse_definition(t.definition) == (t.kind, t.steps), t.name
        assert len(t.positive_examples) == O.NUM_POSITIVE_EXAMPLES
        assert all(t.answer(e["input"]) == e["output"] for e in t.positive_examples)


def test_byte_lengths_within_bounds(full_suite):
    for t in full_suite.tasks:
        assert len(t.definition.encode()) <= O.MAX_DEFINITION_BYTES, t.definition
        splits = (O.TRAIN, O.TEST) if t.seen else (O.TEST,)
        insts = [i for split in splits for i in t.instances(split, 10)] + [
            {"input": e["input"], "output": [e["output"]]} for e in t.positive_examples]
        for inst in insts:
            assert len(inst["input"].encode()) <= O.MAX_INPUT_BYTES, (t.name, inst)
            assert all(len(y.encode()) <= O.MAX_TARGET_BYTES for y in inst["output"]), (t.name, inst)
        ex = S.format_example(t, insts[0], num_pos=2)
        assert len(ex[F.HYPER_INPUTS].encode()) <= O.MAX_HYPER_BYTES, ex[F.HYPER_INPUTS]
        # The build-time byte budget uses the pure-Python mirror of the formatter: it must agree with it.
        assert ex[F.HYPER_INPUTS] == formatting.tk_instruction(t.definition, t.positive_examples[:2])
        assert ex[F.INPUTS] == formatting.tk_instance(insts[0]["input"])


# ------------------------------------------------------------------------------------------ determinism
def test_deterministic_from_seed(suite):
    again = _build(0)
    assert _snapshot(again) == _snapshot(suite)
    t = suite.train_tasks[0]
    assert t.instances(O.TRAIN, N_TRAIN) == again.task(t.name).instances(O.TRAIN, N_TRAIN)
    assert t.instances(O.TRAIN, N_TRAIN, seed=1) != t.instances(O.TRAIN, N_TRAIN)
    other = _build(1)
    assert other.task_names != suite.task_names
    common = [n for n in suite.task_names if n in set(other.task_names)]
    assert common, "seeds 0 and 1 share no task to compare"
    assert any(suite.task(n).instances(O.TEST, 10) != other.task(n).instances(O.TEST, 10) for n in common)


# --------------------------------------------------------------------------------------------- disjoint
def test_train_and_unseen_tasks_disjoint(full_suite):
    train, unseen = full_suite.train_tasks, full_suite.unseen_tasks
    assert not {t.name for t in train} & {t.name for t in unseen}
    assert not {t.identity for t in train} & {t.identity for t in unseen}
    train_steps = [s for t in train for s in t.steps]
    train_params = {(s.op, s.param) for s in train_steps}
    train_labels = {s.labels for s in train_steps if s.labels}
    train_pairs = {(t.steps[0].op, t.steps[1].op) for t in train if len(t.steps) == 2}
    for t in unseen:
        assert t.steps, t.name
        if len(t.steps) == 2:  # an unseen composition of seen operations
            assert (t.steps[0].op, t.steps[1].op) not in train_pairs, t.name
            assert all(s.op in {x.op for x in train_steps} for s in t.steps), t.name
        else:  # an unseen parameter value (or label pair) of a seen operation
            (s,) = t.steps
            assert s.op in {x.op for x in train_steps}, t.name
            assert (s.op, s.param) not in train_params or s.labels not in train_labels, t.name


def test_instances_disjoint_and_unseen_has_no_train_split(suite):
    train_inputs = {i["input"] for t in suite.train_tasks for i in t.instances(O.TRAIN, N_TRAIN)}
    test_inputs = {i["input"] for t in suite.tasks for i in t.instances(O.TEST, N_EVAL)}
    shown = {e["input"] for t in suite.tasks for e in t.positive_examples}
    assert train_inputs and test_inputs
    assert not train_inputs & test_inputs
    assert not shown & (train_inputs | test_inputs)
    for t in suite.train_tasks[:10]:
        assert len(t.instances(O.TRAIN, N_TRAIN)) == N_TRAIN and len(t.instances(O.TEST, N_EVAL)) == N_EVAL
    with pytest.raises(ValueError, match="unseen task"):
        suite.unseen_tasks[0].instances(O.TRAIN, 5)
    with pytest.raises(ValueError, match="unknown split"):
        suite.train_tasks[0].instances("validation", 5)


# ------------------------------------------------------------------------------------ instruction matters
def test_same_input_in_many_tasks_with_different_answers(suite):
    for tasks, split, n, min_tasks in ((suite.train_tasks, O.TRAIN, N_TRAIN, 4),
                                       (suite.train_tasks, O.TEST, N_EVAL, 10),
                                       (suite.unseen_tasks, O.TEST, N_EVAL, 5)):
        answers = collections.defaultdict(list)
        for t, x, y in _rows(tasks, split, n):
            answers[(t.kind, x)].append(y)
        recurring = [v for v in answers.values() if len(v) >= 2]
        assert len(recurring) >= 0.5 * len(answers), split
        assert statistics.median(len(v) for v in recurring) >= min_tasks, split
        assert statistics.median(len(set(v)) / len(v) for v in recurring) >= 0.7, split


def test_instruction_blind_predictor_is_bounded_far_below_the_instruction_following_oracle(suite):
    results = {}
    for label, tasks, split, n in (("seen_train", suite.train_tasks, O.TRAIN, N_TRAIN),
                                   ("seen_eval", suite.train_tasks, O.TEST, N_EVAL),
                                   ("unseen_eval", suite.unseen_tasks, O.TEST, N_EVAL)):
        rows = _rows(tasks, split, n)
        refs = [[y] for _, _, y in rows]
        # Oracle: reads the definition text only.
        oracle = [O.execute(*O.parse_definition(t.definition), x) for t, x, _ in rows]
        # Best instruction-blind predictor on this very set: the most frequent answer for each input.
        by_input = collections.defaultdict(collections.Counter)
        for t, x, y in rows:
            by_input[(t.kind, x)][y] += 1
        blind = [by_input[(t.kind, x)].most_common(1)[0][0] for t, x, _ in rows]
        em = lambda preds: 100.0 * sum(  # noqa: E731
            metrics.exact_match(p, r[0]) for p, r in zip(preds, refs)) / len(refs)
        results[label] = {"oracle_em": em(oracle), "blind_em": em(blind)}
        if split == O.TEST:
            results[label]["blind_rougeL"] = metrics.sni_metrics(blind, refs)["rougeL"]
            results[label]["copy_rougeL"] = metrics.sni_metrics([x for _, x, _ in rows], refs)["rougeL"]
    print(results)
    for label, r in results.items():
        assert r["oracle_em"] == 100.0, label
        assert r["blind_em"] < 30.0, (label, r)
        assert r["oracle_em"] - r["blind_em"] >= 70.0, (label, r)
        if "blind_rougeL" in r:
            assert r["blind_rougeL"] < 40.0 and r["copy_rougeL"] < 45.0, (label, r)


# --------------------------------------------------------------------------------------- the SeqIO tasks
def test_seqio_tasks_round_trip_with_byte_vocabulary():
    import seqio

    from tasks.synthetic.register import register_synthetic  # SeqIO/TF only for this test

    vocab = seqio.ByteVocabulary()
    info = register_synthetic(vocab, seed=0, num_train_tasks=6, num_unseen_tasks=6,
                              train_instances_per_task=3, eval_instances_per_task=2, prefix="syntest")
    suite = info["suite"]
    assert info["task_names"] == info["train_task_names"] + info["unseen_task_names"]
    assert len(info["train_task_names"]) == 6 and len(info["unseen_task_names"]) == 6
    assert set(info["categories"]) == set(info["task_names"])
    assert set(info["categories"].values()) == set(O.CATEGORIES)
    for key, members in (("seen_eval", info["train_task_names"]), ("unseen_eval", info["unseen_task_names"])):
        mixture = seqio.get_mixture_or_task(info["mixtures"][key])
        assert sorted(t.name for t in mixture.tasks) == sorted(members)
    # Training reads the union of the seen tasks' train splits through one task; each example keeps its task.
    train = seqio.get_mixture_or_task(info["mixtures"]["train"])
    assert [t.name for t in train.tasks] == ["syntest_seen_tasks"]
    union = list(train.tasks[0].get_dataset(None, split=O.TRAIN, shuffle=False).as_numpy_iterator())
    per_task = collections.Counter(ex[F.TASK_NAME].decode() for ex in union)
    assert per_task == {name: 3 for name in info["train_task_names"]}
    # Shuffled across tasks at the source (SeqIO's buffer alone would see tasks one after another).
    order = [ex[F.TASK_NAME].decode() for ex in union]
    assert order != sorted(order, key=info["train_task_names"].index)
    first = info["train_task_names"][0]
    task0 = {S.seqio_task_name(t, "syntest"): t for t in suite.train_tasks}[first]
    assert sorted(ex[F.INPUTS + "_pretokenized"].decode() for ex in union if ex[F.TASK_NAME].decode() == first) == \
        sorted(S.format_example(task0, inst, 2)[F.INPUTS] for inst in task0.instances(O.TRAIN, 3, seed=0))
    reference = seqio.get_mixture_or_task(info["task_names"][0]).output_features
    assert set(reference) == set(F.TEXT_FEATURES)
    for name in info["task_names"]:
        feats = seqio.get_mixture_or_task(name).output_features
        assert {k: (type(f.vocabulary), f.add_eos, f.dtype) for k, f in feats.items()} == {
            k: (type(f.vocabulary), f.add_eos, f.dtype) for k, f in reference.items()}

    by_name = {S.seqio_task_name(t, "syntest"): t for t in suite.tasks}
    checks = [(info["train_task_names"][0], O.TRAIN, 3), (info["train_task_names"][1], O.TEST, 2),
              (info["unseen_task_names"][0], O.TEST, 2)]
    for name, split, n in checks:
        task = by_name[name]
        expected = [S.format_example(task, inst, 2, with_references=split == O.TEST, task_name=name)
                    for inst in task.instances(split, n, seed=0)]
        dataset = seqio.get_mixture_or_task(name).get_dataset(None, split=split, shuffle=False)
        got = list(dataset.as_numpy_iterator())
        assert len(got) == n
        for ex, want in zip(got, expected):
            assert ex[F.TASK_NAME].decode() == name
            for feat in F.TEXT_FEATURES:
                text = want[feat]
                assert ex[f"{feat}_pretokenized"].decode() == text
                assert ex[feat].tolist() == [b + 3 for b in text.encode()] + [vocab.eos_id]  # ids = byte + 3
                assert vocab.decode(ex[feat].tolist()) == text
            if split == O.TEST:
                assert [r.decode() for r in ex[F.REFERENCES]] == want[F.REFERENCES]
            else:
                assert F.REFERENCES not in ex


def test_bad_settings_fail_with_a_clear_message():
    assert S.num_positive_examples("def") == 0 and S.num_positive_examples("def_pos2", 3) == 3
    with pytest.raises(ValueError, match="no negative examples"):
        S.num_positive_examples("def_pos2_neg2")
    with pytest.raises(ValueError, match="setting must be one of"):
        S.num_positive_examples("pos2")
    with pytest.raises(ValueError, match="num_pos"):
        S.num_positive_examples("def_pos2", 9)
    with pytest.raises(ValueError, match="num_train_tasks=0"):
        S.build_suite(0, num_train_tasks=0)


def test_import_is_light():
    # Building a suite is pure Python too: no TensorFlow, SeqIO or JAX until tasks are registered.
    code = ("import sys, tasks.synthetic.suite as s; s.build_suite(0, 12, 6); "
            "print(sorted(m for m in ('tensorflow', 'seqio', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(pathlib.Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == "[]"
