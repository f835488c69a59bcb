"""The T5X-style trainer: config sections, optimizer and labels, train state, pure steps, checkpoints, metrics."""
