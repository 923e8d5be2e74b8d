"""Crash-safe training checkpoints: model, optimizer states and progress, saved with ``torch.distributed.checkpoint``.

A checkpoint of step ``s`` is the DCP directory ``<root>/step_<s:08d>`` (an iopath location). It is
written atomically: every rank saves into a staging directory ``step_<s>.partial-<token>``; then the
first rank writes ``MANIFEST.json`` (every file's size and CRC-32; through a temporary name and a
rename) and renames the staging directory to its final name. A run killed while saving leaves only a
staging directory, which is never read; a run killed while it replaced a checkpoint of the same step leaves
the older one as ``step_<s>.replaced-<token>``, which counts when ``step_<s>`` is missing or damaged. A
failure of the first rank's part is raised on every rank. ``file://`` URIs are read as local paths.
:func:`latest_checkpoint` also re-reads the newest checkpoint's files against its manifest: a truncated,
corrupt or incomplete one is skipped with a warning and the previous good one is used. Sharded TorchRec
tables are saved shard by shard; replicated compressed memories once. The progress part holds the step and
the data-loader position (batches each rank has consumed).
"""

from __future__ import annotations

import copy
import json
import posixpath
import re
import uuid
import warnings
import zlib
from typing import Any, Mapping, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from iopath.common.file_io import PathManager, g_pathmgr
from torch.optim import Optimizer
from torchrec.optim.keyed import KeyedOptimizer

from torchrec_pss.checkpoint.iopath_storage import IopathReader, IopathWriter, local_file_uri
from torchrec_pss.checkpoint.optimizer_state import check_optimizer_states, drop_states, materialize_lazy_states
from torchrec_pss.checkpoint.param_groups import GROUPS, groups_by_parameter, groups_of_optimizer

_STEP_DIR = re.compile(r"^step_(\d{8,})(\.replaced-[0-9a-f]+)?$")
MANIFEST = "MANIFEST.json"
_CHUNK_BYTES = 1 << 22


class Progress(NamedTuple):
    """Where a checkpoint was taken: the optimizer ``step``, the ``data_position`` (batches per rank) and the
    ``global_batch`` those batches had (examples per step over all ranks; 0 where it was not recorded, as in
    checkpoints written before it was)."""

    step: int
    data_position: int
    global_batch: int = 0


def checkpoint_path(root: str, step: int) -> str:
    """The directory of step ``step``'s checkpoint under ``root``."""
    return posixpath.join(local_file_uri(root), f"step_{step:08d}")


def complete_checkpoints(root: str, path_manager: PathManager | None = None) -> list[tuple[int, str]]:
    """``(step, path)`` of every checkpoint under ``root`` that has a manifest, oldest first (``[]`` if none).

    A step's older copies that a save of the same step moved aside (``step_<s>.replaced-<token>``) come just
    before ``step_<s>`` itself, so that they count when it is missing (a save killed between its two renames) or
    damaged. Its files are not re-read here (see :func:`verify_checkpoint`).
    """
    pm = path_manager or g_pathmgr
    root = local_file_uri(root)
    if not pm.exists(root):
        return []
    found = []
    for name in pm.ls(root):
        base = posixpath.basename(name.rstrip("/"))
        match = _STEP_DIR.match(base)
        path = posixpath.join(root, base)
        if match and pm.exists(posixpath.join(path, MANIFEST)):
            found.append((int(match.group(1)), match.group(2) is None, path))
    return [(step, path) for step, _, path in sorted(found)]


