"""What stops a training run safely: non-finite values (`NonFiniteError`), preemption signals (`Preempted`,
`SignalWatcher`), and unreadable checkpoints (`CheckpointError`, `restore_newest_readable`)."""
from __future__ import annotations

import math
import os
import signal
import threading
from typing import Any, Callable, Mapping, Sequence

from absl import logging

FINITE = "all_finite"  # the train step's flag: every metric (loss terms, grad_norm, ...) is finite


class NonFiniteError(RuntimeError):
    """A loss term, the gradient norm or another metric became NaN/Inf: the stage stops without saving."""


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected (the message names the directory and what to do)."""


class Preempted(Exception):
    """SIGTERM/SIGINT arrived: the state reached was saved; running the same command again resumes there."""

    def __init__(self, step: int, directory: str, signum: int):
        self.step, self.directory, self.signum = step, directory, signum
        name = signal.Signals(signum).name
        super().__init__(f"{name} received: stopped after step {step} and saved a checkpoint in {directory}; "
                         "run the same command again to resume there")


def non_finite_terms(metrics: Mapping[str, Any]) -> list[str]:
    """The names of the metrics whose (host) value is NaN or infinite."""
    return sorted(k for k, v in metrics.items() if k != FINITE and not math.isfinite(float(v)))


def non_finite_message(name: str, step: int, metrics: Mapping[str, Any], last_saved: int | None,
                       directory: str) -> str:
    terms = non_finite_terms(metrics) or ["loss"]
    shown = ", ".join(f"{k}={float(metrics[k])}" for k in terms if k in metrics)
    kept = (f"the last good checkpoint, step {last_saved}, is kept in {directory}" if last_saved is not None
            else "no checkpoint was saved")
    return (f"stage '{name}' step {step}: non-finite {', '.join(terms)} ({shown}); stopped without saving; {kept} "
            "(lower the learning rate or check the data)")


class SignalWatcher:
    """Within `with`, SIGTERM and SIGINT only set `received` (the signal number); the loop that polls it decides
    when to stop. Handlers are installed only in the main thread and restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - the signal module's signature
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum
        logging.warning("%s received: finishing the current step, then saving a checkpoint",
                        signal.Signals(signum).name)

    def __enter__(self) -> "SignalWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def restore_newest_readable(steps: Sequence[int], restore: Callable[[int], Any], directory: str,
                            move_aside: bool) -> tuple[int, Any]:
    """(step, restored) of the newest of `steps` that `restore` can read. An unreadable newer step is reported
    with a warning and, with `move_aside`, renamed to `<step>.unreadable` (kept, never deleted) so that training
    can write that step again; when none is readable, a `CheckpointError` names the directory."""
    if not steps:
        raise CheckpointError(f"no checkpoint in {directory}")
    errors = []
    for step in sorted(steps, reverse=True):
        try:
            restored = restore(step)
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise many types for a damaged checkpoint
            errors.append((step, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__))
            continue
        for bad, why in errors:
            path = os.path.join(directory, str(bad))
            where = path
            if move_aside and os.path.isdir(path):
                where = f"{path}.unreadable"
                os.replace(path, where)
            logging.warning("checkpoint step %d is unreadable (%s); using step %d instead (the damaged one is %s)",
                            bad, why, step, where)
            print(f"warning: checkpoint {path} is unreadable ({why[:200]}); using step {step} instead", flush=True)
        return step, restored
    step, why = errors[0]
    raise CheckpointError(f"checkpoint {os.path.join(directory, str(step))} is unreadable ({why[:300]}) and no older "
                          f"step of {directory} is readable: delete {directory} to start this stage again")
