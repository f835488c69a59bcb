"""Smoke tests of the benchmarks (bench/): each core function runs on a tiny config and returns sane numbers.

Not timed tests: wall times are only checked to be positive. The FLOP model is checked against XLA's cost
analysis of the executables that run (an independent count), the TAGI path against the bound's premise (it
costs less than concatenation) and the mixed-batch paths against each other (merged == factorised).
"""
from __future__ import annotations

import pathlib
import sys

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import _common as C  # noqa: E402
from bench import inference_cost as IC  # noqa: E402
from bench import mixed_batch as MB  # noqa: E402

TINY = dict(d_model=32, layers=2, heads=2, d_kv=16, d_ff=64)


def test_bucket_length_by_hand():
    # 4 lengths per power of two, at least the minimum.
    assert [C.bucket_length(n) for n in (1, 16, 17, 33, 64, 65, 66, 100, 129, 700, 900, 1024, 1025)] == \
        [16, 16, 20, 40, 64, 80, 80, 112, 160, 768, 1024, 1024, 1280]
    assert C.bucket_length(5, minimum=8) == 8
    for n in range(1, 3000):
        b = C.bucket_length(n)
        assert n <= b <= max(16, 1.25 * n + 1)


@pytest.fixture(scope="module")
def vocab():
    from tagi_jax.vocab import get_vocabulary

    return get_vocabulary("byte")


def _check_suite(results, settings):
    m = IC.summarize(results)
    assert m["instances"] == sum(r.instances for r in results) > 0
    assert m["bound"] > 1.0
    # TAGI encodes the instance only: strictly cheaper than concatenation, on both counts.
    assert m["flops_ratio"] > 1.0 and m["encoder_ratio"] > 1.0
    assert m["xla_ratio"] > 1.0
    for key in ("tagi", "concat"):
        assert 0.97 < m[f"xla_{key}"] / m[f"flops_{key}"] < 1.2, (key, m[f"xla_{key}"], m[f"flops_{key}"])
    assert m["seconds_tagi"] > 0 and m["seconds_concat"] > 0 and m["time_ratio"] > 0
    text = IC.report("suite", results, settings)
    assert "FLOPs ratio (concat / TAGI)" in text and "bound (t + i) / i" in text
    return m


@pytest.mark.parametrize("adapter", ["merged", "factorised"])
def test_inference_cost_synthetic_score_fusion(vocab, adapter):
    tasks = IC.synthetic_tasks(num_tasks=1, instances=4)
    assert len(tasks) == 1 and len(tasks[0].inputs) == 4
    assert tasks[0].full_inputs[0] == tasks[0].instruction + tasks[0].inputs[0]
    m, scores = {}, {}
    for fusion_kv in ("task", "instance"):
        s = IC.Settings(**TINY, rank=4, hyper_hidden=16, hyper_embed=8, batch_size=4, mode="score",
                        adapter=adapter, fusion="prepend", fusion_kv=fusion_kv)
        bench = IC.InferenceCost(s)
        m[fusion_kv] = _check_suite(IC.measure_suite(bench, tasks, vocab, repeats=1), s)
        assert m[fusion_kv]["tagi_fusion"] > 0 and m[fusion_kv]["tagi_hypernet"] > 0
        scores[fusion_kv] = np.concatenate([np.asarray(x) for x in bench.tagi_task(IC.prepare(tasks[0], vocab, s))])
    # The instruction's keys/values once per task (measured, both counts) beat once per instance, and the same
    # scores come out (the per-instance path is the reference).
    np.testing.assert_allclose(scores["task"], scores["instance"], rtol=1e-5, atol=1e-4)
    for key in ("flops_ratio", "xla_ratio"):
        assert m["task"][key] > m["instance"][key]
    assert m["task"]["tagi_instruction_kv"] > 0 and m["instance"]["tagi_instruction_kv"] == 0
    assert m["task"]["flops_ratio_no_fusion"] >= m["task"]["flops_ratio"]


def test_inference_cost_sni_greedy_factorised_no_fusion(vocab, shared_data):
    s = IC.Settings(**TINY, rank=4, hyper_hidden=16, hyper_embed=8, batch_size=4, mode="greedy", decode_len=3,
                    adapter="factorised", fusion="none")
    tasks = IC.sni_tasks(shared_data / "sni_sample", num_tasks=1, instances=4)
    assert len(tasks) == 1 and len(tasks[0].inputs) == 4
    bench = IC.InferenceCost(s)
    results = IC.measure_suite(bench, tasks, vocab, repeats=1)
    m = _check_suite(results, s)
    assert m["tagi_fusion"] == 0 and m["tagi_adapter"] > 0
    # Real SNI instructions are much longer than the instances: the saving is large.
    assert m["bound"] > 2.0 and m["flops_ratio"] > 2.0


