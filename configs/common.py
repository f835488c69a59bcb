"""Experiment pieces the paper configs share (configs/sni_t5_lm.py, configs/p3_t0.py)."""
from ml_collections import config_dict

from tagi_jax.run.defaults import default_config


def pretrained_backbone_config(hypernet_hidden_dim: int, teachers_per: str) -> config_dict.ConfigDict:
    """`default_config()` with what the paper configs (configs/sni_t5_lm.py, configs/p3_t0.py) share.

    A user-supplied T5-LM-adapt checkpoint and its spiece.model (both left empty: required), bfloat16 compute,
    dropout 0.1 with the "rbg" step RNG; rank-32 LoRA teachers and hypernetwork; pretrain and finetune train the hypernetwork, the norms
    and the shared embedding of the backbone (the original code's choice); hypernetwork pretraining on C4; λ1 = 5,
    λ2 = sigmoid(L_ins), KD temperature 3 against the LoRA teachers; all six stages, every one but finetune and
    hint (which continue from pretrain) starting from the checkpoint. Benchmark, steps and optimizer are theirs.
    """
    c = default_config()
    c.model.checkpoint = ""  # required: a local google/t5-<size>-lm-adapt directory (config.json + weights)
    c.model.dtype = "bfloat16"
    c.model.dropout_rate = 0.1
    # Dropout bits from the accelerator's generator: threefry's bits for attention dropout took 12.4 of T5-Base's
    # 12.6 GiB of training temporaries per v5e chip (launch/compile.py) and half its compile time.
    c.prng_impl = "rbg"
    # Each layer's activations are recomputed in the backward pass (launch/compile.py: what fits a slice).
    c.model.remat_policy = "full"
    # Generator heads factorised at rank 64: about 8% of T5-Base's parameters (dense heads would be 60%).
    c.hypernet.update(dict(rank=32, lora_alpha=32.0, hidden_dim=hypernet_hidden_dim, embed_dim=128,
                           dropout_rate=0.1, head="factorised", head_dim=64))
    # The original code's choice: the hypernetwork, the norms and the shared embedding train, the rest is frozen.
    c.tagi.update(dict(fusion="prepend", teacher_rank=32, teacher_alpha=32.0, teachers_per=teachers_per,
                       train_backbone="norms_embeddings"))
    c.data.vocabulary = ""  # required: the backbone's spiece.model
    c.data.pretrain.update(dict(source="tfds:c4/en", min_words=64))
    c.data.pretrain.lengths.update(dict(inputs=512, hyper_inputs=1024, full_inputs=1024, targets=128))
    c.pipeline.stages = ("teachers", "pretrain", "finetune", "concat", "no_instruction", "hint")
    for stage in ("teachers", "pretrain", "concat", "no_instruction"):
        c.stages[stage].init_from = ""
    # L_ins relative to the teacher's update, so sigmoid(L_ins) weighs it the same way at every size.
    c.loss.update(dict(lambda_kl=5.0, lambda_ins="sigmoid", temperature=3.0, kl_teacher="lora_teachers",
                       alignment_reduction="relative"))
    return c
