"""QR compositional embeddings: ``E[x] = op(P_0[x mod c], P_1[(x // c) mod c], ..., P_{k-1}[x // c^(k-1)])``.

See :class:`~torchrec_pss_plugins.qr.config.QRConfig` for the partitions, operations and the default
initialisation. Each table has its own part tables ``parts.<j>`` (``[rows_j, d_j]``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import PSSMemory
from torchrec_pss.gradient_layout import keep_coalesced_flag, use_sparse_rows
from torchrec_pss.pooling import lengths_to_offsets
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.qr import ops, reference
from torchrec_pss_plugins.qr.config import QRConfig


def part_rows(n: int, collisions: int, num_partitions: int) -> list[int]:
    """Rows of each part table: ``c`` for every digit, ``ceil(n / c^(k-1))`` for the quotient."""
    return [collisions] * (num_partitions - 1) + [-(-n // collisions ** (num_partitions - 1))]


def stored_elements(n: int, d: int, collisions: int, config: QRConfig) -> int:
    width = d // config.num_partitions if config.operation == "concat" else d
    return sum(part_rows(n, collisions, config.num_partitions)) * width


def collisions_for(table: EmbeddingBagConfig, config: QRConfig) -> int:
    """``config.collisions``, or the smallest ``c`` whose parts store at most ``n·d / compression`` elements."""
    if config.collisions is not None:
        return config.collisions
    n, d = table.num_embeddings, table.embedding_dim
    budget = n * d / config.compression
    best = max(2, math.ceil(n ** (1 / config.num_partitions)))
    for c in range(2, best + 1):
        if stored_elements(n, d, c, config) <= budget:
            return c
    reachable = n * d / stored_elements(n, d, best, config)
    more = dataclasses.replace(config, num_partitions=config.num_partitions + 1)
    deeper = n * d / stored_elements(n, d, max(2, math.ceil(n ** (1 / more.num_partitions))), more)
    hints = [hint for hint, useful in (("lower it", reachable >= 1), ("add partitions", deeper > reachable)) if useful]
    advice = " or ".join(hints) if hints else "keep this table plain (e.g. min_rows in a compression flag)"
    raise ValueError(
        f"table {table.name!r}: QRConfig.compression={config.compression:g} is out of reach with "
        f"{config.num_partitions} partitions (at most {reachable:.1f}x for n={n}); {advice}"
    )


@register_method(QRConfig)
class QRMemory(PSSMemory):
    """The part tables of one compressed table."""

    name = "qr"
    config: QRConfig

    def __init__(self, config: QRConfig, tables: Sequence[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__(config, tables, device)
        (table,) = tables
        k, d = config.num_partitions, table.embedding_dim
        if config.operation == "concat" and d % k:
            raise ValueError(
                f"table {table.name!r}: QRConfig.operation='concat' needs embedding_dim={d} divisible by num_partitions={k}"
            )
        if table.num_embeddings < 3:
            raise ValueError(
                f"table {table.name!r}: QR needs num_embeddings >= 3 (collisions from 2 to num_embeddings - 1), got "
                f"{table.num_embeddings}; keep this table plain (e.g. min_rows in a compression flag)"
            )
        self.collisions = collisions_for(table, config)
        if self.collisions >= table.num_embeddings:
            raise ValueError(
                f"table {table.name!r}: QRConfig.collisions={self.collisions} must be < num_embeddings={table.num_embeddings}"
            )
        self._n = table.num_embeddings
        width = d // k if config.operation == "concat" else d
        self.parts = nn.ParameterList(
            nn.Parameter(torch.empty(rows, width, device=device)) for rows in part_rows(self._n, self.collisions, k)
        )
        self.reset_parameters()

    def default_init_scale(self) -> float:
        """``s`` of the default ``U(-s, s)``: composed rows get variance ``1/(3n)`` (see QRConfig)."""
        target, k = 1.0 / (3 * self._n), self.config.num_partitions
        part_variance = {"concat": target, "add": target / k, "mult": target ** (1 / k)}[self.config.operation]
        return math.sqrt(3 * part_variance)

    def reset_parameters(self) -> None:
        if self.parts[0].is_meta:
            return
        scale = self.config.init_scale or self.default_init_scale()
        with torch.no_grad():
            for part in self.parts:
                part.uniform_(-scale, scale)

    def quantized(self, block_size: int) -> PSSMemory:
        from torchrec_pss_plugins.qr.int8 import Int8QRMemory  # it subclasses this class

        return Int8QRMemory(self, block_size)

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts)

    def digits(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """Row of each part table for ``ids`` (integer division only, exact for any int64 id)."""
        return reference.digits(ids, self.collisions, self.config.num_partitions)

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype lookups pool in (the parts')."""
        return self.parts[0].dtype

    def _bags(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool) -> torch.Tensor:
        sparse = [use_sparse_rows(self.config.gradient, part, ids.numel()) for part in self.parts]
        for part, part_sparse in zip(self.parts, sparse):
            if part_sparse:
                keep_coalesced_flag(part)
        return ops.qr_pooled(list(self.parts), ids, offsets, weights, self.collisions, self.config.operation, mean,
                             sparse)

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return self._bags(ids, torch.arange(ids.numel() + 1, device=ids.device), None, False)

    def pooled(self, table: str, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
               mean: bool) -> torch.Tensor:
        offsets = lengths_to_offsets(lengths)
        return self._bags(ids, offsets, None if weights is None else weights.to(self.compute_dtype), mean)
