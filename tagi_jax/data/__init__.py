"""The data side: the feature converter, benchmark registration and the batches and examples stages read."""