def test_inference_cost_rejects_bad_settings():
    with pytest.raises(ValueError, match="--mode"):
        IC.Settings(mode="beam")
    with pytest.raises(ValueError, match="--batch_size"):
        IC.Settings(batch_size=0)


def test_mixed_batch_paths():
    s = MB.Settings(**TINY, rank=4, batch_size=3, input_len=12, decode_len=3, repeats=1)
    bench = MB.MixedBatch(s)
    # The merged path runs the very adapter the shared path applies factorised.
    merged = np.asarray(bench.runner("merged", "encode")())
    shared = np.asarray(bench.runner("shared", "encode")())
    plain = np.asarray(bench.runner("none", "encode")())
    np.testing.assert_allclose(merged, shared, rtol=1e-4, atol=1e-5)
    assert not np.allclose(merged, plain, atol=1e-4)

    result = MB.measure(s, bench=bench)
    for path in MB.PATHS:
        assert result[path]["examples_per_s"] > 0 and result[path]["seconds"] > 0
    assert result["merged"]["flops"] == result["none"]["flops"] < result["per-example"]["flops"]
    assert result["per-example"]["step_bytes_adapters"] == \
        s.batch_size * result["shared"]["step_bytes_adapters"] > 0
    text = MB.report(result, s)
    assert "ratio (per-example / merged)" in text
    assert np.isfinite(MB.loss_percent(result))

    # The prototype fix (factors split by layer before the loop) decodes the same tokens.
    params, adapters = bench.inputs("per-example")
    presplit = bench.compiled.get("presplit", bench._greedy_presplit, params, adapters, bench.tokens)
    np.testing.assert_array_equal(np.asarray(presplit(params, adapters, bench.tokens)),
                                  np.asarray(bench.runner("per-example")()))

    # The loop inspection finds the decoding loop; it sees no adapter slices without adapters, and never more
    # slice bytes per step than the decoder's per-example factors hold.
    merged_copies = MB.loop_body_copies(bench.executable("merged").as_text(), s.input_len)
    copies = MB.loop_body_copies(bench.executable("per-example").as_text(), s.input_len)
    assert merged_copies and copies, "no while loop in the compiled greedy decoder"
    assert merged_copies["adapter_slices"] == 0
    decoder_factor_mb = sum(np.asarray(bench.per_example[t][k]).nbytes for t in bench.per_example
                            if t.startswith("decoder") for k in ("A", "B")) / 1e6
    assert 0 <= copies["adapter_slice_mb"] <= decoder_factor_mb


def test_every_ablation_variant_is_a_valid_demo_config():
    """Each variant's overrides name real keys with the right types and pass the run config's checks, and each
    changes what it says (a typo'd or mistyped key would only fail after an hour of training)."""
    from bench import ablations
    from tagi_jax.run import defaults

    settings = ablations.Settings(pretrain_steps=3, finetune_steps=5)
    full = ablations.variant_config(settings, "full")
    expected = {"no_kl": ("loss", "lambda_kl", 0.0), "no_l_ins": ("loss", "lambda_ins", "0"),
                "relative_l_ins": ("loss", "alignment_reduction", "relative"), "no_fusion": ("tagi", "fusion", "none"),
                "backbone_none": ("tagi", "train_backbone", "none"), "bottleneck_generator": ("hypernet", "head", "bottleneck")}
    for name in ablations.VARIANTS:
        c = ablations.variant_config(settings, name)
        defaults.validate(c)
        assert c.stages.finetune.train.steps == 5 and c.pipeline.evaluate == ("tagi",)
        if name in expected:
            section, key, value = expected[name]
            assert c[section][key] == value != full[section][key], name
    assert defaults.lambda_ins(ablations.variant_config(settings, "no_l_ins")) == 0.0
    assert ablations.variant_config(settings, "no_pretraining").pipeline.stages == ("finetune",)
    with pytest.raises(ValueError, match="unknown"):
        ablations.Settings(variants="full,typo")


def test_speed_levers_train_the_same_model():
    """Each lever changes how the step runs, not what it computes: after one AdamW update, the step-1 loss of
    rematerialisation and `jax.nn.dot_product_attention` equal the baseline's to float
    noise, bfloat16's to its rounding; the report names every lever."""
    from bench import _torch_pairs as P
    from bench import speed_levers as SL

    settings = SL.Settings(tiny=True, levers="baseline,bfloat16,remat_full,attention_xla",
                           variants="full_finetune", repeats=1)
    batch = P.make_batch(settings.shapes, settings.seed)
    losses = {}
    for lever in settings.levers.split(","):
        step = SL.build_step("full_finetune", lever, settings, batch)
        step()
        step()  # the loss of the second call is computed after one update
        losses[lever] = float(step.last_loss)
    assert np.isfinite(losses["baseline"]) and losses["baseline"] > 1.0
    for lever in ("remat_full", "attention_xla"):
        assert abs(losses[lever] - losses["baseline"]) < 1e-5, (lever, losses)
    assert 1e-6 < abs(losses["bfloat16"] - losses["baseline"]) < 0.02 * losses["baseline"], losses
    rows = [{"variant": "full_finetune", "lever": lever, "times": [t], "loss0": 1.0, "temp_mb": 1.0, "total_mb": 2.0}
            for lever, t in (("baseline", 2.0), ("bfloat16", 1.0))]
    assert "speedup full_finetune bfloat16 = 2.00" in SL.report(rows)


