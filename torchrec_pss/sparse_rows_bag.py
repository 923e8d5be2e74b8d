"""``torchrec_pss::sparse_rows_bag``: rows of a table pooled into bags, with a sparse COO gradient, as an op.

PyTorch cannot trace the sparse backward of ``F.embedding_bag`` with per-sample weights (its meta kernel fails
under ``torch.compile``), and Dynamo refuses to build sparse tensors with ``fullgraph=True``. As an op with its own
autograd (:func:`~torchrec_pss.kernels.register_autograd`), the sparse gradient is built by AOT autograd instead,
as for ROBE's and QR's ops. The hashing trick and MLET pool through it while compiling
(:func:`torchrec_pss.pooling.embedding_bag`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import torchrec_pss.pooling as pooling
from torchrec_pss.kernels import define_op, register_autograd


@define_op("sparse_rows_bag")
def sparse_rows_bag(table: Tensor, rows: Tensor, offsets: Tensor, scale: Tensor | None) -> Tensor:
    """Bag ``b`` of the output ``[B, d]`` is ``sum_i scale[i] · table[rows[i]]`` over ``offsets[b] <= i <
    offsets[b + 1]`` (``table`` ``[k, d]``, ``rows`` ``[N]`` int64, ``offsets`` ``[B + 1]``, ``scale`` ``[N]`` or
    None for ones)."""
    return F.embedding_bag(rows, table, offsets, mode="sum", per_sample_weights=scale, include_last_offset=True)


@torch.library.register_fake(sparse_rows_bag)
def _sparse_rows_bag_fake(table: Tensor, rows: Tensor, offsets: Tensor, scale: Tensor | None) -> Tensor:
    return table.new_empty(offsets.shape[0] - 1, table.shape[1])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    table, rows, offsets, scale = inputs
    ctx.save_for_backward(table, rows, offsets, scale)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    table, rows, offsets, scale = ctx.saved_tensors
    per_row = grad.index_select(0, pooling.offsets_to_bag_index(offsets, rows.numel()))
    table_grad = scale_grad = None
    if ctx.needs_input_grad[0]:
        values = per_row if scale is None else per_row * scale.unsqueeze(1).to(per_row.dtype)
        table_grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values.to(table.dtype), table.shape,
                                             check_invariants=False)
    if ctx.needs_input_grad[3]:
        scale_grad = (per_row * table.detach().index_select(0, rows)).sum(1).to(scale.dtype)
    return table_grad, None, None, scale_grad


register_autograd(sparse_rows_bag, _backward, _setup_context)
