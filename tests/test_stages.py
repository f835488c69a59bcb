"""What each stage trains, read from the optimizer labels of built trainers and checked against the policies as
the paper and the original code state them (written out here, not taken from tagi_jax/run/stages.py)."""
import re

import flax.linen as nn
import jax
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec

from tagi_jax import partitioning
from tagi_jax.config import load_config
from tagi_jax.models.t5_config import T5Config
from tagi_jax.run import defaults as run_defaults
from tagi_jax.run import stages
from tagi_jax.trainer.trainer import Trainer
from test_pipeline import DEMO


def _tiny(fusion="encoder_cross_attention", **tagi):
    c = load_config(DEMO, [f"tagi.fusion={fusion}"])
    c.model.update(dict(d_model=16, d_kv=4, num_heads=2, d_ff=32, num_encoder_layers=1, num_decoder_layers=1,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, vocab_size=64))
    c.data.synthetic.vocab_size = 64
    c.hypernet.update(dict(rank=2, lora_alpha=4.0, hidden_dim=16, embed_dim=8))
    c.tagi.update(dict(teacher_rank=2, teacher_alpha=4.0, **tagi))
    for stage in c.stages:
        c.stages[stage].train.update(dict(steps=2, batch_size=8, progress_bar=False))
        c.stages[stage].optimizer.update(dict(warmup_steps=0, groups={}))
    return c


# The policies in words: which parameters of the student a TAGI stage updates.
NORM_OR_EMBEDDING = re.compile(r"(layer_norm|encoder_norm|decoder_norm)/scale$|^token_embedder/embedding$")
FUSION = re.compile(r"encoder/layers_\d+/(pre_instruction_attention_layer_norm|instruction_attention)/")


def expected_trainable(path: str, policy: str) -> bool:
    """`path` relative to the student tree ("t5/...", "hypernet/...", "teachers/...")."""
    if path.startswith("hypernet/"):
        return True  # the hypernetwork (with its pooler and heads) always trains
    if path.startswith("teachers/"):
        return False  # the teachers are stage 0's, fixed afterwards
    assert path.startswith("t5/"), path
    inner = path[len("t5/"):]
    if FUSION.search(inner):
        return True  # new blocks: the student's own
    if policy == "none":
        return False  # the paper: the LLM stays frozen
    if policy == "norms_embeddings":
        return bool(NORM_OR_EMBEDDING.search(inner))  # the original code: norms and the shared embedding
    if policy == "ffn_norms_embeddings":  # IAG's code: also the feed-forward blocks (wi_0, wi_1, wo)
        return bool(NORM_OR_EMBEDDING.search(inner) or re.search(r"layers_\d+/mlp/w(i|i_0|i_1|o)/kernel$", inner))
    return True


@pytest.mark.parametrize("policy", ["none", "norms_embeddings", "ffn_norms_embeddings", "all"])
def test_finetune_trains_what_the_policy_says(policy, tmp_path):
    config = _tiny(train_backbone=policy)
    run_defaults.validate(config)
    model_cfg = run_defaults.tagi_config(config, num_teachers=3)
    trainer = Trainer(stages.stage_trainer_config(config, "finetune"), workdir=str(tmp_path),
                      init_fn=stages.stage_init_fn("finetune", model_cfg), loss_fn=lambda p, b, r: (0.0, {}))
    labels = {"/".join(k): v for k, v in traverse_util.flatten_dict(trainer.labels).items()}
    student = {k[len("student/"):]: v != "frozen" for k, v in labels.items() if k.startswith("student/")}
    assert any(FUSION.search(k) for k in student) and any(NORM_OR_EMBEDDING.search(k[3:]) for k in student)
    for path, trainable in student.items():
        assert trainable == expected_trainable(path, policy), (policy, path, trainable)
    assert all(v == "frozen" for k, v in labels.items() if k.startswith("teacher/"))
    # Frozen parameters carry no optimizer state: Adam keeps moments for the trainable ones only.
    moments = sum(x.size for x in jax.tree.leaves(trainer.abstract_state.opt_state) if x.ndim > 0)
    trainable = sum(x.size for (k, x) in traverse_util.flatten_dict(trainer.abstract_params).items()
                    if labels["/".join(k)] != "frozen")
    assert moments == 2 * trainable
    trainer.close()