def verify_checkpoint(path: str, path_manager: PathManager | None = None) -> str | None:
    """Why the checkpoint at ``path`` cannot be trusted (a file missing, truncated or changed since it was
    written, or an unreadable manifest), or None when every file matches its manifest entry."""
    pm = path_manager or g_pathmgr
    path = local_file_uri(path)
    try:
        with pm.open(posixpath.join(path, MANIFEST), "r") as stream:
            files = json.load(stream)["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable {MANIFEST}: {error}"
    for name, entry in files.items():
        file = posixpath.join(path, name)
        if not pm.exists(file):
            return f"{name} is missing"
        size, crc = _size_and_crc(file, pm)
        if size != entry["bytes"]:
            return f"{name} has {size} bytes, the manifest says {entry['bytes']} (truncated?)"
        if crc != entry["crc32"]:
            return f"{name} has CRC-32 {crc:08x}, the manifest says {entry['crc32']:08x} (corrupt)"
    return None


def latest_checkpoint(root: str, path_manager: PathManager | None = None) -> tuple[int, str] | None:
    """The newest checkpoint ``(step, path)`` under ``root`` whose files match its manifest, or None.

    Each newer checkpoint that fails :func:`verify_checkpoint` is skipped with a ``UserWarning`` naming
    it and the reason.
    """
    for step, path in reversed(complete_checkpoints(root, path_manager)):
        reason = verify_checkpoint(path, path_manager)
        if reason is None:
            return step, path
        warnings.warn(f"checkpoint {path} is not usable ({reason}); falling back to an older one", stacklevel=2)
    return None


def agreed_latest_checkpoint(root: str, path_manager: PathManager | None = None) -> tuple[int, str] | None:
    """:func:`latest_checkpoint` of the first rank, broadcast to every rank of the default process group (a
    collective; without a process group, :func:`latest_checkpoint` itself): one rank re-reads the files, and all
    ranks resume from the same checkpoint even where a rank's read would fail or see another one."""
    found = [latest_checkpoint(root, path_manager) if _first_rank() else None]
    if dist.is_initialized():
        dist.broadcast_object_list(found, src=0)
    return found[0]


def _size_and_crc(path: str, pm: PathManager) -> tuple[int, int]:
    size, crc = 0, 0
    with pm.open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def _write_manifest(path: str, pm: PathManager) -> None:
    """``MANIFEST.json`` of every file in ``path`` (written to a temporary name, then renamed)."""
    files = {}
    for name in sorted(pm.ls(path)):
        name = posixpath.basename(name.rstrip("/"))
        size, crc = _size_and_crc(posixpath.join(path, name), pm)
        files[name] = {"bytes": size, "crc32": crc}
    temporary = posixpath.join(path, MANIFEST + ".tmp")
    with pm.open(temporary, "w") as stream:
        json.dump({"files": files}, stream, indent=1)
    if not pm.mv(temporary, posixpath.join(path, MANIFEST)):
        raise OSError(f"could not rename {temporary} to {MANIFEST}")


def _first_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _shared_token() -> str:
    """A random token, the same on every rank (the first rank's)."""
    token = [uuid.uuid4().hex[:12]]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return token[0]


def _raise_on_every_rank(error: BaseException | None, what: str) -> None:
    """Re-raise the first rank's ``error`` there and raise an ``OSError`` quoting it on the other ranks (nothing
    when it is None); a barrier: every rank of the default process group calls it."""
    message = [None if error is None else f"{type(error).__name__}: {error}"]
    if dist.is_initialized():
        dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        raise OSError(f"{what} failed on rank 0: {message[0]}")


def _training_state(model: torch.nn.Module, optimizers: Mapping[str, Optimizer], progress: Progress) -> dict[str, Any]:
    return {
        "model": model.state_dict(),
        "optimizers": {name: groups_by_parameter(optimizer, optimizer.state_dict()) for name, optimizer in optimizers.items()},
        "progress": progress._asdict(),
    }


Path = tuple[str | int, ...]


def _flatten(tree: Any) -> tuple[dict[str, Any], dict[str, Path]]:
    """Leaves of nested dicts/lists keyed by their dotted path, and each key's path; an empty dict or list is no
    leaf (DCP saves no entry for it under a process group, so a load would ask for a key the checkpoint lacks, e.g.
    the ``{}`` state of every parameter of an SGD; the tree keeps it as it is).

    Flattened here rather than by DCP because TorchRec's fused optimizers list only the tables a rank
    holds: a rank's state lacks other ranks' keys, which DCP's own nested-key handling takes for a
    pre-2.4 checkpoint layout.
    """
    flat: dict[str, Any] = {}
    paths: dict[str, Path] = {}

    def visit(node: Any, path: Path) -> None:
        if isinstance(node, Mapping):
            for key, value in node.items():
                visit(value, (*path, key))
        elif isinstance(node, list):
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
                        path_manager: PathManager | None = None, data_position: int | None = None,
                        global_batch: int = 0) -> str:
    """Save ``model``, ``optimizers`` (keyed, e.g. TorchRec's fused and dense ones) and the progress as step
    ``step`` (``data_position``: batches each rank has consumed, default ``step``; ``global_batch``: examples
    per step over all ranks, so that a resume can tell whether that position means the same data), atomically.

    Collective: every rank of the default process group calls it. Returns the checkpoint directory. A
    checkpoint of the same step already there is moved aside (``step_<s>.replaced-<token>``), not mixed.
    """
    pm = path_manager or g_pathmgr
    final = checkpoint_path(root, step)
    token = _shared_token()
    staging = f"{final}.partial-{token}"
    progress = Progress(step, step if data_position is None else data_position, global_batch)
    flat, _ = _flatten(_training_state(model, optimizers, progress))
    dcp.save(flat, storage_writer=IopathWriter(staging, pm))
    error = None
    if _first_rank():
        try:
            _write_manifest(staging, pm)
            if pm.exists(final) and not pm.mv(final, f"{final}.replaced-{token}"):
                raise OSError(f"could not move the older {final} aside")
            if not pm.mv(staging, final):
                raise OSError(f"could not rename {staging} to {final}")
        except BaseException as caught:  # also KeyboardInterrupt: the other ranks must not wait for it
            error = caught
    _raise_on_every_rank(error, f"saving checkpoint {final}")
    return final


