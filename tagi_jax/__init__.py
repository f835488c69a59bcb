"""tagi_jax: Task Adapters Generation from Instructions (TAGI, NeurIPS 2024) in JAX/Flax.

Nothing heavy happens at import time: submodules are imported where they are used.
"""
__version__ = "0.1.0"
