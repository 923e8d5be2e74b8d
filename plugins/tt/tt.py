"""TT-Rec tensor-train embeddings: rows are contracted from small cores, only for the ids a batch needs.

``E[x, j] = G_1[i_1, :, j_1, :] · G_2[i_2, :, j_2, :] ··· G_N[i_N, :, j_N, :]`` with ``x = Σ i_k ∏_{l>k} p_l``
and ``j = Σ j_k ∏_{l>k} q_l``; core ``k`` (``cores.<k-1>``) has shape ``[p_k, R_{k-1}, q_k, R_k]``.
The ``[n, d]`` table is never materialised in the forward pass.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import PSSMemory
from torchrec_pss.pooling import lengths_to_offsets, per_id_scale
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.tt import ops
from torchrec_pss_plugins.tt.config import TTConfig
from torchrec_pss_plugins.tt.shapes import TTShapes, suggest_tt_shapes

logger = logging.getLogger(__name__)

_TAIL = 2.0  # the sampled Gaussian keeps N(0, 1) draws with |w| >= 2


def _draws(init: str, count: int, generator: torch.Generator | None) -> torch.Tensor:
    """``count`` float64 draws of the named initial distribution (before scaling)."""
    if init == "uniform":
        return torch.rand(count, generator=generator, dtype=torch.float64) * 2 - 1
    if init == "normal":
        return torch.randn(count, generator=generator, dtype=torch.float64)
    kept: list[torch.Tensor] = []
    total = 0
    while total < count:
        batch = torch.randn(max(4 * count, 1024) * 8, generator=generator, dtype=torch.float64)
        batch = batch[batch.abs() >= _TAIL]
        kept.append(batch)
        total += batch.numel()
    return torch.cat(kept)[:count]


@register_method(TTConfig)
class TTMemory(PSSMemory):
    """The cores of one tensor-train table."""

    name = "tt"
    config: TTConfig

    def __init__(self, config: TTConfig, tables: Sequence[EmbeddingBagConfig], device: torch.device | None = None) -> None:
        super().__init__(config, tables, device)
        (table,) = tables
        n, d = table.num_embeddings, table.embedding_dim
        suggested = suggest_tt_shapes(n, d, config.num_cores)
        shapes = TTShapes(config.p_shapes or suggested.p_shapes, config.q_shapes or suggested.q_shapes)
        if math.prod(shapes.p_shapes) < n:
            raise ValueError(
                f"table {table.name!r}: TTConfig.p_shapes={list(shapes.p_shapes)} multiply to "
                f"{math.prod(shapes.p_shapes)} < num_embeddings={n}"
            )
        if math.prod(shapes.q_shapes) != d:
            raise ValueError(
                f"table {table.name!r}: TTConfig.q_shapes={list(shapes.q_shapes)} multiply to "
                f"{math.prod(shapes.q_shapes)} != embedding_dim={d}"
            )
        if config.p_shapes is None or config.q_shapes is None:
            logger.info("TT table %r: %s", table.name, shapes.describe(n, d))
        self.shapes = shapes
        self._n, self._d = n, d
        ranks = config.rank_list()
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(p, ranks[k], q, ranks[k + 1], device=device))
            for k, (p, q) in enumerate(zip(shapes.p_shapes, shapes.q_shapes))
        )
        self.reset_parameters()

    def extra_repr(self) -> str:
        return f"{self.shapes.describe(self._n, self._d)}, ranks={list(self.config.rank_list())}"

    def core_variance(self) -> float:
        """Variance of every core entry that gives reconstructed entries the variance ``1/(3n)``.

        An entry of ``E`` sums ``∏ R_k`` products of ``N`` independent zero-mean core entries.
        """
        target = 1.0 / (3 * self._n)
        return (target / math.prod(self.config.rank_list())) ** (1 / self.config.num_cores)

    def reset_parameters(self) -> None:
        if self.cores[0].is_meta:
            return
        seed = self.config.seed
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        variance = self.core_variance()
        with torch.no_grad():
            for core in self.cores:
                draws = _draws(self.config.init, core.numel(), generator)
                draws *= math.sqrt(variance / draws.pow(2).mean().item())
                core.copy_(draws.view(core.shape))

    def quantized(self, block_size: int) -> PSSMemory:
        from torchrec_pss_plugins.tt.int8 import Int8TTMemory  # it subclasses this class

        return Int8TTMemory(self, block_size)

    def num_bytes(self) -> int:
        return sum(c.numel() * c.element_size() for c in self.cores)

    def core_tensors(self) -> list[torch.Tensor]:
        """The float32 cores the ops read."""
        return list(self.cores)  # not self.cores[1:]: slicing re-wraps tensors as new Parameters

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``[U, d]`` of ``ids`` ``[U]`` by the ``tt_rows`` op (differentiable in the cores)."""
        return ops.tt_rows(self.core_tensors(), ids)

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        unique, inverse = torch.unique(ids, return_inverse=True)
        return self.rows(unique)[inverse]

    def pooled(self, table: str, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
               mean: bool) -> torch.Tensor:
        """One ``tt_pooled`` call: each id's row times its factor (weight, / bag length for MEAN) added into its bag."""
        cores = self.core_tensors()
        offsets = lengths_to_offsets(lengths)
        return ops.tt_pooled(cores, ids, offsets, per_id_scale(offsets, weights, mean, ids.numel(), cores[0].dtype))
