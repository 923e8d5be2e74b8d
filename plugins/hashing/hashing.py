"""The hashing trick: ``E_t[x] = M_t[h(t, x) mod k]`` with the universal hash of :mod:`torchrec_pss.hashing`.

``h(t, x) = ((A·t + B·(x mod P) + D) mod P) mod k`` (``C·c`` with ``c = 0``), ``t = crc32(table name)``,
coefficients from ``seed`` (buffer ``hash_coefficients`` ``[1, 4]``). Each table has its own ``[k, d]``
memory ``weight``.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import PSSMemory
from torchrec_pss.gradient_layout import use_sparse_rows
from torchrec_pss.hashing import hash_coefficients, table_key, universal_hash
from torchrec_pss.pooling import embedding_bag, lengths_to_offsets
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.hashing.config import HashingConfig


@register_method(HashingConfig)
class HashingMemory(PSSMemory):
    """One ``[k, d]`` table ``weight`` per compressed table, rows picked by a universal hash of the id."""

    name = "hashing"
    config: HashingConfig

    def __init__(self, config: HashingConfig, tables: Sequence[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__(config, tables, device)
        (table,) = tables
        buckets = config.num_buckets or math.ceil(table.num_embeddings / config.compression)
        self._key = table_key(table.name)
        self.weight = nn.Parameter(torch.empty(buckets, table.embedding_dim, device=device))
        self.register_buffer("hash_coefficients", torch.empty(1, 4, dtype=torch.int64, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        scale = self.config.init_scale or math.sqrt(1.0 / self.weight.shape[0])
        with torch.no_grad():
            self.weight.uniform_(-scale, scale)
            self.hash_coefficients.copy_(hash_coefficients(self.config.seed, 1))

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.hash_coefficients))

    def buckets(self, ids: torch.Tensor) -> torch.Tensor:
        """Row of the memory each id reads: ``[N]`` int64 in ``[0, k)``."""
        return universal_hash(self.hash_coefficients[0], self._key, ids, 0, self.weight.shape[0])

    def _sparse(self, ids: torch.Tensor) -> bool:
        return use_sparse_rows(self.config.gradient, self.weight, ids.numel())

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.buckets(ids), self.weight, sparse=self._sparse(ids))

    def pooled(self, table: str, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
               mean: bool) -> torch.Tensor:
        """One ``F.embedding_bag`` over the hashed rows (no ``[N, d]`` intermediate)."""
        return embedding_bag(self.buckets(ids), self.weight, lengths_to_offsets(lengths), weights, mean,
                             self._sparse(ids))
