"""Memory-budget mode: pick which tables to compress, and how much, to fit a total embedding budget.

Heuristic (documented contract):

1. Tables are considered largest first. The fewest largest float32 tables (compressed memories are float32;
   a table of another ``data_type`` stays plain, at its own element size) are compressed such that the
   tables left plain use at most ``plain_share`` of the budget; every smaller table stays plain.
2. The rest of the budget, less ``CONSTANT_BYTES_ALLOWANCE`` per compressed table, is split among the
   compressed tables in proportion to ``size^exponent`` (``exponent < 1``), so a larger table gets more memory
   in bytes but a higher compression ratio (``size^(1 - exponent)``): larger tables are compressed more, as PSS
   theory suggests.
3. A table whose share would hold it whole stays plain; one whose share would compress it less than
   ``min_ratio`` is compressed at ``min_ratio``, and one whose share exceeds ``max_elements`` float32 elements
   (ROBE and the hashing trick hash into ``[0, 2^31 - 1)``) gets ``max_elements``. Each costs less than its share,
   so the split of what is left is redone among the others (which only get more). Each compressed table gets its own memory of
   ``elements`` float32 elements, as ``make_config(table, elements)`` configures it (e.g.
   ``RobeConfig.for_memory``: ROBE with one share group per table).

The result is the ``compression`` mapping for ``CompressedEmbeddingBagCollection``; the bytes it
stores (memories, hash constants and plain tables) are at most the budget.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

from torchrec_pss.contract import MethodConfig
from torchrec_pss.hashing import PRIME

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
CONSTANT_BYTES_ALLOWANCE = 1024
"""Bytes set aside per compressed table for what it stores besides its memory (hash constants)."""


def parse_bytes(budget: int | float | str) -> int:
    """``10_000_000``, ``2e6`` (a whole number of bytes), ``"10 MB"`` (decimal) or ``"10MiB"`` (binary) -> bytes."""
    if isinstance(budget, int):
        value = budget
    elif isinstance(budget, float):
        if not budget.is_integer():
            raise ValueError(f"the embedding budget must be a whole number of bytes, got {budget!r}")
        value = int(budget)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if not match or match.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read a byte budget from {budget!r}; write e.g. '10 MB' or '512MiB'")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ValueError(f"the embedding budget must be positive, got {budget!r}")
    return value


def _bytes(table: EmbeddingBagConfig) -> int:
    """The plain table's bytes, as ``CompressedEmbeddingBagCollection`` stores it (float32 for FP32, else float16)."""
    return table.num_embeddings * table.embedding_dim * (4 if table.data_type == DataType.FP32 else 2)


def compression_for_budget(
    tables: Sequence[EmbeddingBagConfig],
    budget: int | float | str,
    make_config: Callable[[EmbeddingBagConfig, int], MethodConfig],
    plain_share: float = 0.5,
    exponent: float = 0.5,
    min_ratio: float = 2.0,
    max_elements: int = PRIME - 1,
) -> dict[str, MethodConfig]:
    """The ``compression`` mapping that fits ``tables`` into ``budget`` bytes (see the module docstring)."""
    total = parse_bytes(budget)
    if not 0 <= plain_share < 1 or not 0 < exponent < 1 or min_ratio < 1:
        raise ValueError(f"need 0 <= plain_share < 1, 0 < exponent < 1, min_ratio >= 1; got "
                         f"{plain_share}, {exponent}, {min_ratio}")
    if sum(_bytes(t) for t in tables) <= total:
        return {}
    plain = sorted(tables, key=_bytes, reverse=True)
    compressed: list[EmbeddingBagConfig] = []
    while sum(_bytes(t) for t in plain) > plain_share * total:
        candidates = [t for t in plain if t.data_type == DataType.FP32]
        if not candidates:
            break
        compressed.append(candidates[0])
        plain.remove(candidates[0])
    plain_bytes = sum(_bytes(t) for t in plain)
    available = total - plain_bytes - CONSTANT_BYTES_ALLOWANCE * len(compressed)
    if not compressed or available <= 0:
        raise ValueError(
            f"an embedding budget of {total} bytes is too small for these tables: the tables left plain need "
            f"{plain_bytes} bytes and each of the {len(compressed)} compressed ones {CONSTANT_BYTES_ALLOWANCE} more "
            "for its hash constants (only float32 tables can be compressed); raise the budget or lower plain_share"
        )
    settled: dict[str, float] = {}  # tables kept plain (their bytes) or capped at min_ratio (bytes of their memory)
    while True:
        free = [t for t in compressed if t.name not in settled]
        rest = available - sum(settled.values())
        weights = {t.name: _bytes(t) ** exponent for t in free}
        shares = {t.name: rest * weights[t.name] / sum(weights.values()) for t in free}
        over = [t for t in free if _bytes(t) / shares[t.name] < min_ratio or shares[t.name] > 4 * max_elements]
        if not over:
            break
        for table in over:
            whole = shares[table.name] >= _bytes(table)
            settled[table.name] = (_bytes(table) - CONSTANT_BYTES_ALLOWANCE if whole
                                   else min(_bytes(table) / min_ratio, 4 * max_elements))
            if whole:
                plain.append(table)
    result = {}
    for table in compressed:
        if table in plain:
            continue
        elements = max(1, int((shares[table.name] if table.name in shares else settled[table.name]) // 4))
        try:
            result[table.name] = make_config(table, elements)
        except ValueError as error:
            raise ValueError(f"table {table.name!r} ({elements:,} memory elements for its share): {error}") from None
    return result
