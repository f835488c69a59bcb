"""The evaluator: adapters generated once per instruction and cached, mixed-task decoding, P3 rank
classification on the real held-out sets, `run_evaluation` on a work directory, clear errors.

Models are tiny random TAGIs (`random_tagi`: random values straight into the parameter shapes, hypernetwork B
heads included, so generated adapters differ between instructions). Every test uses the same T5 config,
lengths, batch size and decode length, so the compiled functions are shared (also with tests/test_api.py,
which imports the helpers of this file).
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import config_dict
from flax import linen as nn
from flax import traverse_util

from tagi_jax.data import batches
from tagi_jax.data import benchmarks
from tagi_jax.eval import adapters as adapters_lib
from tagi_jax.eval import decode as decode_lib
from tagi_jax.eval import generation
from tagi_jax.eval import rank_classification
from tagi_jax.eval import report
from tagi_jax.eval import runner
from tagi_jax.models import predict as predict_lib
from tagi_jax.run import defaults as run_defaults
from tagi_jax.run import stages
from tagi_jax import features as F
from tagi_jax.models import lora, tagi
from tagi_jax.models.hypernet import HyperNetConfig
from tagi_jax.models.t5 import T5
from tagi_jax.models.t5_config import tiny_config
from tagi_jax.vocab import get_vocabulary

# Tiny lengths truncate the longer instructions (P3 templates, two-example definitions): expected here.
pytestmark = pytest.mark.filterwarnings("ignore:generate_task_adapters.*truncated:UserWarning")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 32, "hyper_inputs": 128, "full_inputs": 160, "targets": 16}
BATCH = 4
MAX_DECODE = 12
HYPER = dict(rank=4, lora_alpha=8.0, hidden_dim=16, embed_dim=8, dropout_rate=0.0)


# ----------------------------------------------------------------------------------------------- helpers
def random_params(cfg: tagi.TAGIConfig, seed: int = 0) -> dict:
    """Random values for every parameter of `TAGI(cfg)` (abstract shapes only: no init compilation)."""
    abstract = jax.eval_shape(lambda r: nn.meta.unbox(tagi.init_params(cfg, r)), jax.random.PRNGKey(0))
    rng = np.random.RandomState(seed)
    flat = {}
    for path, x in sorted(traverse_util.flatten_dict(abstract).items()):
        name, shape = path[-1], x.shape
        if name == "scale":
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif name in ("embedding", "layer_embedding", "module_embedding"):
            v = rng.standard_normal(shape)
        elif name == "rel_embedding":
            v = 0.5 * rng.standard_normal(shape)
        elif name in ("A_kernel", "B_kernel", "A_bias", "B_bias"):  # B heads non-zero: adapters differ
            v = 0.1 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            v = 0.1 * rng.standard_normal(shape)
        else:
            v = rng.standard_normal(shape) / np.sqrt(shape[-2])
        flat[path] = jnp.asarray(v, x.dtype)
    return traverse_util.unflatten_dict(flat)


def tagi_config(fusion: str = "prepend", t5=None, targets=lora.DEFAULT_TARGETS, num_teachers: int = 0):
    return tagi.TAGIConfig(t5=t5 or tiny_config(), fusion=fusion, num_teachers=num_teachers,
                           hypernet=HyperNetConfig(adapter_targets=tuple(targets), **HYPER))


def random_tagi(fusion: str = "prepend", seed: int = 0, **kwargs):
    cfg = tagi_config(fusion, **kwargs)
    return tagi.TAGI(cfg), random_params(cfg, seed)


def make_workdir(path: str, fusion: str = "prepend", methods=("tagi",), seed: int = 0, **data) -> dict:
    """A pipeline work directory as launch/train.py leaves it (config.json, tasks.json, Orbax checkpoints of
    the methods' stages), with random parameters; returns {method: params}."""
    import orbax.checkpoint as ocp

    c = run_defaults.default_config()
    c.model.update(tiny_config().to_dict())
    c.hypernet.update(HYPER)
    c.tagi.fusion = fusion
    c.data.lengths.update(LENGTHS)
    c.data.synthetic.update(dict(num_train_tasks=3, num_unseen_tasks=2, train_instances_per_task=4,
                                 eval_instances_per_task=4))
    c.data.update(data)
    c.eval.update(dict(batch_size=BATCH, max_decode_len=MAX_DECODE, beam_size=1, max_examples_per_task=4))
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(c.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(path, "tasks.json"), "w") as f:
        json.dump({"train_task_names": [], "teachers_per": "task", "teacher_keys": [], "categories": {}}, f)
    with open(os.path.join(path, "model_config.json"), "w") as f:
        json.dump(tiny_config().to_dict(), f)
    cfg = run_defaults.tagi_config(c, num_teachers=0)
    out = {}
    for i, method in enumerate(methods):
        params = random_params(cfg, seed + i)
        stage = stages.METHODS[method].stage
        tree = {"student": params, "teacher": params} if stage == "finetune" else params
        with ocp.CheckpointManager(os.path.abspath(os.path.join(path, stage, "checkpoints"))) as manager:
            manager.save(1, args=ocp.args.StandardSave({"params": tree}))
            manager.wait_until_finished()
        out[method] = params
    return out


def task_examples(task: str, definition: str, inputs, answers) -> list[dict]:
    """Synthetic evaluation examples in the Tk-Instruct format; the same inputs can recur across tasks."""
    from tasks.formatting import tk_instance

    hyper = f"Definition: {definition}\n\n"
    return [{F.INPUTS: tk_instance(x), F.HYPER_INPUTS: hyper, F.FULL_INPUTS: hyper + tk_instance(x),
             F.TARGETS: y, F.REFERENCES: [y], F.TASK_NAME: task, "id": f"{task}-{i}", "category": "toy"}
            for i, (x, y) in enumerate(zip(inputs, answers))]


TASKS = {
    "sort": ("Sort the numbers in increasing order.", ["3 1 2", "9 4", "7 5 6", "2 8 1"], ["1 2 3", "4 9", "5 6 7", "1 2 8"]),
    "reverse": ("Reverse the order of the numbers.", ["3 1 2", "9 4", "5 5 1", "6 0"], ["2 1 3", "4 9", "1 5 5", "0 6"]),
    "count": ("Count the numbers.", ["3 1 2", "1 1 1 1", "7", "2 8 1"], ["3", "4", "1", "3"]),
}


def all_examples() -> list[dict]:
    per_task = [task_examples(name, *spec) for name, spec in TASKS.items()]
    return [ex for group in zip(*per_task) for ex in group]  # interleaved: every batch mixes tasks


@pytest.fixture(scope="module")
def vocab():
    return get_vocabulary("byte")


@pytest.fixture(scope="module")
def fused():
    return random_tagi("prepend", seed=0)


# ----------------------------------------------------------------------------------------------- adapters
def test_adapters_generated_once_per_instruction_in_batches(fused, vocab):
    model, params = fused
    instructions = ["Definition: a.", "Definition: b.", "Definition: a.", "Definition: c.", "Definition: d.",
                    "Definition: e.", "Definition: b."]
    table = adapters_lib.generate_task_adapters(model, params, instructions, vocab, LENGTHS["hyper_inputs"], BATCH)
    distinct = list(dict.fromkeys(instructions))
    assert table.generated == len(distinct) == 5 and table.reused == 0
    assert table.generator_calls == 2  # 5 instructions in batches of 4 (the last padded to the same shape)
    assert table.index == {t: i for i, t in enumerate(distinct)}
    assert table.rows(instructions).tolist() == [0, 1, 0, 2, 3, 4, 1]
    # Each row equals the hypernetwork run on that instruction alone (batching and padding change nothing).
    for text in ("Definition: a.", "Definition: e."):
        tokens, _ = decode_lib.tokenize(vocab, [text], LENGTHS["hyper_inputs"])
        ref, states, mask = tagi.generate_adapters(model, params, tokens)
        got = table.adapter(text)
        for target in ref:
            np.testing.assert_allclose(got[target]["A"], ref[target]["A"][0], atol=1e-5)
            np.testing.assert_allclose(got[target]["B"], ref[target]["B"][0], atol=1e-5)
        np.testing.assert_allclose(table.states[table.index[text]], states[0], atol=1e-5)
        np.testing.assert_array_equal(table.mask[table.index[text]], mask[0])
    a, b = table.adapter("Definition: a."), table.adapter("Definition: b.")
    assert np.abs(a["encoder_self.q"]["B"] - b["encoder_self.q"]["B"]).max() > 1e-3


def test_cached_adapters_are_reused_and_invalidated_by_a_new_checkpoint(fused, vocab, tmp_path):
    model, params = fused
    examples = all_examples()
    cache_dir = str(tmp_path / "adapter_cache")
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)

    records1, m1 = generation.evaluate("tagi", model, params, examples, vocab,
                                       cache=adapters_lib.AdapterCache(cache_dir), **kwargs)
    assert m1["adapters_generated"] == 3 and m1["adapters_reused"] == 0 and m1["generator_calls"] == 1
    files = sorted(os.path.relpath(os.path.join(d, f), cache_dir) for d, _, fs in os.walk(cache_dir) for f in fs)
    assert len(files) == 3

    # A second run (a new process would build a new cache object over the same directory) generates none.
    second = adapters_lib.AdapterCache(cache_dir)
    records2, m2 = generation.evaluate("tagi", model, params, examples, vocab, cache=second, **kwargs)
    assert m2["adapters_generated"] == 0 and m2["adapters_reused"] == 3 and m2["generator_calls"] == 0
    assert second.disk_hits == 3
    assert records2 == records1
    # Within a run, the memory cache answers.
    _, m3 = generation.evaluate("tagi", model, params, examples, vocab, cache=second, **kwargs)
    assert m3["adapters_generated"] == 0 and second.memory_hits == 3

    # A changed checkpoint (new hypernetwork weights) never sees the old adapters.
    changed = jax.tree.map(lambda x: x, params)
    changed["hypernet"] = jax.tree.map(lambda x: x * 1.01, params["hypernet"])
    _, m4 = generation.evaluate("tagi", model, changed, examples, vocab,
                                cache=adapters_lib.AdapterCache(cache_dir), **kwargs)
    assert m4["adapters_generated"] == 3 and m4["adapters_reused"] == 0
    assert len(os.listdir(cache_dir)) == 2  # one directory per checkpoint fingerprint
    # The fingerprint covers what adapters depend on (encoder, embeddings, hypernetwork), not the decoder.
    fp = adapters_lib.params_fingerprint(params, model)
    assert adapters_lib.params_fingerprint(changed, model) != fp
    enc_changed = {**params, "t5": {**params["t5"], "encoder": jax.tree.map(lambda x: x + 1e-3, params["t5"]["encoder"])}}
    assert adapters_lib.params_fingerprint(enc_changed, model) != fp
    dec_changed = {**params, "t5": {**params["t5"], "decoder": jax.tree.map(lambda x: x + 1e-3, params["t5"]["decoder"])}}
    assert adapters_lib.params_fingerprint(dec_changed, model) == fp