def test_pretrain_follows_the_policy_and_hint_trains_everything(tmp_path):
    config = _tiny(train_backbone="none")
    model_cfg = run_defaults.tagi_config(config, num_teachers=3)
    for stage, policy in (("pretrain", "none"), ("hint", "all")):
        trainer = Trainer(stages.stage_trainer_config(config, stage), workdir=str(tmp_path / stage),
                          init_fn=stages.stage_init_fn(stage, model_cfg), loss_fn=lambda p, b, r: (0.0, {}))
        for path, label in traverse_util.flatten_dict(trainer.labels).items():
            assert (label != "frozen") == expected_trainable("/".join(path), policy), (stage, path)
        trainer.close()


def test_unknown_backbone_policy_is_a_config_error():
    with pytest.raises(ValueError, match="config key 'tagi.train_backbone'"):
        run_defaults.validate(_tiny(train_backbone="some"))


def test_paper_configs_train_norms_and_embeddings():
    assert load_config(DEMO.replace("demo.py", "sni_t5_lm.py")).tagi.train_backbone == "norms_embeddings"
    assert load_config(DEMO.replace("demo.py", "p3_t0.py")).tagi.train_backbone == "norms_embeddings"


# ------------------------------------------------------------------------------------------------ sizes at real shapes
T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_heads=32, num_encoder_layers=24,
             num_decoder_layers=24)


def _count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def test_xl_finetune_tree_holds_one_table_sharded_and_fits_its_budget():
    """configs/sni_t5_lm.py:xl's finetune tree, abstractly (nothing allocated). Budget, derived here: the student
    and the frozen KL teacher each hold the backbone (2 x 2.85 B); the teacher table has one row per SNI category
    (60) of rank-32 q/v LoRAs on 6 targets x 24 layers, r·(d_in + d_out) = 32·4096 values each: 1.13 B; the
    generator is at most 10% of the backbone. Before, the table also sat in the student (and again in a fresh
    copy), one row per task (756): 14.3 B values per copy."""
    config = load_config(DEMO.replace("demo.py", "sni_t5_lm.py") + ":xl")
    assert config.tagi.teachers_per == "category"
    model_cfg = run_defaults.tagi_config(config, num_teachers=60, t5=T5Config(dropout_rate=0.1, **T5_XL))
    boxed = jax.eval_shape(stages.stage_init_fn("finetune", model_cfg), jax.random.key(0))
    tree = nn.meta.unbox(boxed)
    assert "teachers" not in tree["student"] and set(tree["teacher"]) == {"hypernet", "t5", "teachers"}
    backbone = _count(tree["student"]["t5"])
    assert backbone == 2_849_757_184  # google/t5-xl-lm-adapt (untied output layer)
    table = _count(tree["teacher"]["teachers"])
    assert table == 60 * 6 * 24 * 32 * (2048 + 2048) == 1_132_462_080
    assert _count(tree["student"]["hypernet"]) <= 0.10 * backbone
    assert _count(tree) <= 2 * backbone + table + 2 * 0.10 * backbone  # 7.4 B; measured 6.94 B
    # The table is split over the mesh's data axis along its factors, not replicated.
    specs = partitioning.logical_to_mesh_specs(partitioning.params_logical_specs(boxed),
                                               partitioning.logical_axis_rules(False))
    table_specs = jax.tree.leaves(specs["teacher"]["teachers"], is_leaf=lambda x: isinstance(x, PartitionSpec))
    assert table_specs and all(partitioning.DATA_AXIS in tuple(spec) for spec in table_specs), table_specs
