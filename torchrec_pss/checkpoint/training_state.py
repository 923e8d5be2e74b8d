"""Training checkpoints: model, optimizer states and progress, saved with ``torch.distributed.checkpoint``.

A checkpoint of step ``s`` is the DCP directory ``<root>/step_<s:08d>`` (an iopath location); it is
complete once DCP has written its ``.metadata`` file, which happens last, so a run killed while
saving leaves a directory that :func:`latest_checkpoint` ignores. Sharded TorchRec tables are saved
shard by shard; replicated compressed memories once.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any, Mapping

import torch
import torch.distributed.checkpoint as dcp
from iopath.common.file_io import PathManager, g_pathmgr
from torch.optim import Optimizer

from torchrec_pss.checkpoint.iopath_storage import IopathReader, IopathWriter

_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def checkpoint_path(root: str, step: int) -> str:
    """The directory of step ``step``'s checkpoint under ``root``."""
    return posixpath.join(root, f"step_{step:08d}")


def complete_checkpoints(root: str, path_manager: PathManager | None = None) -> list[tuple[int, str]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first (``[]`` if none)."""
    pm = path_manager or g_pathmgr
    if not pm.exists(root):
        return []
    found = []
    for name in pm.ls(root):
        match = _STEP_DIR.match(posixpath.basename(name.rstrip("/")))
        path = posixpath.join(root, posixpath.basename(name.rstrip("/")))
        if match and pm.exists(posixpath.join(path, ".metadata")):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str, path_manager: PathManager | None = None) -> tuple[int, str] | None:
    """The newest complete checkpoint ``(step, path)`` under ``root``, or None."""
    found = complete_checkpoints(root, path_manager)
    return found[-1] if found else None


def _training_state(model: torch.nn.Module, optimizers: Mapping[str, Optimizer], step: int) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": {name: optimizer.state_dict() for name, optimizer in optimizers.items()},
        "progress": {"step": step},
    }


Path = tuple[str | int, ...]


def _flatten(tree: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """Leaves of nested dicts/lists keyed by their dotted path, and each key's path.

    Flattened here rather than by DCP because TorchRec's fused optimizers list only the tables a rank
    holds: a rank's state lacks other ranks' keys, which DCP's own nested-key handling takes for a
    pre-2.4 checkpoint layout.
    """
    flat: dict[str, Any] = {}
    paths: dict[str, Path] = {}

    def visit(node: Any, path: Path) -> None:
        if isinstance(node, Mapping) and node:
            for key, value in node.items():
                visit(value, (*path, key))
        elif isinstance(node, list) and node:
            for index, value in enumerate(node):
                visit(value, (*path, index))
        else:
            key = ".".join(map(str, path))
            flat[key], paths[key] = node, path

    visit(tree, ())
    return flat, paths


def _assign(tree: Any, path: Path, value: Any) -> None:
    for part in path[:-1]:
        tree = tree[part]
    tree[path[-1]] = value


def save_training_state(root: str, step: int, model: torch.nn.Module, optimizers: Mapping[str, Optimizer],
                        path_manager: PathManager | None = None) -> str:
    """Save ``model`` and ``optimizers`` (keyed, e.g. TorchRec's fused and dense ones) as step ``step``.

    Collective: every rank of the default process group calls it. Returns the checkpoint directory.
    """
    path = checkpoint_path(root, step)
    flat, _ = _flatten(_training_state(model, optimizers, step))
    dcp.save(flat, storage_writer=IopathWriter(path, path_manager))
    return path


def load_training_state(path: str, model: torch.nn.Module, optimizers: Mapping[str, Optimizer],
                        path_manager: PathManager | None = None) -> int:
    """Load the checkpoint at ``path`` into ``model`` and ``optimizers`` in place; returns its step.

    Collective, like :func:`save_training_state`. The model's and optimizers' own ``load_state_dict``
    run last, so their checks (e.g. a compressed table's method and hash constants) apply.
    """
    state = _training_state(model, optimizers, -1)
    flat, paths = _flatten(state)
    dcp.load(flat, storage_reader=IopathReader(path, path_manager))
    for key, value in flat.items():  # tensors were loaded in place; other values were replaced
        _assign(state, paths[key], value)
    model.load_state_dict(state["model"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(state["optimizers"][name])
    return int(state["progress"]["step"])