# ----------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("beam_size", [1, 2])
def test_mixed_task_batches_match_each_task_alone(fused, vocab, beam_size):
    model, params = fused
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE, beam_size=beam_size)
    examples = all_examples()
    records, metrics = generation.evaluate("tagi", model, params, examples, vocab, **kwargs)
    mixed = {r["id"]: r["prediction"] for r in records}
    alone = {}
    for name, spec in TASKS.items():
        recs, _ = generation.evaluate("tagi", model, params, task_examples(name, *spec), vocab, **kwargs)
        alone.update({r["id"]: r["prediction"] for r in recs})
    assert mixed == alone
    # The same input "3 1 2" gets different outputs under different tasks' adapters: a row mix-up would show.
    assert len({mixed["sort-0"], mixed["reverse-0"], mixed["count-0"]}) > 1
    # Records and metrics.
    assert [r["id"] for r in records] == [ex["id"] for ex in examples]
    assert set(records[0]) == {"id", "task_name", "prediction", "references"}
    assert set(metrics["per_task"]) == set(TASKS) and set(metrics["per_category"]) == {"toy"}
    assert metrics["num_examples"] == 12 and metrics["num_tasks"] == 3 and metrics["adapters_generated"] == 3
    assert metrics["examples_per_second"] > 0 and metrics["decoding_seconds"] > 0
    table = report.format_metrics(metrics, title="toy")
    assert "ROUGE-L" in table and "sort" in table and "examples/s" in table


