"""TAGI on P3 (T0's training mixture) with a T5-LM-adapt backbone, rank classification on T0's held-out sets.

    python launch/train.py --config=configs/p3_t0.py:xl --workdir=gs://... \
        --config.model.checkpoint=/path/to/t5-xl-lm-adapt --config.data.vocabulary=/path/to/spiece.model \
        --config.data.p3.templates_dir=/path/to/promptsource/templates \
        --config.data.p3.train_data_dir=/path/to/p3_train --config.data.p3.eval_data_dir=/path/to/p3_eval

Sizes: base | xl | xxl (the argument after ':'). The checkpoint (google/t5-<size>-lm-adapt, or a T0 checkpoint
of the same size to start from T0), `spiece.model`, the promptsource templates and the data are the user's:
nothing is downloaded. Training data: `<train_data_dir>/<promptsource path>/train.jsonl` with Hugging Face field
names for each of T0's 38 training datasets; held-out sets: `<eval_data_dir>/<dataset>/validation.jsonl`
(tasks/p3/, reads them in their original release fields).

Where the values come from:
* TAGI paper: P3 with a T5-LM-adapt backbone, rank-classification accuracy on the 11 held-out datasets (RTE,
  CB, COPA, WiC, WSC, Winogrande, ANLI R1-R3, HellaSwag, StoryCloze; full validation sets, original-task
  templates, per-dataset means over templates and their average).
* T0 (Sanh et al. 2022; bigscience-workshop/t-zero): the training datasets (t0/datasets.csv, do_train=BASE; all
  templates of each), input length 1024, target length 256, Adafactor at a constant learning rate of 1e-3,
  batches of 1024 sequences (tokens_per_batch 1048576 at length 1024), examples-proportional mixing with a
  500k cap per dataset (`mixture_cap`), and 12,200 steps (its training command continues the LM-adapted
  checkpoint from step 1,100,000 to 1,112,200) for the multitask stages (concat = T0 itself, no_instruction,
  finetune, hint).
* configs/sni_t5_lm.py (the TAGI paper's SNI values, reused here through
  `configs/common.py`, our choice): LoRA rank 32, λ1 = 5, λ2 = sigmoid(L_ins), KD temperature
  3, hypernetwork sizes, pretraining on C4.
* Our choice: the instance-only and instruction lengths (1024, 256), one LoRA teacher per dataset (a dataset's
  templates are one task), 2,000 steps for the teachers and for hypernetwork pretraining, dropout 0.1 (the T5
  fine-tuning default), microbatch counts (not measured), no global-norm clipping (Adafactor clips its
  updates), and Adafactor without parameter-scaled steps in every stage: T0's Mesh TF Adafactor scales each
  step by the parameter's RMS, which would give the zero-initialised LoRA B factors and generator B heads
  steps of ~1e-6; one optimizer for all stages keeps the baselines comparable.
Batch sizes are global (all devices); set `mesh.model` > 1 to shard XXL over a model axis.
"""
from configs.common import pretrained_backbone_config
from tasks.p3.datasets import MTEST11, T0_TRAIN_DATASETS

_SIZES = {
    #        microbatches  mesh.model  hypernet hidden
    "base": (8, 1, 512),
    "xl": (32, 1, 1024),
    "xxl": (32, 8, 1024),  # microbatches of 32: one example per data shard of v5e-256 (32 x model 8)
}
_BATCH, _LR, _T0_STEPS, _OWN_STEPS = 1024, 1e-3, 12_200, 2_000


def get_config(size: str = "base"):
    if size not in _SIZES:
        raise ValueError(f"configs/p3_t0.py: size {size!r} is not one of {sorted(_SIZES)}")
    micro, model_axis, hidden = _SIZES[size]
    c = pretrained_backbone_config(hypernet_hidden_dim=hidden, teachers_per="category")
    c.data.benchmark = "p3"
    c.data.lengths.update(dict(inputs=1024, hyper_inputs=256, full_inputs=1024, targets=256))
    c.data.p3.update(dict(
        templates_dir="", train_data_dir="", eval_data_dir="",  # required: see the module docstring
        train_datasets=T0_TRAIN_DATASETS, eval_datasets=MTEST11,
        train_original_task_only=False, eval_original_task_only=True,
        max_train_examples_per_task=0, mixing_cap=500_000))

    steps = dict(teachers=_OWN_STEPS, pretrain=_OWN_STEPS, finetune=_T0_STEPS, concat=_T0_STEPS,
                 no_instruction=_T0_STEPS, hint=_T0_STEPS)
    for stage, n in steps.items():
        s = c.stages[stage]
        s.train.update(dict(steps=n, batch_size=_BATCH, num_microbatches=micro, log_every=100,
                            checkpoint_every=1000, keep_checkpoints=2))
        s.optimizer.update(dict(name="adafactor", learning_rate=_LR, warmup_steps=0, schedule="constant",
                                weight_decay=0.0, clip_norm=0.0))
        s.optimizer.adafactor.multiply_by_parameter_scale = False
    c.mesh.update(dict(data=-1, model=model_axis, fsdp=True))  # FSDP: parameters, optimizer state over data
    # Every validation example (the largest held-out set, HellaSwag, has 10,042); batch = scored choices.
    c.eval.update(dict(batch_size=64, max_examples_per_task=100_000))
    return c
