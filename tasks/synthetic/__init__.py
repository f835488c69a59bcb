"""The synthetic instruction suite: the embedded default that trains and evaluates anywhere, with no files.

Several hundred procedurally generated text tasks, each with an SNI-style definition, positive examples and a
seeded instance generator; every task maps a short list of numbers or words to a short answer. The features
are formatted by tasks/formatting.py's Tk-Instruct formatter, exactly like Super-NaturalInstructions, so the
same model code reads both. Nothing is computed at import time, and this package imports nothing.

  operations  the primitive operations, a task's steps, `execute`, definitions and their parser
  task        SyntheticTask (text, identity, seeded instances over shared input pools) and Suite
  draw        which tasks a suite holds: held-out parameters, labels and operation pairs; drawing tasks
  suite       `build_suite`, `suite_for` and the feature contract (`format_example`, `vocabulary_text`)
  register    `register_synthetic`: SeqIO tasks and mixtures (the only module that imports SeqIO/TensorFlow)
"""
