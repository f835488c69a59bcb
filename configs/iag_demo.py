"""IAG on CPU: the synthetic closed-book QA suite (tasks/synthetic_qa.py) with a small T5 trained from scratch.

Entities' facts are stated only in the pretraining documents; test questions ask facts never seen as a QA
pair. Stages: `backbone` (the T5 pretrained on the documents: its closed-book knowledge), `concat` (the
Fusion-in-Decoder reader: the question with its supporting document; `data.qa.num_passages` passages are each
encoded alone), `no_instruction` (plain closed-book T5), `pretrain` (hypernetwork pretraining on the documents), `finetune`
(the IAG student: an adapter generated from each question, distilled from the FiD reader with CE + KL, the
feed-forward blocks, norms and embeddings training as in IAG's code). Evaluation: exact match on the test
questions. `--config.data.qa.student_document=imagined` gives "IAG + one document" (the student also reads a
noisy imagined document); `configs/iag_demo.py:imagined` sets it with the longer student budget that reading
needs; `python bench/iag_synthetic.py` runs both and prints the table.

    python launch/train.py --config=configs/iag_demo.py[:imagined] --workdir=runs/iag [--config.key=value ...]
"""
from tagi_jax.run.defaults import default_config

STUDENTS = ("closed_book", "imagined")  # the argument after ':' (what the IAG student reads besides the question)


def get_config(student: str = "closed_book"):
    if student not in STUDENTS:
        raise ValueError(f"configs/iag_demo.py: student {student!r} is not one of {', '.join(STUDENTS)}")
    c = default_config()
    c.seed = 0
    c.model.update(dict(vocab_size=2048, d_model=128, d_kv=32, num_heads=4, d_ff=256, num_encoder_layers=2,
                        num_decoder_layers=2, relative_attention_num_buckets=16,
                        relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                        tie_word_embeddings=False))
    c.hypernet.update(dict(rank=8, lora_alpha=16.0, hidden_dim=256, embed_dim=64, dropout_rate=0.0))
    # IAG: the hypernetwork reads each question ("instance"); no fusion of its states into the decoder.
    c.tagi.update(dict(fusion="none", instruction_source="instance", train_backbone="ffn_norms_embeddings"))

    c.data.benchmark = "synthetic_qa"
    c.data.vocabulary = "synthetic_spm"
    # 480 entities: the facts of 384 are asked in training (2,304 questions), those of the other 96 only at test
    # time (576 questions), so answering needs the pretraining documents (closed book) or a document (FiD,
    # imagined). With 64 entities (384 questions, 33 epochs) the reader memorised the training answers instead
    # of reading: 10.9 EM with the supporting document in front of it.
    c.data.synthetic_qa.update(dict(seed=0, num_entities=480, test_entity_fraction=0.2, imagined_accuracy=0.75,
                                    corpus_copies=4, vocab_size=2048))
    # The reader's passage: the supporting document ("question: q context: document", at most 85 pieces with
    # EOS in the 2048-piece vocabulary; the question alone 16, with an imagined document 55, an answer 3).
    # With a distractor document beside it (2 passages) this 2-layer reader memorised the training answers
    # instead of reading within the demo's budget (train loss 0.21, test EM 15.1 after 1,500 steps); with the
    # supporting document alone it learns to read (test EM 64.9 after 1,000 steps).
    c.data.qa.update(dict(num_passages=1, passage_length=96,
                          student_document="imagined" if student == "imagined" else "none"))
    c.data.lengths.update(dict(inputs=64, hyper_inputs=16, full_inputs=96, targets=8))
    c.data.pretrain.update(dict(min_words=8))
    c.data.pretrain.lengths.update(dict(inputs=32, hyper_inputs=32, full_inputs=64, targets=32))

    # The KL teacher is the FiD reader (the concat stage), not LoRA teachers: no teacher table, no L_ins.
    c.loss.update(dict(kl_teacher="concat", lambda_kl=5.0, lambda_ins="0", temperature=1.0))
    c.pipeline.stages = ("backbone", "concat", "no_instruction", "pretrain", "finetune")
    c.pipeline.evaluate = ("no_instruction", "tagi", "concat")
    # The imagined-document student has to learn to read as well (the reader took ~1,000 steps to): with 300
    # finetune steps it scored 17.5 EM, with 1,200 42.4; the closed-book student has nothing to read.
    steps = dict(backbone=600, concat=1500, no_instruction=300, pretrain=100,
                 finetune=1200 if student == "imagined" else 300)
    for stage, n in steps.items():
        s = c.stages[stage]
        s.train.update(dict(steps=n, batch_size=16, log_every=100, checkpoint_every=0, keep_checkpoints=1,
                            progress_bar=True))
        s.optimizer.update(dict(name="adamw", learning_rate=1e-3, warmup_steps=min(100, n // 10),
                                schedule="linear", weight_decay=0.0, clip_norm=1.0))
    for stage in ("pretrain", "finetune"):
        c.stages[stage].optimizer.groups = {
            "generator_heads": {"pattern": r"hypernet/[^/]+/[AB]_\w+$", "lr_scale": 0.05}}

    c.mesh.update(dict(data=-1, model=1))
    c.eval.update(dict(batch_size=64, max_decode_len=8, beam_size=1, max_examples_per_task=1000))
    return c
