"""Ahead-of-time planning (`launch/compile.py`, `tagi_jax.run.compile_plan`): every stage compiles from abstract
shapes on the 8 fake CPU devices, the per-chip figures follow the shardings, a too-small HBM budget fails naming
the stage; with libtpu, the same compiles for a TPU slice. Rematerialisation leaves gradients unchanged."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tagi_jax.config import load_config
from tagi_jax.models import t5 as t5_lib
from tagi_jax.models.t5_config import t5_v1_1_config, tiny_config as tiny_t5
from tagi_jax.run import compile_plan, stages, topologies
from tagi_jax.trainer.config import validate_trainer_config
from tests.test_pipeline import REPO, tiny_config

COMPILE = os.path.join(REPO, "launch", "compile.py")


@pytest.fixture(scope="module")
def cpu_reports():
    c = tiny_config()
    return c, compile_plan.plan(c, jax.devices()[:8], 16 * topologies.GIB)


def test_every_stage_and_method_compiles_with_memory_figures(cpu_reports):
    config, reports = cpu_reports
    programs = {(r.stage, r.program) for r in reports}
    assert {(s, "train") for s in stages.STAGES} <= programs
    assert ("finetune", "diagnostics") in programs
    assert {(stages.METHODS[m].stage, f"decode {m}") for m in config.pipeline.evaluate} <= programs
    for r in reports:
        assert r.arguments > 0 and r.total >= r.arguments - r.aliased and r.flops > 0, (r.stage, r.program)
        assert r.fits(0.9)
    train = {r.stage: r for r in reports if r.program == "train"}
    # The donated state is aliased by the new state: counted once.
    assert train["finetune"].aliased > 0
    # Frozen parameters have no optimizer state: the teachers stage keeps Adam moments of its table only.
    assert 0 < train["teachers"].opt_state < 2 * train["teachers"].params


def test_per_chip_bytes_follow_the_shardings():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "model"))
    spec = jax.sharding.PartitionSpec
    split = jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=jax.sharding.NamedSharding(mesh, spec("data", "model")))
    rows = jax.ShapeDtypeStruct((64, 32), jnp.bfloat16, sharding=jax.sharding.NamedSharding(mesh, spec("data")))
    whole = jax.ShapeDtypeStruct((10,), jnp.int32, sharding=jax.sharding.NamedSharding(mesh, spec()))
    assert compile_plan.per_device_bytes([split, rows, whole]) == 64 * 32 * 4 / 8 + 64 * 32 * 2 / 4 + 40


def test_topologies_parse_as_the_cloud_names_them():
    assert topologies.parse_topology("v5e-8").topology_name == "v5e:2x4"
    assert topologies.parse_topology("v5e-256").topology_name == "v5e:16x16"
    v4 = topologies.parse_topology("v4-16")  # 16 TensorCores = 8 chips
    assert (v4.chips, v4.topology_name, v4.chip.hbm_gib) == (8, "v4:2x2x2", 32)
    assert topologies.parse_topology("v4-128").topology_name == "v4:4x4x4"
    for bad in ("v5e", "v7-8", "v5e-12"):
        with pytest.raises(ValueError, match="--topology"):
            topologies.parse_topology(bad)


def test_published_t5_sizes():
    # T5 v1.1 XL's 2.85 B parameters (the published count) from its shapes.
    abstract = jax.eval_shape(lambda r: t5_lib.init_params(t5_v1_1_config("xl"), r), jax.random.key(0))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))
    assert 2.84e9 < n < 2.86e9


@pytest.mark.parametrize("policy", ["full", "dots", "dots_with_no_batch_dims"])
def test_rematerialisation_leaves_the_gradient_unchanged(policy):
    rng = np.random.RandomState(0)
    enc = jnp.asarray(rng.randint(1, 300, (2, 7)))
    dec = jnp.asarray(rng.randint(1, 300, (2, 5)))
    base = tiny_t5()
    params = jax.tree.map(lambda x: getattr(x, "value", x), t5_lib.init_params(base, jax.random.key(0), batch=2,
                          enc_len=7, dec_len=5), is_leaf=lambda x: hasattr(x, "value"))

    def loss(p, cfg):
        return jnp.mean(t5_lib.T5(cfg).apply({"params": p}, enc, dec, dec) ** 2)

    remat = base.replace(remat_policy=policy)
    jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, remat))
    assert "remat" in jaxpr or "checkpoint" in jaxpr
    expected = jax.grad(loss)(params, base)
    got = jax.grad(loss)(params, remat)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _compile_cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    overrides = ["--config.model.d_model=16", "--config.model.d_kv=4", "--config.model.num_heads=2",
                 "--config.model.d_ff=32", "--config.model.num_encoder_layers=1", "--config.model.num_decoder_layers=1",
                 "--config.hypernet.hidden_dim=16", "--config.hypernet.embed_dim=8", "--config.hypernet.rank=2",
                 "--config.tagi.teacher_rank=2", "--config.mesh.data=4", "--config.mesh.model=2",
                 "--config.stages.finetune.train.batch_size=8"]
    return subprocess.run([sys.executable, COMPILE, f"--config={REPO}/configs/demo.py", *overrides, *args],
                          capture_output=True, text=True, env=env, timeout=600)


def test_cli_fails_naming_the_stage_that_does_not_fit():
    out = _compile_cli("--topology=cpu-8", "--stage=finetune", "--hbm_gib=0.0001", "--nodiagnostics")
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "stage finetune (train)" in errors[0] and "GiB per chip on cpu-8" in errors[0]
    assert "finetune        train" in out.stdout and "NO" in out.stdout
    bad = _compile_cli("--topology=v9-8")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --topology")


@pytest.mark.skipif(not topologies.libtpu_available(), reason="libtpu is not installed (pip install -e '.[tpu]')")
def test_tiny_run_compiles_for_a_v5e_slice_with_the_tpu_compiler():
    out = _compile_cli("--topology=v5e-8", "--stage=finetune", "--nodiagnostics",
                       env_extra={"JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TPU compiler (v5e:2x4, libtpu)" in out.stdout
    line = next(line for line in out.stdout.splitlines() if line.startswith("finetune        train"))
    assert "yes" in line.split()


def test_backbone_read_from_a_checkpoint_config_alone(tmp_path):
    import json

    from tests.tiny_hf import save_tiny_t5

    save_tiny_t5("v1_1", str(tmp_path))
    os.remove(os.path.join(tmp_path, "model.safetensors"))  # the weights are never read
    cfg = compile_plan.read_backbone(str(tmp_path))
    with open(os.path.join(tmp_path, "config.json")) as f:
        hf_cfg = json.load(f)
    assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.num_encoder_layers, cfg.vocab_size) == (
        hf_cfg["d_model"], hf_cfg["d_ff"], hf_cfg["num_heads"], hf_cfg["num_layers"], hf_cfg["vocab_size"])
    with pytest.raises(FileNotFoundError, match="config.json"):
        compile_plan.read_backbone(str(tmp_path / "missing"))


@pytest.mark.parametrize("config_name, topology", [
    (f"{name}:{size}", slice_) for name in ("sni_t5_lm.py", "p3_t0.py")
    for size, slices in (("base", ("v5e-8",)), ("xl", ("v5e-32", "v4-16")), ("xxl", ("v5e-256", "v4-128")))
    for slice_ in slices])
def test_paper_configs_split_their_microbatches_over_their_slices(config_name, topology):
    """Every stage's microbatch divides over the data axis (chips / mesh.model) of each slice the config is meant
    for (README's fit table): XXL's old 4 (SNI) / 64 (P3) microbatches of 16 could not run on v5e-256 at all."""
    c = load_config(os.path.join(REPO, "configs", config_name))
    data = topologies.parse_topology(topology).chips // int(c.mesh.model)
    for stage in c.pipeline.stages:
        validate_trainer_config(stages.stage_trainer_config(c, stage), data_parallel_size=data)