@pytest.mark.parametrize("script, flags, message", [("speed_levers", ["--levers=fast"], "--levers"),
                                                    ("speed_levers", ["--levers=bfloat16"], "must include baseline"),
                                                    ("speed_levers", ["--repeats=x"], "invalid int value"),
                                                    ("mfu", ["--dtype=float16"], "--dtype"),
                                                    ("mfu", ["--variants=lora"], "--variants")])
def test_bench_bad_flags_exit_2_with_one_line(script, flags, message, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"bench.{script}").main(flags)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


# ---------------------------------------------------------------------------------------- the GPU check
def test_mfu_peak_table_and_report_by_hand():
    """Peaks from the vendors' data sheets (dense bf16); MFU = FLOPs / step time / peak, written out here."""
    from bench import mfu

    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert mfu.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert mfu.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert mfu.peak_tflops("cpu") is None
    lines = mfu.report("tagi", {"median": 0.5, "min": 0.4, "flops": 2.0e14, "loss0": 3.0}, 800.0)
    assert lines[0].startswith("step_s tagi = 0.5000")
    assert lines[1].startswith("tflops_per_s tagi = 400.00")  # 2e14 FLOP / 0.5 s
    assert lines[2] == "mfu tagi = 0.500"  # 400 / 800
    assert mfu.report("tagi", {"median": 1.0, "min": 1.0, "flops": 1e12, "loss0": 1.0}, None)[2].startswith(
        "mfu tagi = n/a")


def test_mfu_runs_tiny_on_cpu(capsys):
    """The script's real path at tiny shapes: both steps compile and run, one line per figure, and the XLA
    FLOPs of the TAGI step (student + teacher forward, student backward) exceed the full fine-tuning step's."""
    from bench import mfu

    mfu.main(["--tiny", "--dtype=float32", "--repeats=1", "--peak_tflops=1"])
    out = capsys.readouterr().out.splitlines()
    figures = {tuple(line.split(" = ")[0].split()): line.split(" = ")[1] for line in out if " = " in line
               and line.split()[0] in ("step_s", "tflops_per_s", "mfu")}
    assert set(figures) == {(k, v) for k in ("step_s", "tflops_per_s", "mfu") for v in ("tagi", "full_finetune")}
    assert all(float(figures[("step_s", v)].split()[0]) > 0 for v in ("tagi", "full_finetune"))
    flops = {v: float(figures[("tflops_per_s", v)].split("(")[1].split()[0]) for v in ("tagi", "full_finetune")}
    assert flops["tagi"] > flops["full_finetune"] > 0, flops


def test_gpu_check_refuses_without_a_gpu():
    """Here (no GPU, no install) the script stops at once with one `error:` line and a non-zero status."""
    import os
    import subprocess

    env = dict(os.environ, GPU_CHECK_NO_INSTALL="1", GPU_CHECK_PYTHON=sys.executable)
    out = subprocess.run(["bash", str(REPO_ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                         env=env, timeout=300)
    err = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1 and err == [
        "error: gpu_check: jax sees no GPU (JAX_PLATFORMS=cuda); install a CUDA jax wheel or run on a GPU machine"]
    assert "gpu_check: tests" not in out.stdout


def test_fit_table_row_from_a_compile_line():
    """bench/fit_table.py turns launch/compile.py's per-program line (compile_plan.format_report) into a row."""
    from bench import fit_table
    from tagi_jax.run import compile_plan, topologies

    report = compile_plan.ProgramReport(
        stage="finetune", program="decode tagi", params=0.5 * topologies.GIB, opt_state=0.0, batch=0.0,
        arguments=1.0 * topologies.GIB, outputs=0.25 * topologies.GIB, aliased=0.0, temporaries=2.0 * topologies.GIB,
        code=0.25 * topologies.GIB, flops=3.0e12, bytes_accessed=0.0, compile_seconds=12.0, hbm=16 * topologies.GIB)
    line = compile_plan.format_report(report, topologies.parse_topology("v5e-8"), 0.9)
    row = fit_table.table_row("sni_t5_lm.py:base", "v5e-8", line)
    assert row == "| sni_t5_lm.py:base | v5e-8 | finetune | decode tagi | 3.50 / 16.0 | yes | 3.00 | 15.2ms |", row
    assert fit_table.table_row("sni_t5_lm.py:base", "v5e-8", "v5e-8: 8 devices, mesh data=-1") is None
