"""Pure-PyTorch reference of the QR ops (any device): compose each id's row from the part tables, pool.

``parts`` are ``QRMemory.parts`` (``[rows_j, width]``); id ``x`` reads row ``(x // c^j) mod c`` of part
``j < k-1`` and ``x // c^(k-1)`` of the last; rows are combined by ``operation`` (``mult`` / ``add``
elementwise, ``concat`` side by side). Bags are ``offsets`` ``[B + 1]``.
"""

from __future__ import annotations

from typing import get_args

import torch

from torchrec_pss.pooling import offsets_to_bag_index, per_id_scale
from torchrec_pss_plugins.qr.config import Operation

OPERATIONS = get_args(Operation)


def digits(ids: torch.Tensor, collisions: int, num_parts: int) -> list[torch.Tensor]:
    """Row of each part table for ``ids`` (integer division only, exact for any int64 id)."""
    out, rest = [], ids
    for _ in range(num_parts - 1):
        out.append(torch.remainder(rest, collisions))
        rest = torch.div(rest, collisions, rounding_mode="floor")
    return out + [rest]


def compose(rows: list[torch.Tensor], operation: str) -> torch.Tensor:
    """One embedding per id ``[N, d]`` from each part's rows ``[N, width]``."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {OPERATIONS}, got {operation!r}")
    if operation == "concat":
        return torch.cat(rows, dim=1)
    out = rows[0]
    for row in rows[1:]:
        out = out * row if operation == "mult" else out + row
    return out


def pooled_forward(parts: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                   collisions: int, operation: str, mean: bool) -> torch.Tensor:
    """Pooled embeddings ``[B, d]``: each composed row times its weight, summed per bag (MEAN: / bag length)."""
    rows = [part.index_select(0, digit) for part, digit in zip(parts, digits(ids, collisions, len(parts)))]
    embeddings = compose(rows, operation)
    scale = per_id_scale(offsets, weights, mean, ids.numel(), embeddings.dtype)
    if scale is not None:
        embeddings = embeddings * scale.unsqueeze(1)
    out = embeddings.new_zeros(offsets.numel() - 1, embeddings.shape[1])
    return out.index_add_(0, offsets_to_bag_index(offsets, ids.numel()), embeddings)


def part_grads_per_id(grad: torch.Tensor, parts: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor,
                      weights: torch.Tensor | None, collisions: int, operation: str,
                      mean: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per part: ``(rows [N], contributions [N, width])``, the row each id reads and its gradient there."""
    per_id = grad.index_select(0, offsets_to_bag_index(offsets, ids.numel()))
    scale = per_id_scale(offsets, weights, mean, ids.numel(), grad.dtype)
    if scale is not None:
        per_id = per_id * scale.unsqueeze(1)
    rows_of = digits(ids, collisions, len(parts))
    width = parts[0].shape[1]
    out = []
    for j, digit in enumerate(rows_of):
        if operation == "concat":
            g = per_id[:, j * width:(j + 1) * width]
        elif operation == "add":
            g = per_id
        else:
            g = per_id
            for other, other_digit in zip(parts[:j] + parts[j + 1:], rows_of[:j] + rows_of[j + 1:]):
                g = g * other.index_select(0, other_digit)
        out.append((digit, g))
    return out


def pooled_backward(grad: torch.Tensor, parts: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor,
                    weights: torch.Tensor | None, collisions: int, operation: str, mean: bool,
                    sparse: list[bool] | None = None) -> list[torch.Tensor]:
    """Gradient of every part table (dense, or sparse COO over rows where ``sparse[j]``)."""
    grads = []
    for j, (part, (digit, g)) in enumerate(zip(parts, part_grads_per_id(grad, parts, ids, offsets, weights,
                                                                         collisions, operation, mean))):
        if sparse is not None and sparse[j]:
            grads.append(torch.sparse_coo_tensor(digit.unsqueeze(0), g, part.shape).coalesce())
        else:
            grads.append(part.new_zeros(part.shape).index_add_(0, digit, g))
    return grads


def grad_rows(grad: torch.Tensor, parts: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor,
              weights: torch.Tensor | None, collisions: int, operation: str,
              mean: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every part's gradient over the rows the batch reads: ``rows[j]`` ``[U_j]`` ascending and unique and
    ``values[j]`` ``[U_j, width]``; the indices and values of part ``j``'s sparse COO gradient."""
    rows, values = [], []
    for digit, g in part_grads_per_id(grad, parts, ids, offsets, weights, collisions, operation, mean):
        unique, inverse = torch.unique(digit, return_inverse=True)
        rows.append(unique.to(torch.int64))
        values.append(g.new_zeros(unique.numel(), g.shape[1]).index_add_(0, inverse, g))
    return rows, values


def weights_grad(grad: torch.Tensor, parts: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor,
                 collisions: int, operation: str, mean: bool) -> torch.Tensor:
    """The gradient ``[N]`` of the per-sample weights: each composed row dotted with its bag's output gradient."""
    rows = [part.index_select(0, digit) for part, digit in zip(parts, digits(ids, collisions, len(parts)))]
    out = (grad.index_select(0, offsets_to_bag_index(offsets, ids.numel())) * compose(rows, operation)).sum(1)
    scale = per_id_scale(offsets, None, mean, ids.numel(), out.dtype)
    return out if scale is None else out * scale
