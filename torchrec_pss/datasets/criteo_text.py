"""Criteo display-advertising rows from text files, read through iopath (local paths or URIs).

Two layouts: the Kaggle / 1TB day format (tab-separated ``label, I1..I13, C1..C26``, no header; rows
that lost trailing empty fields are padded) and the comma-separated layout with a header row
``label,I1..I13,C1..C26`` (every row has the header's 40 fields; integers may be written as floats, ``260.0``;
numbers are ASCII decimals). Preprocessing: each dense value
``x`` becomes ``log(max(x, 0) + 1)`` on its own (missing -> 0, so missing and negative counts give 0.0; the
facebookresearch DLRM convention), each sparse id ``int(hex, 16) mod num_embeddings[f]`` (hex digits only;
missing -> 0). Gzip-compressed files (Criteo 1TB's ``day_<i>.gz``) are read as they are. Anything malformed
raises ``ValueError`` naming the file, the line and the field.

This is not the dense transform of TorchRec's NumPy days (:mod:`~torchrec_pss.datasets.criteo_npy`):
``BinaryCriteoUtils.tsv_to_npys`` writes ``log(x - m + 2)``, with missing -> 0 first and ``m`` the smallest of
all 13 integer features over every row of the one file it converts (one shift per day file, not per column).
The two paths are not interchangeable: the same rows give different dense inputs (a raw 0 is 0.0 here and
``log(2 - m)`` there), so train, evaluate and serve a model from one of them.
"""

from __future__ import annotations

import gzip
import io
import itertools
import math
import re
import zlib
from typing import IO, Iterator, Sequence

import torch
from iopath.common.file_io import g_pathmgr
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES, DEFAULT_INT_NAMES
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

NUM_DENSE, NUM_SPARSE = len(DEFAULT_INT_NAMES), len(DEFAULT_CAT_NAMES)
NUM_FIELDS = 1 + NUM_DENSE + NUM_SPARSE
_HEADER = ["label", *(f"I{i}" for i in range(1, NUM_DENSE + 1)), *(f"C{i}" for i in range(1, NUM_SPARSE + 1))]

_HEX = re.compile(r"[0-9a-fA-F]+")
_NUMBER = re.compile(r"[+-]?[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?")
_GZIP_MAGIC = b"\x1f\x8b"


def parse_row(fields: list[str], num_embeddings: Sequence[int], where: str,
              padded: bool = True) -> tuple[int, list[float], list[int]]:
    """``(label, 13 dense values, 26 sparse ids)`` of one row's fields (``where`` names file:line); ``padded``:
    a row may lack trailing fields (the tab day format), else it must have all 40 (the CSV layout)."""
    if len(fields) > NUM_FIELDS or (not padded and len(fields) != NUM_FIELDS):
        expected = f"at most {NUM_FIELDS}" if padded else f"{NUM_FIELDS} (the header's)"
        raise ValueError(f"{where}: expected {expected} fields, got {len(fields)}")
    fields = fields + [""] * (NUM_FIELDS - len(fields))
    label_text = fields[0].strip()
    if label_text not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"{where}: label must be 0 or 1, got {label_text!r}")
    dense = []
    for name, text in zip(_HEADER[1 : 1 + NUM_DENSE], fields[1 : 1 + NUM_DENSE]):
        digits = text.strip()
        if digits and not _NUMBER.fullmatch(digits):
            raise ValueError(f"{where}: {name} is not a number: {text!r}")
        value = float(digits) if digits else 0.0
        if not math.isfinite(value) or value != int(value):
            raise ValueError(f"{where}: {name} must be an integer count, got {text!r}")
        dense.append(math.log(max(value, 0.0) + 1.0))
    sparse = []
    for name, text, n in zip(_HEADER[1 + NUM_DENSE :], fields[1 + NUM_DENSE :], num_embeddings):
        digits = text.strip()
        if digits and not _HEX.fullmatch(digits):
            raise ValueError(f"{where}: {name} is not a hexadecimal id: {text!r}")
        sparse.append(int(digits, 16) % n if digits else 0)
    return int(float(label_text)), dense, sparse


def read_rows(path: str, num_embeddings: Sequence[int]) -> Iterator[tuple[int, list[float], list[int]]]:
    """Parsed rows of one file; the layout (tab day format or CSV with header) is detected from line 1."""
    if len(num_embeddings) != NUM_SPARSE:
        raise ValueError(f"num_embeddings needs {NUM_SPARSE} values, got {len(num_embeddings)}")
    with g_pathmgr.open(path, "rb") as raw, _decompressed(raw) as handle:
        delimiter = "\t"
        for number, line in _lines(handle, path):
            if number == 1 and line.startswith("label,"):
                if line.split(",") != _HEADER:
                    raise ValueError(f"{path}:1: header must be {','.join(_HEADER)}")
                delimiter = ","
                continue
            if not line:
                continue
            yield parse_row(line.split(delimiter), num_embeddings, f"{path}:{number}", padded=delimiter == "\t")


def _lines(handle: IO[bytes], path: str) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of ``handle``, without its line end; bytes that are not UTF-8 or a damaged
    gzip stream raise ``ValueError`` naming ``path`` and the line."""
    for number in itertools.count(1):
        try:
            data = handle.readline()
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            raise ValueError(f"{path}:{number}: damaged gzip data ({error})") from None
        if not data:
            return
        try:
            line = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}:{number}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        yield number, line.rstrip("\r\n")


def _decompressed(raw: IO[bytes]) -> IO[bytes]:
    """``raw`` itself, or a gzip reader over it when it starts with gzip's magic bytes."""
    stream = io.BufferedReader(raw) if not hasattr(raw, "peek") else raw
    return gzip.GzipFile(fileobj=stream) if stream.peek(2)[:2] == _GZIP_MAGIC else stream


def batches(paths: Sequence[str], batch_size: int, num_embeddings: Sequence[int], drop_last: bool = False
            ) -> Iterator[Batch]:
    """TorchRec ``Batch``es (dense ``[B, 13]``, one id per sparse feature, labels ``[B]``) over ``paths`` in order."""
    rows: list[tuple[int, list[float], list[int]]] = []
    for path in paths:
        for row in read_rows(path, num_embeddings):
            rows.append(row)
            if len(rows) == batch_size:
                yield _batch(rows)
                rows = []
    if rows and not drop_last:
        yield _batch(rows)


def _batch(rows: list[tuple[int, list[float], list[int]]]) -> Batch:
    labels = torch.tensor([r[0] for r in rows], dtype=torch.float32)
    dense = torch.tensor([r[1] for r in rows], dtype=torch.float32)
    ids = torch.tensor([r[2] for r in rows], dtype=torch.int64)  # [B, 26]
    sparse = KeyedJaggedTensor(
        keys=list(DEFAULT_CAT_NAMES),
        values=ids.t().reshape(-1),
        lengths=torch.ones(NUM_SPARSE * len(rows), dtype=torch.int32),
    )
    return Batch(dense_features=dense, sparse_features=sparse, labels=labels)
