"""tagi_jax: Task Adapters Generation from Instructions (TAGI) in JAX/Flax."""
from setuptools import find_packages, setup

# Exact pins: this set installs together on Python 3.11 (checked in a fresh venv by .ci/run).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "seqio==0.0.20",
    "tensorflow==2.21.0",
    "tensorflow-text==2.21.1",
    "tensorflow-datasets==4.9.10",
    "ml-collections==1.1.0",
    "safetensors==0.8.0",
    "tqdm==4.70.1",
    "rouge-score==0.1.2",
    "sentencepiece==0.2.3",
    "jinja2==3.1.6",
    "pyyaml==6.0.3",
    "tensorboardX==2.6.5",
    "numpy==2.4.6",
    "matplotlib==3.11.2",  # summary.png and curves.png (tagi_jax/eval/plots.py)
]

TEST_REQUIRES = [
    "pytest==9.2.0",
    "torch==2.13.0",  # the CPU wheel; a plain `torch` would pull CUDA builds
    "transformers==5.23.0",
    "peft==0.21.2",
    # tests/test_notebook.py executes notebooks/tagi_quickstart.ipynb headless
    "nbclient==0.11.0",
    "nbformat==5.11.1",
    "ipykernel==7.4.0",
]

setup(
    name="tagi_jax",
    version="0.1.0",
    description="TAGI: generate task-specific LoRA adapters for T5 from natural-language instructions (JAX/Flax).",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["tagi_jax", "tagi_jax.*", "tasks", "tasks.*", "configs"]),
    install_requires=INSTALL_REQUIRES,
    # `pip install -e ".[tpu]"`: launch/compile.py then compiles with the TPU compiler for abstract TPU slices.
    extras_require={"test": TEST_REQUIRES, "tpu": ["libtpu==0.0.52"]},
)
