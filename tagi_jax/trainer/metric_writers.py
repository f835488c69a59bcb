"""Where training metrics go: a console progress bar, TensorBoard event files and a JSONL log.

Only process 0 writes (on other hosts every method is a no-op), so a pod run produces one log.
Files in the work directory:
- `metrics.jsonl`: one JSON object per line, `{"step": 100, "split": "train", "loss": ..., ...}`. Appended to,
  so a resumed run continues the same file; steps after the last checkpoint of an interrupted run appear
  twice, and the later line is the one that counts.
- `tensorboard/`: event files with tags `<split>/<name>` (e.g. `train/loss`, `eval/rougeL`).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

import jax
import numpy as np


def is_writer_process() -> bool:
    return jax.process_index() == 0


def _to_float(value: Any) -> float:
    array = np.asarray(value)
    if array.size != 1:
        raise ValueError(f"metric of shape {array.shape} is not a scalar")
    return float(array.reshape(()))


def _import_summary_writer():
    """`tensorboardX.SummaryWriter`, imported without pulling in PyTorch.

    tensorboardX's writer does `try: import torch` at import time (for tensor conversion we never use);
    with torch installed that costs seconds per process. Hiding torch during the import makes the `try`
    fail fast; torch itself stays importable afterwards. If torch is already loaded, nothing is hidden.
    """
    import sys

    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricWriter:
    """JSONL + TensorBoard scalars, written by process 0 only."""

    def __init__(self, workdir: str, *, jsonl: bool = True, tensorboard: bool = True):
        self.enabled = is_writer_process()
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self.tensorboard_dir = os.path.join(workdir, "tensorboard")
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        if jsonl:
            self._jsonl = open(self.jsonl_path, "a")
        if tensorboard:
            self._tb = _import_summary_writer()(logdir=self.tensorboard_dir)

    def write_scalars(self, step: int, scalars: Mapping[str, Any], split: str = "train") -> dict[str, float]:
        """Write scalars for `step`; returns them as Python floats (NaN/inf are kept, JSON writes them as such)."""
        values = {name: _to_float(v) for name, v in scalars.items()}
        if not self.enabled:
            return values
        if self._jsonl is not None:
            record = {"step": int(step), "split": split, **values}
            self._jsonl.write(json.dumps(record, allow_nan=True) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(f"{split}/{name}", value, global_step=int(step))
            self._tb.flush()
        return values

    def write_text(self, step: int, name: str, text: str) -> None:
        if self.enabled and self._tb is not None:
            self._tb.add_text(name, text, global_step=int(step))

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class ProgressBar:
    """A tqdm bar over training steps showing loss, learning rate and examples/s (process 0 only)."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
        self._bar = None
        if enabled and is_writer_process():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit="step")

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_metrics(self, values: Mapping[str, float]) -> None:
        if self._bar is None:
            return
        shown = {}
        for name, fmt in (("loss", "{:.4f}"), ("learning_rate", "{:.2e}"), ("examples_per_second", "{:.1f}")):
            if name in values and math.isfinite(values[name]):
                shown[{"learning_rate": "lr", "examples_per_second": "ex/s"}.get(name, name)] = fmt.format(values[name])
            elif name in values:
                shown[name] = str(values[name])
        self._bar.set_postfix(shown, refresh=False)

    def write(self, message: str) -> None:
        """Print a line without breaking the bar."""
        if self._bar is not None:
            self._bar.write(message)
        elif is_writer_process():
            print(message, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
