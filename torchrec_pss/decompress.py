"""``decompress``: serve chosen compressed tables as ordinary ``[n, d]`` float32 tables."""

from __future__ import annotations

from typing import Iterable

import torch
from torchrec import EmbeddingBagCollection

from torchrec_pss.collapse import with_plain_tables
from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

DEFAULT_MAX_BYTES = 1 << 30
"""Default limit (1 GiB) on the bytes of the tables :func:`decompress` materialises."""


def decompress(
    module: CompressedEmbeddingBagCollection,
    tables: str | Iterable[str] | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> EmbeddingBagCollection | CompressedEmbeddingBagCollection:
    """A copy of ``module`` in which the named compressed tables (``None``: all of them) are plain tables.

    Each table's full ``[n, d]`` table is materialised (``PSSMemory.materialize``, float64, cast to
    float32), so outputs equal ``module``'s up to float32 rounding. Named tables that are plain already
    are copied as they are. Tables not named stay as they are: when no compressed table is left the
    result is a ``torchrec.EmbeddingBagCollection``, otherwise a ``CompressedEmbeddingBagCollection``
    in which the rest keep copies of their memories (details: :func:`torchrec_pss.collapse.with_plain_tables`).

    ``max_bytes`` bounds the float32 bytes of the tables made plain (``4 · n · d`` each, summed; while a
    table is built its float64 copy needs twice its bytes more). Raises ``ValueError`` before anything
    is allocated when they exceed it (naming each table and its bytes) or when ``tables`` names tables
    the module does not have.
    """
    configs = module.embedding_bag_configs()
    names = [table.name for table in configs]
    wanted = set(module.compression) if tables is None else {tables} if isinstance(tables, str) else set(tables)
    unknown = sorted(wanted - set(names))
    if unknown:
        raise ValueError(f"decompress: the module has no tables {unknown}; it has {names}")
    chosen = [table for table in configs if table.name in wanted and table.name in module.compression]
    sizes = {table.name: table.num_embeddings * table.embedding_dim * torch.float32.itemsize for table in chosen}
    total = sum(sizes.values())
    if total > max_bytes:
        listed = ", ".join(f"{t.name!r} [{t.num_embeddings:,} x {t.embedding_dim}]: {sizes[t.name]:,} bytes"
                           for t in chosen)
        raise ValueError(
            f"decompress: the tables to materialise need {total:,} bytes of float32 ({listed}), more than "
            f"max_bytes={max_bytes:,}; name fewer tables or raise max_bytes"
        )
    return with_plain_tables(module, sizes)
