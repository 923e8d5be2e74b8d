"""Triton kernel for TT-Rec row reconstruction (the forward of :meth:`TTMemory.rows`).

``E[x, j] = G_1[i_1, :, j_1, :] · G_2[i_2, :, j_2, :] ··· G_N[i_N, :, j_N, :]`` with the mixed-radix
digits ``i`` of the row ``x`` (base ``p``, most significant first; the first digit is ``x // ∏_{k>1} p_k``
unreduced, as in ``TTMemory.rows``) and ``j`` of the column (base ``q``, the last digit least significant).
Each forward program owns one id and a block of ``BLOCK_P`` column prefixes ``(j_1, ..., j_{N-1})``: it carries
per prefix the running row vector ``[R_k]`` of the chain product (padded to ``R_PAD``) through cores 1 to N - 1,
then multiplies it with the id's one slice of the last core, giving the prefix's ``q_N`` columns at once (``q_N``
times fewer chain products and slice loads than carrying every column).

The backward (:func:`tt_rows_backward`) launches once per core ``k``: each program owns one id and one digit
``j_k``, so every column it visits (the ``d / q_k`` columns with that digit) reads the same slice of core ``k``.
It sums ``grad[x, j] · outer(L_k, R_k)`` over those columns (``L_k``: the row vector of the cores before ``k``,
``R_k``: the column vector of the cores after it, both recomputed per column: N is small) and adds the sum to
the dense core gradient with one atomic add per slice element — ``d / q_k`` times fewer atomics than adding per
column, as the kernel before 2026-11-27 did.

Run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from torchrec_pss.device_checks import assert_ids_below

TILE_ELEMENTS = 8192
"""Elements of a program's 3-D tile (``BLOCK_P · R_PAD · max(R_PAD, q_N)``, ``BLOCK_O · R_PAD²``) at most, unless
one row of it alone is larger."""


@triton.jit
def _slice(x, cols, col_mask, r, K: tl.constexpr, P: tl.constexpr, P_STRIDES: tl.constexpr, Q: tl.constexpr,
           Q_STRIDES: tl.constexpr, RANKS: tl.constexpr):
    """Offsets ``[BLOCK_D, R_PAD, R_PAD]`` into core ``K`` of the slices ``G_K[i_K(x), :, j_K(col), :]`` and their
    mask (the first digit unreduced)."""
    if K == 0:
        i = x // P_STRIDES[K]
    else:
        i = (x // P_STRIDES[K]) % P[K]
    j = (cols // Q_STRIDES[K]) % Q[K]
    offsets = ((i * RANKS[K] + r[None, :, None]) * Q[K] + j[:, None, None]) * RANKS[K + 1] + r[None, None, :]
    mask = col_mask[:, None, None] & (r < RANKS[K])[None, :, None] & (r < RANKS[K + 1])[None, None, :]
    return offsets, mask


@triton.jit
def _tt_rows_kernel(
    cores, ids_ptr, out,
    P: tl.constexpr, P_STRIDES: tl.constexpr, Q: tl.constexpr, Q_STRIDES: tl.constexpr, RANKS: tl.constexpr,
    NUM_CORES: tl.constexpr, DIM: tl.constexpr, R_PAD: tl.constexpr, LAST: tl.constexpr, PREFIXES: tl.constexpr,
    BLOCK_P: tl.constexpr, Q_LAST_PAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    prefixes = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    prefix_mask = prefixes < PREFIXES
    cols = prefixes * Q[LAST]  # each prefix's column with last digit 0 (the last digit is least significant)
    r = tl.arange(0, R_PAD)
    x = tl.load(ids_ptr + row)
    v = tl.zeros([BLOCK_P, R_PAD], dtype=tl.float32) + (r == 0).to(tl.float32)[None, :]  # R_0 = 1
    for k in tl.static_range(LAST):
        offsets, mask = _slice(x, cols, prefix_mask, r, k, P, P_STRIDES, Q, Q_STRIDES, RANKS)
        v = tl.sum(v[:, :, None] * tl.load(cores[k] + offsets, mask=mask, other=0.0), axis=1)
    j = tl.arange(0, Q_LAST_PAD)
    i = (x // P_STRIDES[LAST]) % P[LAST]
    slice_mask = (r < RANKS[LAST])[:, None] & (j < Q[LAST])[None, :]
    tail = tl.load(cores[LAST] + (i * RANKS[LAST] + r[:, None]) * Q[LAST] + j[None, :], mask=slice_mask, other=0.0)
    values = tl.sum(v[:, :, None] * tail[None, :, :], axis=1)  # [BLOCK_P, Q_LAST_PAD]: R_N = 1
    tl.store(out + row * DIM + cols[:, None] + j[None, :], values,
             mask=prefix_mask[:, None] & (j < Q[LAST])[None, :])


@triton.jit
def _tt_core_grad_kernel(
    grad, cores, core_grad, ids_ptr,
    K: tl.constexpr, P: tl.constexpr, P_STRIDES: tl.constexpr, Q: tl.constexpr, Q_STRIDES: tl.constexpr,
    RANKS: tl.constexpr, NUM_CORES: tl.constexpr, DIM: tl.constexpr, R_PAD: tl.constexpr, OTHERS: tl.constexpr,
    BLOCK_O: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    digit = tl.program_id(1).to(tl.int64)  # j_K: the columns of this program all read slice j_K of core K
    r = tl.arange(0, R_PAD)
    x = tl.load(ids_ptr + row)
    acc = tl.zeros([R_PAD, R_PAD], dtype=tl.float32)
    for first in range(0, OTHERS, BLOCK_O):
        others = first + tl.arange(0, BLOCK_O).to(tl.int64)  # the other cores' digits of a column, mixed radix
        col_mask = others < OTHERS
        cols = (others // Q_STRIDES[K]) * (Q_STRIDES[K] * Q[K]) + digit * Q_STRIDES[K] + others % Q_STRIDES[K]
        g = tl.load(grad + row * DIM + cols, mask=col_mask, other=0.0)
        unit = tl.zeros([BLOCK_O, R_PAD], dtype=tl.float32) + (r == 0).to(tl.float32)[None, :]  # R_0 = R_N = 1
        left = unit  # [BLOCK_O, R_K]: G_1[i_1] ··· G_{K-1}[i_{K-1}] per column
        for m in tl.static_range(K):
            offsets, mask = _slice(x, cols, col_mask, r, m, P, P_STRIDES, Q, Q_STRIDES, RANKS)
            left = tl.sum(left[:, :, None] * tl.load(cores[m] + offsets, mask=mask, other=0.0), axis=1)
        right = unit  # [BLOCK_O, R_{K+1}]: G_{K+1}[i_{K+1}] ··· G_N[i_N] per column
        for m in tl.static_range(NUM_CORES - 1, K, -1):
            offsets, mask = _slice(x, cols, col_mask, r, m, P, P_STRIDES, Q, Q_STRIDES, RANKS)
            right = tl.sum(tl.load(cores[m] + offsets, mask=mask, other=0.0) * right[:, None, :], axis=2)
        acc += tl.sum(g[:, None, None] * left[:, :, None] * right[:, None, :], axis=0)
    if K == 0:
        i = x // P_STRIDES[K]
    else:
        i = (x // P_STRIDES[K]) % P[K]
    offsets = ((i * RANKS[K] + r[:, None]) * Q[K] + digit) * RANKS[K + 1] + r[None, :]
    mask = (r < RANKS[K])[:, None] & (r < RANKS[K + 1])[None, :]
    tl.atomic_add(core_grad + offsets, acc, mask=mask, sem="relaxed")


def _strides(factors: Sequence[int]) -> tuple[int, ...]:
    """``∏_{l>k} factors[l]`` for every ``k``."""
    return tuple(math.prod(factors[k + 1:]) for k in range(len(factors)))


def _layout(cores: Sequence[torch.Tensor], ids: torch.Tensor, op: str) -> dict[str, object]:
    """The kernels' shape constants (checked): ``P``, ``Q``, their strides, ``RANKS``, ``NUM_CORES``, ``DIM``,
    ``R_PAD``. Asserts ``0 <= ids < ∏ p_k`` on the device (:mod:`torchrec_pss.device_checks`)."""
    if len(cores) < 2 or any(core.dim() != 4 for core in cores):
        raise ValueError(f"cores must be >= 2 tensors [p, R_in, q, R_out], got {[tuple(c.shape) for c in cores]}")
    ranks = (cores[0].shape[1], *(core.shape[3] for core in cores))
    if ranks[0] != 1 or ranks[-1] != 1 or any(c.shape[1] != r for c, r in zip(cores[1:], ranks[1:-1], strict=True)):
        raise ValueError(f"core ranks do not chain from 1 to 1: {[tuple(c.shape) for c in cores]}")
    if ids.dtype != torch.int64 or ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    p = tuple(core.shape[0] for core in cores)
    q = tuple(core.shape[2] for core in cores)
    assert_ids_below(ids, math.prod(p), op)
    dim = math.prod(q)
    return {"P": p, "P_STRIDES": _strides(p), "Q": q, "Q_STRIDES": _strides(q), "RANKS": ranks,
            "NUM_CORES": len(cores), "DIM": dim, "R_PAD": triton.next_power_of_2(max(ranks))}


def _rows_per_tile(count: int, width: int) -> int:
    """Rows of a ``[rows, width]`` tile per program: a power of two, at most ``count`` rounded up and at most
    :data:`TILE_ELEMENTS` ``/ width`` (at least 1)."""
    return max(1, min(triton.next_power_of_2(count), TILE_ELEMENTS // width))


def tt_rows(cores: Sequence[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows ``[U, d]`` (float32) of ``ids`` ``[U]`` (int64, ``0 <= id < ∏ p_k``) contracted from ``cores``.

    ``cores`` are ``TTMemory.cores``: core ``k`` ``[p_k, R_{k-1}, q_k, R_k]`` float32 with ``R_0 = R_N = 1``
    and ``d = ∏ q_k``. Equals ``TTMemory.rows(ids)``.
    """
    layout = _layout(cores, ids, "tt_rows")
    out = torch.empty(ids.numel(), layout["DIM"], dtype=torch.float32, device=ids.device)
    if ids.numel() == 0:
        return out
    q_last = layout["Q"][-1]
    prefixes = layout["DIM"] // q_last
    q_last_pad = triton.next_power_of_2(q_last)
    block_p = _rows_per_tile(prefixes, layout["R_PAD"] * max(layout["R_PAD"], q_last_pad))
    _tt_rows_kernel[(ids.numel(), triton.cdiv(prefixes, block_p))](
        tuple(core.contiguous() for core in cores), ids.contiguous(), out,
        LAST=layout["NUM_CORES"] - 1, PREFIXES=prefixes, BLOCK_P=block_p, Q_LAST_PAD=q_last_pad, **layout,
    )
    return out


def tt_rows_backward(grad: torch.Tensor, cores: Sequence[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
    """The dense gradients of ``cores`` (float32, their shapes) for the gradient ``grad`` ``[U, d]`` of
    ``tt_rows(cores, ids)``; equals ``reference.rows_backward``. Repeated ids add up."""
    layout = _layout(cores, ids, "tt_rows_backward")
    if grad.shape != (ids.numel(), layout["DIM"]):
        raise ValueError(f"grad must be [U, d] = [{ids.numel()}, {layout['DIM']}], got {tuple(grad.shape)}")
    grads = [torch.zeros(core.shape, dtype=torch.float32, device=core.device) for core in cores]
    if ids.numel() == 0:
        return grads
    grad = grad.to(torch.float32).contiguous()
    contiguous = tuple(core.contiguous() for core in cores)
    for k, q in enumerate(layout["Q"]):
        others = layout["DIM"] // q
        _tt_core_grad_kernel[(ids.numel(), q)](
            grad, contiguous, grads[k], ids.contiguous(), K=k, OTHERS=others,
            BLOCK_O=_rows_per_tile(others, layout["R_PAD"] ** 2), **layout,
        )
    return grads
