"""TAGI on Super-NaturalInstructions with a T5-LM-adapt backbone (the paper's main setting).

    python launch/train.py --config=configs/sni_t5_lm.py:xl --workdir=gs://... \
        --config.model.checkpoint=/path/to/t5-xl-lm-adapt --config.data.vocabulary=/path/to/spiece.model \
        --config.data.sni.dir=/path/to/natural-instructions [--config.data.pretrain.source=tfds:c4/en]

Sizes: base | xl | xxl (the argument after ':'). The checkpoint, `spiece.model` and data are the user's: nothing
is downloaded. Hyper-parameters follow the paper and its original scripts where they state them: Def + 2 Pos,
source length 1024, target length 128, AdamW with linear decay and 3% warmup, 3 epochs over at most 500
instances per training task, LoRA rank 32, one LoRA teacher per category, λ1 = 5, λ2 = sigmoid(L_ins), KD
temperature 3 (original scripts).
Batch sizes are global (all devices); set `mesh.model` > 1 to shard XXL over a model axis.
"""
from configs.common import pretrained_backbone_config

_SIZES = {
    #        lr      batch  microbatches  mesh.model  hypernet hidden
    "base": (5e-4, 64, 1, 1, 512),
    "xl": (1e-4, 64, 2, 1, 1024),
    # XXL: 2 microbatches of 32, one example per data shard of v5e-256 (32 x model 8); 4 of 16 cannot be split.
    "xxl": (5e-5, 64, 2, 8, 1024),
}
_TRAIN_TASKS, _INSTANCES, _EPOCHS = 756, 500, 3


def get_config(size: str = "base"):
    if size not in _SIZES:
        raise ValueError(f"configs/sni_t5_lm.py: size {size!r} is not one of {sorted(_SIZES)}")
    lr, batch, micro, model_axis, hidden = _SIZES[size]
    # One LoRA teacher per category (a task's Categories[0]), as the original code: 60 rows, not 756.
    c = pretrained_backbone_config(hypernet_hidden_dim=hidden, teachers_per="category")
    c.data.benchmark = "sni"
    c.data.setting = "def_pos2"
    c.data.lengths.update(dict(inputs=256, hyper_inputs=1024, full_inputs=1024, targets=128))
    c.data.sni.update(dict(dir="", split="default", max_train_instances=_INSTANCES, max_test_instances=100))

    epoch_steps = _TRAIN_TASKS * _INSTANCES // batch
    steps = dict(teachers=epoch_steps, pretrain=10_000, finetune=_EPOCHS * epoch_steps,
                 concat=_EPOCHS * epoch_steps, no_instruction=_EPOCHS * epoch_steps, hint=_EPOCHS * epoch_steps)
    for stage, n in steps.items():
        s = c.stages[stage]
        s.train.update(dict(steps=n, batch_size=batch, num_microbatches=micro, log_every=100,
                            checkpoint_every=2000, keep_checkpoints=2))
        s.optimizer.update(dict(name="adamw", learning_rate=lr * (10 if stage == "teachers" else 1),
                                warmup_steps=max(1, int(0.03 * n)), schedule="linear", weight_decay=0.0,
                                clip_norm=1.0))
    c.mesh.update(dict(data=-1, model=model_axis, fsdp=True))  # FSDP: parameters, optimizer state over data
    c.eval.update(dict(batch_size=64, max_decode_len=128, beam_size=1, max_examples_per_task=100))
    return c