def test_greedy_prediction_matches_direct_student_decoding(fused, vocab):
    """An independent path: TAGI's own `student_decoding_inputs` + `models.predict.predict` on one task's batch."""
    model, params = fused
    examples = task_examples("sort", *TASKS["sort"])
    records, _ = generation.evaluate("tagi", model, params, examples, vocab, lengths=LENGTHS, batch_size=BATCH,
                                     max_decode_len=MAX_DECODE)
    enc, _ = decode_lib.tokenize(vocab, [ex[F.INPUTS] for ex in examples], LENGTHS["inputs"])
    hyper, _ = decode_lib.tokenize(vocab, [ex[F.HYPER_INPUTS] for ex in examples], LENGTHS["hyper_inputs"])
    inputs = tagi.student_decoding_inputs(model, params, {F.ENCODER_INPUT_TOKENS: enc,
                                                           F.HYPER_ENCODER_INPUT_TOKENS: hyper})
    tokens, _ = jax.jit(lambda p, i: predict_lib.predict(T5(model.config.t5), p, **i, max_decode_len=MAX_DECODE))(
        params["t5"], inputs)
    assert [r["prediction"] for r in records] == decode_lib.detokenize(vocab, np.asarray(tokens))


def test_encoder_fusion_model_caches_and_uses_instruction_states(vocab, tmp_path):
    """Encoder fusion keeps the encoded instruction in the adapter table and its disk cache, and the compiled
    decoding/scoring route it into the encoder: the same as TAGI's own student path."""
    model, params = random_tagi("encoder_cross_attention", seed=0)  # random fusion output projections
    examples = task_examples("sort", *TASKS["sort"])
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)
    cache_dir = str(tmp_path / "adapter_cache")
    records, _ = generation.evaluate("tagi", model, params, examples, vocab,
                                     cache=adapters_lib.AdapterCache(cache_dir), **kwargs)
    reread = adapters_lib.AdapterCache(cache_dir)
    entry = reread.get(reread.fingerprint(params, model), examples[0][F.HYPER_INPUTS], LENGTHS["hyper_inputs"])
    assert entry is not None and entry["states"].shape == (LENGTHS["hyper_inputs"], model.config.t5.d_model)
    again, m = generation.evaluate("tagi", model, params, examples, vocab, cache=reread, **kwargs)
    assert m["adapters_reused"] == 1 and again == records  # served from disk, states included

    enc, _ = decode_lib.tokenize(vocab, [ex[F.INPUTS] for ex in examples], LENGTHS["inputs"])
    hyper, _ = decode_lib.tokenize(vocab, [ex[F.HYPER_INPUTS] for ex in examples], LENGTHS["hyper_inputs"])
    inputs = tagi.student_decoding_inputs(model, params, {F.ENCODER_INPUT_TOKENS: enc,
                                                           F.HYPER_ENCODER_INPUT_TOKENS: hyper})
    predict = jax.jit(lambda p, i: predict_lib.predict(T5(model.config.t5), p, **i, max_decode_len=MAX_DECODE)[0])
    tokens = predict(params["t5"], inputs)
    assert [r["prediction"] for r in records] == decode_lib.detokenize(vocab, np.asarray(tokens))
    unfused = predict(params["t5"], dict(inputs, encoder_fusion_states=None, encoder_fusion_mask=None))
    assert not np.array_equal(np.asarray(unfused), np.asarray(tokens))  # the states matter

    table = adapters_lib.generate_task_adapters(model, params, [examples[0][F.HYPER_INPUTS]], vocab,
                                              LENGTHS["hyper_inputs"], BATCH)
    targets, _ = decode_lib.tokenize(vocab, [ex[F.TARGETS] for ex in examples], LENGTHS["targets"])
    dec = decode_lib.shift_right(targets)
    _, mean, _, _ = decode_lib.score_tokens(model, params, table.device_tree(), None, enc, dec, targets,
                                            batch_size=BATCH)
    want = predict_lib.score_targets(T5(model.config.t5), params["t5"], enc, dec, targets,
                                  adapters=inputs["adapters"], encoder_fusion_states=inputs["encoder_fusion_states"],
                                  encoder_fusion_mask=inputs["encoder_fusion_mask"])
    np.testing.assert_allclose(mean, want.mean, rtol=1e-5, atol=1e-5)