def _is_guard_entry(key: str, value: Any) -> bool:
    """Whether a model state entry is read for the pre-load checks: a non-tensor (extra state, e.g. a compressed
    table's method and recovery signature) or a plain tensor under ``pss_memories`` (hash constants)."""
    if not isinstance(value, torch.Tensor):
        return True
    return type(value) is torch.Tensor and "pss_memories" in key.split(".")


def _check_model_state(path: str, saved: set[str], model: torch.nn.Module,
                       path_manager: PathManager | None) -> None:
    """Refuse the checkpoint at ``path`` (metadata keys ``saved``) for ``model`` before DCP writes anything into it.

    The guard entries (:func:`_is_guard_entry`) are read into staging copies and handed to
    ``model.load_state_dict(strict=False)``, whose pre-load checks refuse another method, signature or constants
    (entries missing from the checkpoint read as None); they copy nothing but the constants they found equal.
    Then the model's state keys must be the checkpoint's.
    """
    current = model.state_dict(keep_vars=True)
    guard = {key: value.detach().clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
             for key, value in current.items() if _is_guard_entry(key, value)}
    if guard:
        tree = {"model": guard}
        flat, paths = _flatten(tree)
        present = {key: value for key, value in flat.items() if key in saved}
        if present:
            dcp.load(present, storage_reader=IopathReader(path, path_manager))
        for key, value in flat.items():
            if not isinstance(value, torch.Tensor):
                _assign(tree, paths[key], present.get(key))
        read = {key: value for key, value in guard.items()
                if value is not None and (not isinstance(value, torch.Tensor) or f"model.{key}" in present)}
        model.load_state_dict(read, strict=False)
    mine = {key[len("model."):] for key in _flatten({"model": current})[0]}
    theirs = {key[len("model."):] for key in saved if key.startswith("model.")}
    if mine != theirs:
        raise ValueError(
            f"checkpoint {path} does not match the model; missing {sorted(mine - theirs)}, "
            f"unexpected {sorted(theirs - mine)}; nothing was loaded"
        )


