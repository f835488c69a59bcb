"""Reading Orbax checkpoints of a trainer work directory: which exist, which parameters they hold, and a
sharded restore of the parameters (or a subtree) alone, as one stage starts from another's output (or to host
numpy arrays, mesh-free).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from tagi_jax.trainer.guards import restore_newest_readable
from tagi_jax.trainer.optim import path_to_str


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _checkpoints_path(directory: str) -> str:
    ckpt = directory if not os.path.isdir(os.path.join(directory, "checkpoints")) else checkpoint_dir(directory)
    return os.path.abspath(ckpt)


def _steps(manager, ckpt: str, step: int | None) -> list[int]:
    """[step] if given, else every saved step (newest first is tried first by the callers)."""
    steps = [step] if step is not None else list(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {ckpt}")
    return steps


def load_params(directory: str, abstract_params: Any, step: int | None = None) -> Any:
    """Restore only the parameters (or a subtree of them) from another run's checkpoint, sharded.

    `directory` is a work directory (or its `checkpoints/`); `abstract_params` are ShapeDtypeStructs with
    shardings, e.g. `Trainer.abstract_params`. This is how a stage starts from the previous stage's output:
    `trainer.fit(batches, initial_params=lambda: load_params(prev_workdir, trainer.abstract_params))`.
    Every requested parameter must be in the checkpoint (`saved_param_paths` tells which are).
    """
    ckpt = _checkpoints_path(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(ckpt, options=options) as manager:
        steps = _steps(manager, ckpt, step)
        item = {"params": abstract_params}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), item
        )
        # The newest readable step: a damaged newer one is reported and skipped (it stays where it is).
        step, restored = restore_newest_readable(steps, lambda s: manager.restore(
            s, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)),
            ckpt, move_aside=False)
    # A partial restore hands back the placeholder of a parameter the checkpoint lacks: never train on one.
    for path, leaf in jax.tree_util.tree_flatten_with_path(restored["params"])[0]:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise KeyError(f"{ckpt} (step {step}) has no parameter '{path_to_str(path)}'")
    return restored["params"]


def load_host_params(directory: str, step: int | None = None) -> Any:
    """A checkpoint's parameters as host numpy arrays, whatever mesh or number of processes saved them (no
    shardings are needed): e.g. to compare the outputs of two runs, or to look at one outside its mesh."""
    ckpt = _checkpoints_path(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(ckpt, item_handlers=ocp.StandardCheckpointHandler(), options=options) as manager:
        steps = _steps(manager, ckpt, step)
        step, metadata = restore_newest_readable(steps, manager.item_metadata, ckpt, move_aside=False)
    tree = getattr(metadata, "tree", metadata)
    item = {"params": jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree["params"])}
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    with ocp.CheckpointManager(ckpt, options=options) as manager:
        restored = manager.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                                    partial_restore=True))
    return restored["params"]


def saved_param_paths(directory: str, step: int | None = None) -> set[tuple[str, ...]]:
    """The paths of the parameters a checkpoint holds, from its metadata (nothing is restored)."""
    ckpt = _checkpoints_path(directory)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False)
    with ocp.CheckpointManager(ckpt, item_handlers=ocp.StandardCheckpointHandler(), options=options) as manager:
        steps = _steps(manager, ckpt, step)
        _, metadata = restore_newest_readable(steps, manager.item_metadata, ckpt, move_aside=False)
    tree = getattr(metadata, "tree", metadata)
    return {tuple(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree["params"])[0]}


def saved_steps(workdir: str) -> list[int]:
    """The steps saved in a trainer work directory's `checkpoints/` (sorted; nothing is read)."""
    ckpt = checkpoint_dir(workdir)
    return sorted(int(name) for name in os.listdir(ckpt) if name.isdigit()) if os.path.isdir(ckpt) else []


def has_checkpoint(workdir: str) -> bool:
    """Whether a trainer work directory holds at least one saved step in `checkpoints/`."""
    return bool(saved_steps(workdir))