def test_baselines_read_their_own_inputs(fused, vocab):
    """concat decodes full_inputs, no_instruction inputs; both without adapters (same as evaluating the
    backbone alone), and no_instruction predictions cannot depend on the task."""
    model, params = fused
    examples = all_examples()
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)
    recs, m = generation.evaluate("no_instruction", model, params, examples, vocab, **kwargs)
    by_id = {r["id"]: r["prediction"] for r in recs}
    assert by_id["sort-0"] == by_id["reverse-0"] == by_id["count-0"]  # same input "3 1 2", no instruction
    assert m["adapters_generated"] == 0
    recs, _ = generation.evaluate("concat", model, params, examples, vocab, **kwargs)
    by_id = {r["id"]: r["prediction"] for r in recs}
    assert len({by_id["sort-0"], by_id["reverse-0"], by_id["count-0"]}) > 1


# ----------------------------------------------------------------------------------------------- P3
def test_p3_rank_classification_on_the_real_held_out_sets(fused, vocab, shared_data):
    from tasks.p3 import register as p3

    model, params = fused
    registered = p3.register_p3_eval(os.path.join(shared_data, "promptsource_templates"),
                                     os.path.join(shared_data, "p3_eval"), vocab, datasets=["rte", "copa"])
    names = [t for ts in registered.values() for t in ts]
    examples = [ex for name in names for ex in batches.eval_examples(name, max_per_task=2)]
    assert {ex[F.TASK_NAME] for ex in examples} == set(names)
    records, metrics = rank_classification.evaluate_rank_classification(
        "tagi", model, params, examples, vocab, lengths=LENGTHS, batch_size=BATCH)

    # Accuracy per template, recomputed from the records.
    assert set(metrics["per_task"]) == set(names)
    for name in names:
        recs = [r for r in records if r["task_name"] == name]
        assert metrics["per_task"][name] == pytest.approx(100 * np.mean([r["choice"] == r["label"] for r in recs]))
    for r, ex in zip(records, examples):
        assert r["prediction"] in ex["answer_choices"] and len(r["scores"]) == len(ex["answer_choices"])
        assert r["choice"] == int(np.argmax(r["scores"]))
    # Aggregation: datasets are means over their templates; the averages are means over datasets.
    summary = metrics["p3"]
    for ds, templates in registered.items():
        assert summary["per_dataset"][ds] == pytest.approx(np.mean([metrics["per_task"][t] for t in templates]))
    assert summary["mtest11_average"] == pytest.approx(np.mean(list(summary["per_dataset"].values())))
    assert "anli_r1" in summary["mtest11_missing"]
    assert metrics["adapters_generated"] == len({ex[F.HYPER_INPUTS] for ex in examples})

    # One choice's score equals a direct teacher-forced computation with the example's own adapter.
    ex, rec = examples[5], records[5]
    hyper, _ = decode_lib.tokenize(vocab, [ex[F.HYPER_INPUTS]], LENGTHS["hyper_inputs"])
    adapters, states, mask = tagi.generate_adapters(model, params, hyper)
    enc, _ = decode_lib.tokenize(vocab, [ex[F.INPUTS]], LENGTHS["inputs"])
    tgt, _ = decode_lib.tokenize(vocab, [ex["answer_choices"][1]], LENGTHS["targets"])
    logits = T5(model.config.t5).apply({"params": params["t5"]}, enc, decode_lib.shift_right(tgt), tgt,
                                       adapters=adapters, extra_encoder_states=states, extra_encoder_mask=mask)
    logp = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    n = int((tgt > 0).sum())
    expected = float(np.mean([logp[0, i, tgt[0, i]] for i in range(n)]))
    assert rec["scores"][1] == pytest.approx(expected, abs=1e-4)
    table = report.format_metrics(metrics)
    assert "MTest11 average" in table and "rte" in table


