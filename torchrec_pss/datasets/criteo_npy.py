"""TorchRec's preprocessed NumPy Criteo format (``day_<i>_{dense,sparse,labels}.npy``), read with
``torchrec.datasets.criteo.InMemoryBinaryCriteoIterDataPipe``.

The files are what ``torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys`` (and TorchRec's
``npy_preproc_criteo.py``) write: dense ``[rows, 13]`` float32 (already log-transformed), sparse
``[rows, 26]`` ids (taken mod each table's ``num_embeddings`` here), labels ``[rows, 1]`` int32.
The dense transform is ``tsv_to_npys``'s: ``log(x - m + 2)``, with missing -> 0 first and ``m`` the smallest of
all 13 integer features over every row of the one file it converts (one shift per day file, not per column).
The text reader (:mod:`~torchrec_pss.datasets.criteo_text`) instead maps each value to ``log(max(x, 0) + 1)``
on its own. The two paths are not interchangeable: the same rows give different dense inputs (a raw 0 is
``log(2 - m)`` here and 0.0 there), so train, evaluate and serve a model from one of them.
"""

from __future__ import annotations

import posixpath
import re
from typing import Iterator, Sequence

import numpy as np
from iopath.common.file_io import g_pathmgr
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES, InMemoryBinaryCriteoIterDataPipe
from torchrec.datasets.utils import Batch

NUM_DENSE, NUM_SPARSE = len(DEFAULT_INT_NAMES), len(DEFAULT_CAT_NAMES)
_DAY_FILE = re.compile(r"^day_(\d+)_(dense|sparse|labels)\.npy$")
_PARTS = ("dense", "sparse", "labels")
_COLUMNS = {"dense": ((NUM_DENSE,),), "sparse": ((NUM_SPARSE,),), "labels": ((1,),)}
"""The trailing shapes of each part: ``[rows, 13]``, ``[rows, 26]``, ``[rows, 1]`` (TorchRec's reader indexes
labels as ``[rows, 1]``)."""


def npy_shape(path: str) -> tuple[int, ...]:
    """The shape of the ``.npy`` array at iopath location ``path``, read from its header only."""
    with g_pathmgr.open(path, "rb") as stream:
        try:
            version = np.lib.format.read_magic(stream)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, _ = read_header(stream)
        except ValueError as error:
            raise ValueError(f"{path}: not a .npy array ({error})") from None
    return shape


def npy_days(root: str) -> dict[int, int]:
    """The rows of each day under ``root``, by day number ascending.

    Every day needs all three parts with the same number of rows and their columns (``[rows, 13]``,
    ``[rows, 26]``, ``[rows, 1]``); anything else raises ``ValueError`` naming the file.
    """
    names = set(g_pathmgr.ls(root)) if g_pathmgr.isdir(root) else set()
    if not names:
        raise ValueError(f"{root!r}: no such directory, or it is empty (expected day_<i>_dense/sparse/labels.npy)")
    days = sorted({int(m.group(1)) for m in map(_DAY_FILE.match, names) if m})
    if not days:
        raise ValueError(f"{root!r}: no day_<i>_dense/sparse/labels.npy files")
    rows = {}
    for day in days:
        shapes = {}
        for part in _PARTS:
            name = f"day_{day}_{part}.npy"
            if name not in names:
                raise ValueError(f"{root!r}: day {day} has no {name}")
            shape = npy_shape(posixpath.join(root, name))
            if len(shape) < 1 or tuple(shape[1:]) not in _COLUMNS[part]:
                expected = " or ".join(str(["rows", *columns]) for columns in _COLUMNS[part])
                advice = " (save it as labels.reshape(-1, 1))" if part == "labels" and len(shape) == 1 else ""
                raise ValueError(f"{posixpath.join(root, name)}: shape {list(shape)}, expected {expected}{advice}")
            shapes[part] = shape[0]
        if len(set(shapes.values())) != 1:
            raise ValueError(f"{root!r}: the parts of day {day} have different row counts: {shapes}")
        rows[day] = shapes["dense"]
    return rows


def npy_batches(root: str, days: Sequence[int], batch_size: int, num_embeddings: Sequence[int], rank: int,
                world_size: int, stage: str = "train") -> Iterator[Batch]:
    """This rank's full batches of ``days`` (every ``world_size``-th batch), with float labels ``[B]``.

    ``stage`` is TorchRec's: "train" reads the days whole, "val" / "test" the first / second half of
    the first day listed. The days are memory-mapped (TorchRec's ``mmap_mode``), so a rank holds its batches, not
    the days. A label other than 0 or 1 (``tsv_to_npys`` writes -1 for unlabelled rows) raises
    ``ValueError`` naming the days' label files and the batch.
    """
    paths = {part: [posixpath.join(root, f"day_{d}_{part}.npy") for d in days] for part in _PARTS}
    pipe = InMemoryBinaryCriteoIterDataPipe(
        stage, paths["dense"], paths["sparse"], paths["labels"], batch_size=batch_size, rank=rank,
        world_size=world_size, drop_last=True, hashes=list(num_embeddings), mmap_mode=True,
    )  # memory-mapped: a rank reads its batches' rows, not every day whole (ids taken mod hashes per batch)
    for index, batch in enumerate(pipe):
        bad = (batch.labels != 0) & (batch.labels != 1)
        if bad.any():
            raise ValueError(f"{paths['labels']}: batch {index} of this rank ({stage}) has the label "
                             f"{batch.labels[bad][0].item()}; labels must be 0 or 1")
        yield Batch(dense_features=batch.dense_features, sparse_features=batch.sparse_features,
                    labels=batch.labels.float())
