"""SeqIO task registries (synthetic suite, Super-NaturalInstructions, P3 / T0, hypernetwork pretraining)."""
