"""Memory-budget mode: pick which tables to compress, and how much, to fit a total embedding budget.

Heuristic (documented contract):

1. Tables are considered largest first. The fewest largest tables are compressed such that the
   tables left plain use at most ``plain_share`` of the budget; every smaller table stays plain.
2. The rest of the budget is split among the compressed tables in proportion to ``size^exponent``
   (``exponent < 1``), so a larger table gets more memory in bytes but a higher compression ratio
   (``size^(1 - exponent)``): larger tables are compressed more, as PSS theory suggests.
3. A table whose share would not compress it (ratio ``< min_ratio``) is left plain instead, and the
   split is redone. Each compressed table gets its own memory of ``elements`` float32 elements, as
   ``make_config(table, elements)`` configures it (e.g. ``RobeConfig.for_memory``: ROBE with one
   share group per table).

The result is the ``compression`` mapping for ``CompressedEmbeddingBagCollection``; the bytes it
stores (memories, hash constants and plain tables) are at most the budget.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import MethodConfig

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
    return table.num_embeddings * table.embedding_dim * 4


def compression_for_budget(
    tables: Sequence[EmbeddingBagConfig],
    budget: int | float | str,
    make_config: Callable[[EmbeddingBagConfig, int], MethodConfig],
    plain_share: float = 0.5,
    exponent: float = 0.5,
    min_ratio: float = 2.0,
) -> dict[str, MethodConfig]:
    """The ``compression`` mapping that fits ``tables`` into ``budget`` bytes (see the module docstring)."""
    total = parse_bytes(budget)
    if not 0 <= plain_share < 1 or not 0 < exponent < 1 or min_ratio < 1:
        raise ValueError(f"need 0 <= plain_share < 1, 0 < exponent < 1, min_ratio >= 1; got "
                         f"{plain_share}, {exponent}, {min_ratio}")
    if sum(_bytes(t) for t in tables) <= total:
        return {}
    ordered = sorted(tables, key=_bytes, reverse=True)
    plain = list(ordered)
    compressed: list[EmbeddingBagConfig] = []
    while plain and sum(_bytes(t) for t in plain) > plain_share * total:
        compressed.append(plain.pop(0))
    while compressed:
        available = total - sum(_bytes(t) for t in plain) - CONSTANT_BYTES_ALLOWANCE * len(compressed)
        weights = [_bytes(t) ** exponent for t in compressed]
        shares = {t.name: available * w / sum(weights) for t, w in zip(compressed, weights)}
        too_big = [t for t in compressed if _bytes(t) / max(shares[t.name], 1) < min_ratio]
        if not too_big:
            break
        for table in too_big:
            compressed.remove(table)
            plain.append(table)
    if not compressed or available <= 0:
        raise ValueError(
            f"an embedding budget of {total} bytes is too small for these tables: the plain tables alone "
            f"need {sum(_bytes(t) for t in plain)} bytes; raise the budget or plain_share"
        )
    return {t.name: make_config(t, max(1, int(shares[t.name] // 4))) for t in compressed}
