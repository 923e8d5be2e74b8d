"""Pooling of per-id embeddings into bags (SUM / MEAN, optionally weighted)."""

from __future__ import annotations

import torch


def bag_index(lengths: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Bag number of every id: ``[N]`` int64 for bag ``lengths`` ``[S]``."""
    return torch.repeat_interleave(
        torch.arange(lengths.numel(), device=lengths.device), lengths, output_size=num_ids
    )


def pool(
    embeddings: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    mean: bool,
) -> torch.Tensor:
    """Pool ``embeddings`` ``[N, d]`` into ``len(lengths)`` bags: ``[S, d]``.

    Each embedding is multiplied by its weight (``[N]``) first. MEAN divides the (weighted) sum by
    the bag length, as FBGEMM's TBE does; empty bags give zeros.
    """
    if weights is not None:
        embeddings = embeddings * weights.to(embeddings.dtype).unsqueeze(1)
    out = embeddings.new_zeros(lengths.numel(), embeddings.shape[1])
    out = out.index_add(0, bag_index(lengths, embeddings.shape[0]), embeddings)
    return bag_mean(out, lengths) if mean else out


def bag_mean(sums: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Per-bag sums ``[S, d]`` divided by the bag lengths ``[S]``; empty bags stay zero."""
    return sums / lengths.clamp(min=1).to(sums.dtype).unsqueeze(1)
