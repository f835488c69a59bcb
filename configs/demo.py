"""The embedded default: a small T5 trained from scratch on the synthetic instruction suite, on CPU.

All stages (backbone pretraining, LoRA teachers, hypernetwork pretraining, TAGI finetuning) and the three
baselines (instruction concatenation, no instruction, hypernetwork without distillation), then ROUGE-L and
exact match on unseen and seen tasks for each method (`summary.json`). About 15 minutes on 2 CPU cores.

    python launch/train.py --config=configs/demo.py --workdir=runs/demo [--config.key=value ...]
"""
from tagi_jax import pipeline


def get_config():
    c = pipeline.default_config()
    c.seed = 0

    # A byte-level T5 v1.1 (gated GELU, untied head); vocab 384 >= the 259 byte ids, a multiple of 128.
    c.model.update(dict(vocab_size=384, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_encoder_layers=2,
                        num_decoder_layers=2, relative_attention_num_buckets=16,
                        relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False))
    c.hypernet.update(dict(rank=8, lora_alpha=16.0, hidden_dim=256, embed_dim=64, dropout_rate=0.0))
    c.tagi.update(dict(fusion="prepend", teacher_rank=8, teacher_alpha=16.0, teachers_per="task"))

    c.data.benchmark = "synthetic"
    c.data.vocabulary = "byte"
    # Definition only (byte-level text is ~4x longer than SentencePiece tokens; Def + 2 Pos triples the
    # sequence lengths and the CPU time): the instruction <= 162 bytes, instance part <= 76, answer <= 24.
    c.data.setting = "def"
    c.data.lengths.update(dict(inputs=80, hyper_inputs=176, full_inputs=240, targets=32))
    c.data.synthetic.update(dict(seed=0, num_train_tasks=120, num_unseen_tasks=30,
                                 train_instances_per_task=100, eval_instances_per_task=20))
    c.data.pretrain.lengths.update(dict(inputs=80, hyper_inputs=96, full_inputs=160, targets=96))

    # From scratch there is no pretrained backbone to import: the baselines and stage-1 pretraining start from
    # the same random initialisation, and the stage-0 teachers refine the instruction-concatenation model
    # (a backbone that can read instructions) with one LoRA per task.
    c.pipeline.stages = ("concat", "teachers", "pretrain", "finetune", "no_instruction", "hint")
    c.stages.concat.init_from = ""
    c.stages.no_instruction.init_from = ""
    c.stages.pretrain.init_from = ""
    c.stages.teachers.init_from = "concat"
    steps = dict(teachers=100, pretrain=100, finetune=500, concat=500, no_instruction=300, hint=500)
    lrs = dict(teachers=5e-3, pretrain=2e-3, finetune=2e-3, concat=2e-3, no_instruction=2e-3, hint=2e-3)
    for stage, n in steps.items():
        s = c.stages[stage]
        s.train.update(dict(steps=n, batch_size=16, log_every=50, checkpoint_every=0, keep_checkpoints=1,
                            progress_bar=True))
        s.optimizer.update(dict(name="adamw", learning_rate=lrs[stage], warmup_steps=30, schedule="linear",
                                weight_decay=0.0, clip_norm=1.0))

    c.mesh.update(dict(data=-1, model=1))
    c.eval.update(dict(batch_size=64, max_decode_len=32, beam_size=1, max_examples_per_task=10))
    return c
