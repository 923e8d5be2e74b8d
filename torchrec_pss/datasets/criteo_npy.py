"""TorchRec's preprocessed NumPy Criteo format (``day_<i>_{dense,sparse,labels}.npy``), read with
``torchrec.datasets.criteo.InMemoryBinaryCriteoIterDataPipe``.

The files are what ``torchrec.datasets.criteo.BinaryCriteoUtils.tsv_to_npys`` (and TorchRec's
``npy_preproc_criteo.py``) write: dense ``[rows, 13]`` float32 (already log-transformed), sparse
``[rows, 26]`` ids (taken mod each table's ``num_embeddings`` here), labels ``[rows, 1]`` int32.
"""

from __future__ import annotations

import posixpath
import re
from typing import Iterator, Sequence

from iopath.common.file_io import g_pathmgr
from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe
from torchrec.datasets.utils import Batch

_DAY_FILE = re.compile(r"^day_(\d+)_dense\.npy$")
_PARTS = ("dense", "sparse", "labels")


def npy_days(root: str) -> list[int]:
    """The day numbers under ``root`` that have all three files, ascending; ValueError if a part is missing."""
    names = set(g_pathmgr.ls(root)) if g_pathmgr.isdir(root) else set()
    if not names:
        raise ValueError(f"{root!r}: no such directory, or it is empty (expected day_<i>_dense/sparse/labels.npy)")
    days = sorted(int(m.group(1)) for m in map(_DAY_FILE.match, names) if m)
    for day in days:
        for part in _PARTS:
            if f"day_{day}_{part}.npy" not in names:
                raise ValueError(f"{root!r}: day {day} has no day_{day}_{part}.npy")
    if not days:
        raise ValueError(f"{root!r}: no day_<i>_dense.npy files")
    return days


def npy_batches(root: str, days: Sequence[int], batch_size: int, num_embeddings: Sequence[int], rank: int,
                world_size: int, stage: str = "train") -> Iterator[Batch]:
    """This rank's full batches of ``days`` (every ``world_size``-th batch), with float labels ``[B]``.

    ``stage`` is TorchRec's: "train" reads the days whole, "val" / "test" the first / second half of
    the first day listed.
    """
    paths = {part: [posixpath.join(root, f"day_{d}_{part}.npy") for d in days] for part in _PARTS}
    pipe = InMemoryBinaryCriteoIterDataPipe(
        stage, paths["dense"], paths["sparse"], paths["labels"], batch_size=batch_size, rank=rank,
        world_size=world_size, drop_last=True, hashes=list(num_embeddings),
    )
    for batch in pipe:
        yield Batch(dense_features=batch.dense_features, sparse_features=batch.sparse_features,
                    labels=batch.labels.float())
