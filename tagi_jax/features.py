"""The feature contract, defined once: every task, mixture, converter, model and trainer uses these names.

String features (what SeqIO tasks produce):
  inputs        what the model with the generated adapter sees: the instance input only
  hyper_inputs  what the hypernetwork sees: the instruction (definition, optionally examples)
  full_inputs   instruction and instance together (Tk-Instruct format): teachers and the concat baseline
  targets       the answer the model is trained on
  task_name     the task's name (teacher lookup, per-task metrics)
Evaluation examples also carry `references` (every reference answer, a variable-length string list).
A text may hold several passages (Fusion-in-Decoder) joined by PASSAGE_SEPARATOR: tokenisation ends each
passage with EOS, so the token ids are EOS-terminated segments (`tagi_jax.models.fid.fid_layout`).

Model features (what the feature converter produces, int32 token ids, 0 = padding):
  encoder_input_tokens, hyper_encoder_input_tokens, full_encoder_input_tokens,
  decoder_input_tokens, decoder_target_tokens, decoder_loss_weights, task_id
"""
INPUTS = "inputs"
HYPER_INPUTS = "hyper_inputs"
FULL_INPUTS = "full_inputs"
TARGETS = "targets"
TASK_NAME = "task_name"
REFERENCES = "references"
PASSAGE_SEPARATOR = "\x1f"  # ASCII "unit separator": never in natural text (QA readers reject it in passages)

TEXT_FEATURES = (INPUTS, HYPER_INPUTS, FULL_INPUTS, TARGETS)
STRING_FEATURES = TEXT_FEATURES + (TASK_NAME,)

ENCODER_INPUT_TOKENS = "encoder_input_tokens"
HYPER_ENCODER_INPUT_TOKENS = "hyper_encoder_input_tokens"
FULL_ENCODER_INPUT_TOKENS = "full_encoder_input_tokens"
DECODER_INPUT_TOKENS = "decoder_input_tokens"
DECODER_TARGET_TOKENS = "decoder_target_tokens"
DECODER_LOSS_WEIGHTS = "decoder_loss_weights"
TASK_ID = "task_id"

MODEL_FEATURES = (
    ENCODER_INPUT_TOKENS,
    HYPER_ENCODER_INPUT_TOKENS,
    FULL_ENCODER_INPUT_TOKENS,
    DECODER_INPUT_TOKENS,
    DECODER_TARGET_TOKENS,
    DECODER_LOSS_WEIGHTS,
    TASK_ID,
)

# Which length key (task_feature_lengths) sets the length of each model feature.
MODEL_FEATURE_LENGTH_KEY = {
    ENCODER_INPUT_TOKENS: INPUTS,
    HYPER_ENCODER_INPUT_TOKENS: HYPER_INPUTS,
    FULL_ENCODER_INPUT_TOKENS: FULL_INPUTS,
    DECODER_INPUT_TOKENS: TARGETS,
    DECODER_TARGET_TOKENS: TARGETS,
    DECODER_LOSS_WEIGHTS: TARGETS,
}
