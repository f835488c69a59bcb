"""IAG (Imagination-Augmented Generation) on NQ-open with a user-supplied T5 checkpoint: the hypernetwork
generates a LoRA adapter for q and v of every attention block from each question, distilled from a same-size
Fusion-in-Decoder reader that reads retrieved passages.

    python launch/train.py --config=configs/iag_nq.py:base --workdir=gs://... \
        --config.model.checkpoint=/path/to/t5-base-lm-adapt --config.data.vocabulary=/path/to/spiece.model \
        --config.data.qa.dir=/path/to/shared/data/qa --config.data.qa.train_file=/path/to/nq_open/train.jsonl \
        --config.data.qa.passages_file=/path/to/retrieved.jsonl \
        [--config.data.qa.student_document=imagined --config.data.qa.imagined_file=/path/to/imagined.jsonl]

Sizes: base | large | xl. The checkpoint, `spiece.model`, the NQ-open training file (`{"question", "answer"}`
JSON Lines; shared/data/qa holds only the dev/test files) and the passages files (`{"question", "passages"}`,
best first, covering training and test questions) are the user's: nothing is downloaded.
Stages: `concat` (the FiD reader on `num_passages` retrieved passages: the KL teacher), `no_instruction`
(closed-book T5), `pretrain` (hypernetwork pretraining on C4) and `finetune` (the IAG student: CE + 5 KL from the
reader, no LoRA teachers, no L_ins). As in IAG's code the student trains the feed-forward blocks, norms and
embeddings with the hypernetwork (139 M of T5-Base's 220 M; with the hypernetwork alone on q and v closed-book NQ
fell to 5.31 EM). Our choices where the paper is silent: 10 passages of 256 tokens for the reader (FiD used 100;
raise `data.qa.num_passages` where memory allows), FiD's optimiser (AdamW, lr 1e-4, 15k steps at batch 64).
Evaluation: exact match (DPR normalisation) on the NQ-open test set (the official dev, 3,610 questions).
"""
from configs.common import pretrained_backbone_config

_SIZES = {
    #         lr      microbatches  mesh.model  hypernet hidden
    "base": (1e-4, 1, 1, 512),
    "large": (1e-4, 2, 1, 512),
    "xl": (5e-5, 4, 1, 1024),
}
_BATCH, _STEPS = 64, 15_000


def get_config(size: str = "base"):
    if size not in _SIZES:
        raise ValueError(f"configs/iag_nq.py: size {size!r} is not one of {sorted(_SIZES)}")
    lr, micro, model_axis, hidden = _SIZES[size]
    c = pretrained_backbone_config(hypernet_hidden_dim=hidden, teachers_per="task")
    c.tagi.update(dict(fusion="none", instruction_source="instance", train_backbone="ffn_norms_embeddings"))
    c.data.benchmark = "qa"
    c.data.qa.update(dict(dir="", dataset="nq_open", train_file="", eval_split="test", passages_file="",
                          num_passages=10, passage_length=256, imagined_file="", student_document="none"))
    # inputs: the question (+ one imagined document); full_inputs: 10 passages of 256 tokens, laid out by FiD.
    c.data.lengths.update(dict(inputs=320, hyper_inputs=64, full_inputs=2560, targets=32))
    c.loss.update(dict(kl_teacher="concat", lambda_kl=5.0, lambda_ins="0", temperature=1.0))
    c.pipeline.stages = ("concat", "no_instruction", "pretrain", "finetune")
    c.pipeline.evaluate = ("no_instruction", "tagi", "concat")
    for stage in ("concat", "no_instruction", "pretrain"):
        c.stages[stage].init_from = ""
    steps = dict(concat=_STEPS, no_instruction=_STEPS, pretrain=10_000, finetune=_STEPS)
    for stage, n in steps.items():
        s = c.stages[stage]
        s.train.update(dict(steps=n, batch_size=_BATCH, num_microbatches=micro, log_every=100,
                            checkpoint_every=2000, keep_checkpoints=2))
        s.optimizer.update(dict(name="adamw", learning_rate=lr, warmup_steps=1000, schedule="linear",
                                weight_decay=0.01, clip_norm=1.0))
    c.mesh.update(dict(data=-1, model=model_axis, fsdp=True))
    c.eval.update(dict(batch_size=64, max_decode_len=32, beam_size=1, max_examples_per_task=100_000))
    return c