def _check_param_groups(path: str, state: dict[str, Any], flat: dict[str, Any], paths: dict[str, Path],
                        optimizers: Mapping[str, Optimizer], path_manager: PathManager | None) -> None:
    """Read the checkpoint's param-group entries into copies and refuse, before DCP writes anything, groups this
    rank cannot rebuild (:func:`~torchrec_pss.checkpoint.param_groups.groups_of_optimizer`)."""
    staged = {key: copy.deepcopy(value) for key, value in flat.items() if paths[key][0] == "optimizers"
              and paths[key][2:3] == (GROUPS,) and isinstance(optimizers[paths[key][1]], KeyedOptimizer)}
    if not staged:
        return
    dcp.load(staged, storage_reader=IopathReader(path, path_manager))
    trial = {name: {GROUPS: copy.deepcopy(state["optimizers"][name][GROUPS])} for name in {paths[k][1] for k in staged}}
    for key, value in staged.items():
        _assign(trial, paths[key][1:], value)
    for name in trial:
        groups_of_optimizer(optimizers[name], name, trial[name])


def _check_tensor_shapes(path: str, flat: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
    """Refuse, naming every entry, tensors (plain, sharded or DTensor) whose saved global shape or dtype is not the
    one they have here (DCP would fail deep inside its load, or cast a float32 table into a float16 one)."""
    wrong = []
    for key, value in flat.items():
        saved = metadata.get(key)
        if not isinstance(value, torch.Tensor) or not isinstance(saved, TensorStorageMetadata):
            continue
        if tuple(saved.size) != tuple(value.size()) or saved.properties.dtype != value.dtype:
            wrong.append(f"{key}: saved {list(saved.size)} {saved.properties.dtype}, "
                         f"here {list(value.size())} {value.dtype}")
    if wrong:
        raise ValueError(f"checkpoint {path} does not match the model or optimizers: {'; '.join(wrong)}; "
                         "nothing was loaded")


def load_training_state(path: str, model: torch.nn.Module, optimizers: Mapping[str, Optimizer],
                        path_manager: PathManager | None = None) -> Progress:
    """Load the checkpoint at ``path`` into ``model`` and ``optimizers`` in place; returns its progress.

    Collective, like :func:`save_training_state`. Before DCP reads anything into the model, the model's own
    pre-load checks (e.g. a compressed table's method, recovery signature and hash constants, sharded by DMP
    or not) run on staging copies of the checkpoint's small entries, and its state keys must match: a refused
    checkpoint leaves model and optimizers unchanged. Optimizer states that torch creates at the first step
    (Adam's) are created first where the checkpoint holds them, so they are loaded too, and each optimizer's
    state entries must be the checkpoint's (:mod:`~torchrec_pss.checkpoint.optimizer_state`). The model's and
    optimizers' own ``load_state_dict`` run last. Use :func:`latest_checkpoint` to pick a checkpoint whose
    files have been verified.
    """
    path = local_file_uri(path)
    metadata = IopathReader(path, path_manager).read_metadata().state_dict_metadata
    saved = set(metadata)
    _check_model_state(path, saved, model, path_manager)
    created = materialize_lazy_states(optimizers, saved)
    try:
        state = _training_state(model, optimizers, Progress(-1, -1))
        guards = [key for key, value in model.state_dict(keep_vars=True).items() if _is_guard_entry(key, value)]
        for key in guards:  # read into copies: the model's load_state_dict checks (and may reorder) them first
            if isinstance(state["model"][key], torch.Tensor):
                state["model"][key] = state["model"][key].clone()
        flat, paths = _flatten(state)
        for field, default in Progress._field_defaults.items():  # an older checkpoint lacks them: keep the default
            if f"progress.{field}" not in saved:
                del flat[f"progress.{field}"]
                state["progress"][field] = default
        check_optimizer_states(path, flat, saved, optimizers)
        _check_tensor_shapes(path, flat, metadata)
        _check_param_groups(path, state, flat, paths, optimizers, path_manager)
        dcp.load(flat, storage_reader=IopathReader(path, path_manager))
    except BaseException:  # DCP's CheckpointException is not an Exception
        drop_states(created)
        raise
    for key, value in flat.items():  # tensors were loaded in place; other values were replaced
        _assign(state, paths[key], value)
    model.load_state_dict(state["model"])
    for name, optimizer in optimizers.items():
        optimizer.load_state_dict(groups_of_optimizer(optimizer, name, state["optimizers"][name]))
    return Progress(**{field: int(state["progress"][field]) for field in Progress._fields})
