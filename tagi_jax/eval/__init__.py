"""Evaluation of trained methods: adapters generated once per task, batched decoding, one evaluator per protocol."""