# ----------------------------------------------------------------------------------------------- work dirs
def test_run_evaluation_on_a_work_directory(vocab, tmp_path):
    workdir = str(tmp_path / "run")
    make_workdir(workdir, "prepend", methods=("tagi",))
    printed = []
    results = runner.run_evaluation(workdir, "tagi", "synthetic", print_fn=printed.append)
    assert set(results) == {"unseen", "seen"}
    assert results["unseen"]["num_tasks"] == 2 and results["seen"]["num_tasks"] == 3
    assert results["seen"]["num_examples"] == 12
    out = os.path.join(workdir, "eval")
    with open(os.path.join(out, "tagi_synthetic_metrics.json")) as f:
        saved = json.load(f)
    assert saved["unseen"]["rougeL"] == results["unseen"]["rougeL"] and "per_category" in saved["seen"]
    with open(os.path.join(out, "tagi_synthetic_unseen_predictions.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 8 and set(lines[0]) == {"id", "task_name", "prediction", "references"}
    assert any("ROUGE-L" in p for p in printed) and any("examples/s" in p for p in printed)
    # A second run reuses the adapters cached in the work directory.
    again = runner.run_evaluation(workdir, "tagi", "synthetic", print_fn=None)
    assert again["unseen"]["adapters_generated"] == 0 and again["seen"]["adapters_generated"] == 0
    assert again["unseen"]["adapters_reused"] == 2
    # Only some tasks.
    task = lines[0]["task_name"]
    only = runner.run_evaluation(workdir, "tagi", "synthetic", tasks=[task], print_fn=None)
    assert list(only) == ["unseen"] and only["unseen"]["num_tasks"] == 1

    # The command line, end to end (a fresh process: the adapters come from the work directory's cache).
    cmd = [sys.executable, os.path.join(REPO, "launch", "eval.py"), f"--workdir={workdir}", "--method=tagi",
           "--benchmark=synthetic", f"--tasks={task}", "--max_examples_per_task=2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "== tagi on synthetic / unseen (1 tasks, 2 examples) ==" in done.stdout
    assert "0 generated / 1 reused" in done.stdout and "ROUGE-L" in done.stdout
    with open(os.path.join(out, "tagi_synthetic_unseen_predictions.jsonl")) as f:
        assert len(f.readlines()) == 2
    bad = subprocess.run(cmd[:3] + ["--method=tagii"], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "error: unknown method 'tagii'" in bad.stderr


# ----------------------------------------------------------------------------------------------- errors
def test_bad_inputs_give_clear_errors(fused, vocab, tmp_path):
    model, params = fused
    kwargs = dict(lengths=LENGTHS, batch_size=BATCH, max_decode_len=MAX_DECODE)
    examples = task_examples("sort", *TASKS["sort"])
    empty = [dict(ex, hyper_inputs="  ") for ex in examples]
    with pytest.raises(ValueError, match=r"instruction 0 \(task 'sort'\) is empty"):
        generation.evaluate("tagi", model, params, empty, vocab, **kwargs)
    with pytest.raises(ValueError, match="instruction 1 is empty"):
        adapters_lib.generate_task_adapters(model, params, ["Definition: x.", ""], vocab, 64, BATCH)
    with pytest.raises(ValueError, match="unknown method 'tagii'; expected one of tagi, hint, concat, no_instruction"):
        generation.evaluate("tagii", model, params, examples, vocab, **kwargs)
    with pytest.raises(KeyError, match="has no 'full_inputs' feature"):
        generation.evaluate("concat", model, params, [{F.INPUTS: "x", F.TASK_NAME: "t"}], vocab, **kwargs)
    with pytest.raises(ValueError, match="unknown task or mixture 'no_such_task'"):
        batches.eval_examples("no_such_task")
    bench = benchmarks.Benchmark(name="synthetic", vocabulary=vocab, categories={},
                                 eval_splits={"unseen": ("a_task",), "seen": ("b_task",)})
    with pytest.raises(ValueError, match="unknown task 'c_task' for benchmark 'synthetic'"):
        bench.select(["c_task"])
    bad_label = [dict(ex, answer_choices=["yes", "no"], label=2) for ex in examples]
    with pytest.raises(ValueError, match="has label 2 but 2 answer choices"):
        rank_classification.evaluate_rank_classification("tagi", model, params, bad_label, vocab, lengths=LENGTHS,
                                                batch_size=BATCH)
    with pytest.raises(FileNotFoundError, match="work directory not found"):
        runner.run_evaluation(str(tmp_path / "nowhere"), "tagi", print_fn=None)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        runner.run_evaluation(str(tmp_path / "empty"), "tagi", print_fn=None)
    with pytest.raises(ValueError, match="unknown benchmark 'glue'"):
        benchmarks.register_benchmark(config_dict.ConfigDict({"benchmark": "glue", "vocabulary": "byte"}))
