"""MLET: ``E[x] = W1[x] · W2`` during training; :func:`torchrec_pss.collapse` serves ``W1 · W2``."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import PSSMemory
from torchrec_pss.gradient_layout import use_sparse_rows
from torchrec_pss.pooling import embedding_bag, lengths_to_offsets
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.mlet.config import MLETConfig


@register_method(MLETConfig)
class MLETMemory(PSSMemory):
    """The two factors ``w1`` (``[n, k]``) and ``w2`` (``[k, d]``) of one table."""

    name = "mlet"
    config: MLETConfig
    collapses_for_inference = True

    def __init__(self, config: MLETConfig, tables: Sequence[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__(config, tables, device)
        (table,) = tables
        self.w1 = nn.Parameter(torch.empty(table.num_embeddings, config.inner_dim, device=device))
        self.w2 = nn.Parameter(torch.empty(config.inner_dim, table.embedding_dim, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w1.is_meta:
            return
        with torch.no_grad():
            self.w1.normal_(0.0, self.config.init_std)
            self.w2.normal_(0.0, self.config.init_std)

    def num_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in (self.w1, self.w2))

    def _sparse(self, ids: torch.Tensor) -> bool:
        return use_sparse_rows(self.config.gradient, self.w1, ids.numel())

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w1, sparse=self._sparse(ids)) @ self.w2

    def pooled(self, table: str, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
               mean: bool) -> torch.Tensor:
        """``(pooled W1 rows) · W2``: pooling is linear, so the bags are pooled in the inner dimension ``k`` by one
        ``F.embedding_bag`` and projected once per bag (``[S, k] x [k, d]``) instead of once per id."""
        return embedding_bag(ids, self.w1, lengths_to_offsets(lengths), weights, mean, self._sparse(ids)) @ self.w2

    def materialize(self, table: str) -> torch.Tensor:
        """``W1 · W2`` computed in float64: ``[n, d]``."""
        with torch.no_grad():
            return self.w1.double() @ self.w2.double()
