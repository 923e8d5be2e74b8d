"""Triton kernels for QR embeddings: compose rows from the part tables and pool them in one kernel; the
dense part gradients (atomics), their rows read by a batch (sparse gradients) and the per-sample weights'
gradient.

Id ``x`` reads row ``(x // c^j) mod c`` of part ``j < k - 1`` and row ``x // c^(k-1)`` of the last part
(:meth:`QRMemory.digits <torchrec_pss_plugins.qr.qr.QRMemory.digits>`, ids ``>= 0``) and composes the
rows by ``mult`` / ``add`` (parts ``[rows_j, d]``) or ``concat`` (parts ``[rows_j, d / k]``), then pools
like :func:`torchrec_pss.pooling.pool` (weights first; MEAN divides by the bag length, empty bags give
zeros), as the module's ``pooled``. Bags are given by ``offsets`` ``[B + 1]``; each program owns one
bag and a block of ``BLOCK_D`` columns and walks the bag's ids ``BLOCK_N`` at a time.

Run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from torchrec_pss.device_checks import assert_ids_below, assert_offsets
from torchrec_pss_plugins.qr.reference import digits

BLOCK_N = 8
"""Ids of a bag handled together by one program (rows of a tile)."""
MAX_BLOCK_D = 128
"""Embedding columns per program at most (columns of a tile)."""
OPERATIONS = {"mult": 0, "add": 1, "concat": 2}
_MULT = tl.constexpr(OPERATIONS["mult"])
_CONCAT = tl.constexpr(OPERATIONS["concat"])


@triton.jit
def _digit(x, c, J: tl.constexpr, K: tl.constexpr):
    """Row of part ``J`` (of ``K``) for int64 ids ``x`` (``>= 0``) and ``c`` collisions."""
    rest = x
    for _ in tl.static_range(J):
        rest = rest // c
    if J < K - 1:
        rest = rest % c
    return rest


@triton.jit
def _part_tile(part, digit, cols, mask, J: tl.constexpr, WIDTH: tl.constexpr, OPERATION: tl.constexpr):
    """Pointers ``[BLOCK_N, BLOCK_D]`` into part ``J`` for embedding columns ``cols`` and its load mask."""
    if OPERATION == _CONCAT:
        local = cols - J * WIDTH
        mask = mask & (local >= 0)[None, :] & (local < WIDTH)[None, :]
    else:
        local = cols
    return part + digit[:, None] * WIDTH + local[None, :], mask


@triton.jit
def _composed(parts, x, c, cols, mask, K: tl.constexpr, WIDTH: tl.constexpr, OPERATION: tl.constexpr,
              SKIP: tl.constexpr):
    """Composed embeddings ``[BLOCK_N, BLOCK_D]`` of ``x``; for ``mult``, part ``SKIP`` (if ``< K``) is left out."""
    if OPERATION == _MULT:
        out = tl.full(mask.shape, 1.0, tl.float32)
    else:
        out = tl.zeros(mask.shape, tl.float32)
    for j in tl.static_range(K):
        if j != SKIP:
            ptrs, part_mask = _part_tile(parts[j], _digit(x, c, j, K), cols, mask, j, WIDTH, OPERATION)
            row = tl.load(ptrs, mask=part_mask, other=0.0)
            if OPERATION == _MULT:
                out = out * row
            else:
                out = out + row
    return out


@triton.jit(do_not_specialize=["c"])
def _pooled_forward_kernel(
    parts, ids_ptr, offsets, weights, out, c,
    K: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr, OPERATION: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    col_mask = cols < DIM
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = start
    while first < end:
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        x = tl.load(ids_ptr + rows, mask=row_mask, other=0)
        vals = _composed(parts, x, c, cols, row_mask[:, None] & col_mask[None, :], K, WIDTH, OPERATION, K)
        if HAS_WEIGHTS:
            vals = vals * tl.load(weights + rows, mask=row_mask, other=0.0)[:, None]
        acc += tl.sum(vals, axis=0)
        first += BLOCK_N
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out + bag.to(tl.int64) * DIM + cols, acc, mask=col_mask)


@triton.jit(do_not_specialize=["c"])
def _backward_kernel(
    parts, grads, grad_out, ids_ptr, offsets, weights, c,
    K: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr, OPERATION: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, MEAN: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    cols = (tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    col_mask = cols < DIM
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1)
    g = tl.load(grad_out + bag.to(tl.int64) * DIM + cols, mask=col_mask, other=0.0)
    if MEAN:
        g = g / tl.maximum(end - start, 1).to(tl.float32)
    first = start
    while first < end:
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(ids_ptr + rows, mask=row_mask, other=0)
        grad_rows = tl.broadcast_to(g[None, :], [BLOCK_N, BLOCK_D])
        if HAS_WEIGHTS:
            grad_rows = grad_rows * tl.load(weights + rows, mask=row_mask, other=0.0)[:, None]
        for j in tl.static_range(K):
            ptrs, part_mask = _part_tile(grads[j], _digit(x, c, j, K), cols, mask, j, WIDTH, OPERATION)
            contribution = grad_rows
            if OPERATION == _MULT:
                contribution = contribution * _composed(parts, x, c, cols, mask, K, WIDTH, OPERATION, j)
            tl.atomic_add(ptrs, contribution, mask=part_mask, sem="relaxed")
        first += BLOCK_N


@triton.jit(do_not_specialize=["c"])
def _weights_grad_kernel(
    parts, grad_out, ids_ptr, offsets, out, c,
    K: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr, OPERATION: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1)
    first = start
    while first < end:
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        x = tl.load(ids_ptr + rows, mask=row_mask, other=0)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for block in tl.static_range((DIM + BLOCK_D - 1) // BLOCK_D):
            cols = (block * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
            col_mask = cols < DIM
            g = tl.load(grad_out + bag.to(tl.int64) * DIM + cols, mask=col_mask, other=0.0)
            vals = _composed(parts, x, c, cols, row_mask[:, None] & col_mask[None, :], K, WIDTH, OPERATION, K)
            dot += tl.sum(vals * g[None, :], axis=1)
        if MEAN:
            dot = dot / tl.maximum(end - start, 1).to(tl.float32)
        tl.store(out + rows, dot, mask=row_mask)
        first += BLOCK_N


def _prepare(
    parts: Sequence[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
    collisions: int, operation: str, op: str,
) -> tuple[int, int, int]:
    """Checks the arguments (ids and offsets by device asserts, :mod:`torchrec_pss.device_checks`); returns
    ``(num_bags, dim, width)``."""
    if operation not in OPERATIONS:
        raise ValueError(f"operation must be one of {sorted(OPERATIONS)}, got {operation!r}")
    if len(parts) < 2 or any(p.dim() != 2 or p.shape[1] != parts[0].shape[1] for p in parts):
        shapes = [tuple(p.shape) for p in parts]
        raise ValueError(f"parts must be >= 2 tables [rows_j, width] of one width, got {shapes}")
    if ids.dtype != torch.int64 or offsets.dtype != torch.int64 or ids.dim() != 1 or offsets.dim() != 1:
        raise ValueError("ids [N] and offsets [B + 1] must be 1-D int64 tensors")
    if offsets.numel() < 1:
        raise ValueError("offsets must be [B + 1], got an empty tensor")
    if weights is not None and weights.shape != ids.shape:
        raise ValueError(f"weights must be [N] = {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if collisions < 1:
        raise ValueError(f"collisions must be positive, got {collisions}")
    assert_offsets(ids, offsets, op)
    _assert_ids_in_parts(parts, ids, collisions, op)
    width = parts[0].shape[1]
    dim = width * len(parts) if operation == "concat" else width
    return offsets.numel() - 1, dim, width


def _assert_ids_in_parts(parts: Sequence[torch.Tensor], ids: torch.Tensor, collisions: int, op: str) -> None:
    """Asserts that every id's digits are rows of their parts: ``0 <= id < c^(k-1) · rows_(k-1)`` when every other
    part holds ``c`` rows or more (the modules' parts hold ``c``), each digit against its part otherwise."""
    rows = [part.shape[0] for part in parts]
    if min(rows[:-1]) >= collisions:
        assert_ids_below(ids, collisions ** (len(parts) - 1) * rows[-1], op)
    else:
        bad = functools.reduce(torch.logical_or, [digit >= count for digit, count in
                                                  zip(digits(ids, collisions, len(parts)), rows, strict=True)], ids < 0)
        torch._assert_async(~bad.any(), f"{op}: an id has a row outside its part (rows {rows}, collisions = {collisions})")


def _launch_args(num_bags: int, dim: int) -> tuple[tuple[int, int], int]:
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    return (num_bags, triton.cdiv(dim, block_d)), block_d


def qr_pooled_forward(
    parts: Sequence[torch.Tensor],
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    collisions: int,
    operation: str,
    mean: bool,
) -> torch.Tensor:
    """Pooled QR embeddings ``[B, d]`` (float32) of the bags of ``ids``, compose + pool in one kernel.

    ``parts`` the ``k`` part tables (``QRMemory.parts``, float32 ``[rows_j, width]``; ``d = width`` for
    mult / add, ``k · width`` for concat); ``ids`` ``[N]`` int64 (``>= 0``); ``offsets`` ``[B + 1]``
    int64; ``weights`` ``[N]`` or None. Equals ``QRMemory.pooled``.
    """
    num_bags, dim, width = _prepare(parts, ids, offsets, weights, collisions, operation, "qr_pooled")
    out = torch.empty(num_bags, dim, dtype=torch.float32, device=ids.device)
    if num_bags == 0:
        return out
    grid, block_d = _launch_args(num_bags, dim)
    _pooled_forward_kernel[grid](
        tuple(p.contiguous() for p in parts), ids.contiguous(), offsets.contiguous(),
        None if weights is None else weights.to(torch.float32).contiguous(), out, collisions,
        K=len(parts), DIM=dim, WIDTH=width, OPERATION=OPERATIONS[operation], HAS_WEIGHTS=weights is not None,
        MEAN=mean, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    return out


def qr_pooled_backward(
    grad_out: torch.Tensor,
    parts: Sequence[torch.Tensor],
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    collisions: int,
    operation: str,
    mean: bool,
) -> list[torch.Tensor]:
    """Dense gradients (float32, shaped like ``parts``) of :func:`qr_pooled_forward` wrt every part table.

    ``grad_out`` ``[B, d]``; the other arguments as for the forward (``parts`` are read only for
    ``mult``, whose gradient of part ``j`` is ``g`` times the product of the other parts' rows). Rows
    are accumulated with ``tl.atomic_add`` into zeroed buffers (non-deterministic summation order).
    """
    num_bags, dim, width = _prepare(parts, ids, offsets, weights, collisions, operation, "qr_pooled_backward")
    if grad_out.shape != (num_bags, dim):
        raise ValueError(f"grad_out must be [B, d] = {(num_bags, dim)}, got {tuple(grad_out.shape)}")
    grads = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parts]
    if num_bags == 0:
        return grads
    grid, block_d = _launch_args(num_bags, dim)
    _backward_kernel[grid](
        tuple(p.contiguous() for p in parts), tuple(grads), grad_out.to(torch.float32).contiguous(),
        ids.contiguous(), offsets.contiguous(), None if weights is None else weights.to(torch.float32).contiguous(),
        collisions, K=len(parts), DIM=dim, WIDTH=width, OPERATION=OPERATIONS[operation],
        HAS_WEIGHTS=weights is not None, MEAN=mean, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    return grads


def qr_grad_rows(
    grad_out: torch.Tensor,
    parts: Sequence[torch.Tensor],
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    collisions: int,
    operation: str,
    mean: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every part's gradient over the rows the batch reads: ``(rows, values)``, lists of ``[U_j]`` int64
    (ascending, unique) and ``[U_j, width]`` float32; the rows of :func:`qr_pooled_backward`'s dense gradients
    that the ids read (``torch.unique`` of each part's rows)."""
    dense = qr_pooled_backward(grad_out, parts, ids, offsets, weights, collisions, operation, mean)
    rows = [torch.unique(digit) for digit in digits(ids, collisions, len(parts))]
    return rows, [grad.index_select(0, part_rows) for grad, part_rows in zip(dense, rows, strict=True)]


def qr_weights_grad(
    grad_out: torch.Tensor,
    parts: Sequence[torch.Tensor],
    ids: torch.Tensor,
    offsets: torch.Tensor,
    collisions: int,
    operation: str,
    mean: bool,
) -> torch.Tensor:
    """The gradient ``[N]`` (float32) of the per-sample weights: each id's composed row dotted with its bag's
    ``grad_out`` row (``/`` the bag length for MEAN); one program per bag, no atomics."""
    num_bags, dim, width = _prepare(parts, ids, offsets, None, collisions, operation, "qr_weights_grad")
    if grad_out.shape != (num_bags, dim):
        raise ValueError(f"grad_out must be [B, d] = {(num_bags, dim)}, got {tuple(grad_out.shape)}")
    out = torch.empty(ids.numel(), dtype=torch.float32, device=ids.device)
    if num_bags == 0 or ids.numel() == 0:
        return out.zero_()
    block_d = min(triton.next_power_of_2(dim), MAX_BLOCK_D)
    _weights_grad_kernel[(num_bags,)](
        tuple(p.contiguous() for p in parts), grad_out.to(torch.float32).contiguous(), ids.contiguous(),
        offsets.contiguous(), out, collisions, K=len(parts), DIM=dim, WIDTH=width, OPERATION=OPERATIONS[operation],
        MEAN=mean, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    return out
