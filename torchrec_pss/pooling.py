"""Pooling of per-id embeddings into bags (SUM / MEAN, optionally weighted)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from torchrec_pss.sparse_rows_bag import sparse_rows_bag


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


def offsets_to_bag_index(offsets: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Bag number of every id ``[N]`` for bags given by ``offsets`` ``[B + 1]``."""
    return bag_index(offsets[1:] - offsets[:-1], num_ids)


def per_id_scale(offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool, num_ids: int,
                 dtype: torch.dtype) -> torch.Tensor | None:
    """Each id's factor in its bag's pooled output ``[N]`` (its weight; divided by the bag length for MEAN),
    or None when every factor is 1."""
    scale = None if weights is None else weights.to(dtype)
    if mean:
        lengths = (offsets[1:] - offsets[:-1]).clamp(min=1).to(dtype)
        per_id = 1.0 / lengths.index_select(0, offsets_to_bag_index(offsets, num_ids))
        scale = per_id if scale is None else scale * per_id
    return scale


def lengths_to_offsets(lengths: torch.Tensor) -> torch.Tensor:
    """Bag offsets ``[S + 1]`` (``0, l_0, l_0 + l_1, ...``) of bag ``lengths`` ``[S]``."""
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def embedding_bag(rows: torch.Tensor, table: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                  mean: bool, sparse: bool) -> torch.Tensor:
    """Bags of the rows ``rows`` ``[N]`` of ``table`` ``[k, d]`` pooled as :func:`pool` does (a weighted MEAN is
    the weighted sum / bag length), in one ``F.embedding_bag`` call (bags: ``offsets`` ``[S + 1]``): ``[S, d]``.
    ``sparse``: ``table``'s gradient as a sparse COO tensor; an unweighted MEAN then pools as a sum weighted by
    1 / bag length (PyTorch's meta kernel of the sparse MEAN backward fails under ``torch.compile``); while
    compiling a training step, a sparse gradient goes through the op
    :func:`~torchrec_pss.sparse_rows_bag.sparse_rows_bag` (the sparse backward of ``F.embedding_bag`` with
    per-sample weights does not trace either)."""
    if sparse and torch.compiler.is_compiling() and torch.is_grad_enabled() and table.requires_grad:
        return sparse_rows_bag(table, rows, offsets, per_id_scale(offsets, weights, mean, rows.numel(), table.dtype))
    if weights is None and mean and sparse:
        scale = per_id_scale(offsets, None, True, rows.numel(), table.dtype)
        return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=scale, sparse=True,
                               include_last_offset=True)
    if weights is None:
        return F.embedding_bag(rows, table, offsets, mode="mean" if mean else "sum", sparse=sparse,
                               include_last_offset=True)
    summed = F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=weights.to(table.dtype),
                             sparse=sparse, include_last_offset=True)
    return bag_mean(summed, offsets[1:] - offsets[:-1]) if mean else summed
