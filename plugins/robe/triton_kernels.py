"""Triton kernels for ROBE-Z: fused hash + gather + pool forward, atomic backward / SGD, Adagrad.

Every kernel follows the recovery formula of :mod:`torchrec_pss_plugins.robe.robe` exactly (same hash,
same circular wrap-around of ``M``), so it gives ``RobeMemory.pooled``'s values. Bags are given by
``offsets`` ``[B + 1]`` (bag ``b`` = ``ids[offsets[b]:offsets[b + 1]]``); each program owns one bag and
a block of ``BLOCK_D`` embedding columns and walks the bag's ids ``BLOCK_N`` at a time. ``keys`` (int64)
holds the table key ``t``: ``[1]`` (every bag) or ``[B]`` (per bag, so one launch pools several tables
sharing ``M``). Within a
chunk the columns read consecutive memory positions, so the gathers are coalesced. Positions and
hashes are int64, and every product is reduced mod ``P = 2^31 - 1`` before it is summed, so ids up
to ``2^63 - 1`` never overflow.

Run on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from torchrec_pss.device_checks import assert_offsets
from torchrec_pss.hashing import PRIME
from torchrec_pss.pooling import offsets_to_bag_index, per_id_scale
from torchrec_pss.triton_launcher import Launcher

_P = tl.constexpr(PRIME)
BLOCK_N = 8
"""Ids of a bag handled together by one program (rows of a tile)."""
SEGMENT_BLOCK_N = 32
"""Occurrences of one id summed together by one program of the sorted-segments backward."""
MAX_BLOCK_D = 128
"""Embedding columns per program at most (columns of a tile)."""
_ROWS_PER_ADAGRAD_TILE = 1024
"""Elements per Adagrad program (rounded to whole blocks)."""
MAX_ADAGRAD_COLS = 1024
"""The widest tile row of the blockwise Adagrad kernel; a wider block is summed and updated tile by tile."""
NARROW_LIMIT = 2**31
"""``M`` sizes (and chunk + row widths) below this use 32-bit positions."""
CACHED_MEMORY_BYTES = 16 * 2**20
"""Memories up to this size stay in the L2 cache of an H100 / H200 (50 / 60 MB)."""
NUM_WARPS = {True: 1, False: 2}
"""Warps per program of the bag kernels, for a memory that stays in L2 (True) or not. Measured on an H200
(B = 10240, d = 128, Z = 32, L = 20, forward): a 2 MB memory takes 0.037 / 0.041 / 0.056 ms with 1 / 2 / 4
warps, a 328 MB one 0.054 / 0.048 / 0.058 ms; the scatter ties across them."""


@triton.jit
def _floor_divmod(x, n):
    """``(x // n, x mod n)`` with floor semantics (remainder in ``[0, n)``) for int64 ``x`` of any sign, down to
    ``-2^63`` (``x - r`` would overflow there); ``//`` may truncate (GPU) or floor (the interpreter): a quotient
    ``q`` is the floor one when ``q·n + r == x`` (also in int64's wrap-around), else it is one too high."""
    r = x % n
    r = tl.where(r < 0, r + n, r)
    q = x // n
    return tl.where(q * n + r == x, q, q - 1), r


@triton.jit
def _hash_base(coef_ptr, t, k):
    """``(A·t + B·(k mod P) + D) mod P`` (each product reduced mod P first) for int64 ``k``: ``< P``."""
    a = tl.load(coef_ptr)
    b = tl.load(coef_ptr + 1)
    d = tl.load(coef_ptr + 3)
    _, k_mod = _floor_divmod(k, _P)
    return ((a * t) % _P + d + (b * k_mod) % _P) % _P


@triton.jit
def _bag_key(keys_ptr, bag, KEY_PER_BAG: tl.constexpr):
    """The table key ``t mod P`` of ``bag``: ``keys[bag]`` (``KEY_PER_BAG``) or ``keys[0]``."""
    if KEY_PER_BAG:
        key = tl.load(keys_ptr + bag)
    else:
        key = tl.load(keys_ptr)
    _, t = _floor_divmod(key, _P)
    return t


@triton.jit
def _column_terms(cols, loc_ptr, sign_ptr, DIM: tl.constexpr, Z: tl.constexpr):
    """The per-column parts of positions and signs, computed once per program: ``[BLOCK_D]`` int64 each.

    ``(C·(col // Z) mod P, col mod Z, C'·col mod P)`` for ``Z <= d``; ``(0, col, C'·col mod P)`` for ``Z > d``.
    """
    sign_term = (tl.load(sign_ptr + 2) * cols) % _P
    if Z <= DIM:
        return (tl.load(loc_ptr + 2) * (cols // Z)) % _P, cols % Z, sign_term
    return cols * 0, cols, sign_term


@triton.jit
def _positions(ids, chunk_term, run_offset, t, m, loc_ptr, DIM: tl.constexpr, Z: tl.constexpr,
               NARROW: tl.constexpr):
    """Memory positions ``[BLOCK_N, BLOCK_D]`` (``< m``) of ``ids`` at the columns of ``_column_terms``.

    ``NARROW`` (``m < 2^31``, ``Z + d < 2^31``): the reduction mod ``m`` runs in uint32 (int64 otherwise);
    the positions are int64 either way.
    """
    if Z <= DIM:
        h = _hash_base(loc_ptr, t, ids)[:, None] + chunk_term[None, :]
        base = tl.where(h >= _P, h - _P, h)
    else:
        block, slot = _floor_divmod(ids, Z // DIM)
        base = (_hash_base(loc_ptr, t, block) + slot * DIM)[:, None]
    if NARROW:
        pos = ((base.to(tl.uint32) + run_offset.to(tl.uint32)[None, :]) % m.to(tl.uint32)).to(tl.int64)
    else:
        pos = (base + run_offset[None, :]) % m
    return pos


@triton.jit
def _signs(ids, sign_term, t, sign_ptr):
    """The signs ``g(t, x, i)`` ``[BLOCK_N, BLOCK_D]`` (float32, ``±1``) at the columns of ``sign_term``."""
    s = _hash_base(sign_ptr, t, ids)[:, None] + sign_term[None, :]
    s = tl.where(s >= _P, s - _P, s)
    return 1.0 - 2.0 * (s & 1).to(tl.float32)


@triton.jit(do_not_specialize=["m"])
def _pooled_forward_kernel(
    memory, ids_ptr, offsets, weights, coef_ptr, keys_ptr, out, m,
    DIM: tl.constexpr, Z: tl.constexpr, USE_SIGN: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    MEAN: tl.constexpr, NARROW: tl.constexpr, KEY_PER_BAG: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    t = _bag_key(keys_ptr, bag, KEY_PER_BAG)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < DIM
    cols64 = cols.to(tl.int64)
    chunk_term, run_offset, sign_term = _column_terms(cols64, coef_ptr, coef_ptr + 4, DIM, Z)
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = start
    while first < end:
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        x = tl.load(ids_ptr + rows, mask=row_mask, other=0)
        pos = _positions(x, chunk_term, run_offset, t, m, coef_ptr, DIM, Z, NARROW)
        vals = tl.load(memory + pos, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        if USE_SIGN:
            vals = vals * _signs(x, sign_term, t, coef_ptr + 4)
        if HAS_WEIGHTS:
            vals = vals * tl.load(weights + rows, mask=row_mask, other=0.0)[:, None]
        acc += tl.sum(vals, axis=0)
        first += BLOCK_N
    if MEAN:
        acc = acc / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(out + bag.to(tl.int64) * DIM + cols64, acc, mask=col_mask)


@triton.jit(do_not_specialize=["m"])
def _scatter_kernel(
    target, touched, grad_out, grad_stride_b, grad_stride_d, ids_ptr, offsets, weights, coef_ptr, keys_ptr, scale, m,
    DIM: tl.constexpr, Z: tl.constexpr, USE_SIGN: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
    MEAN: tl.constexpr, NARROW: tl.constexpr, KEY_PER_BAG: tl.constexpr, MARK: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    t = _bag_key(keys_ptr, bag, KEY_PER_BAG)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < DIM
    cols64 = cols.to(tl.int64)
    chunk_term, run_offset, sign_term = _column_terms(cols64, coef_ptr, coef_ptr + 4, DIM, Z)
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1)
    g = tl.load(grad_out + bag.to(tl.int64) * grad_stride_b + cols64 * grad_stride_d, mask=col_mask, other=0.0)
    if MEAN:
        g = g / tl.maximum(end - start, 1).to(tl.float32)
    first = start
    while first < end:
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        x = tl.load(ids_ptr + rows, mask=row_mask, other=0)
        pos = _positions(x, chunk_term, run_offset, t, m, coef_ptr, DIM, Z, NARROW)
        contribution = tl.broadcast_to(g[None, :], [BLOCK_N, BLOCK_D])
        if HAS_WEIGHTS:
            contribution = contribution * tl.load(weights + rows, mask=row_mask, other=0.0)[:, None]
        if USE_SIGN:
            contribution = contribution * _signs(x, sign_term, t, coef_ptr + 4)
        tile_mask = row_mask[:, None] & col_mask[None, :]
        tl.atomic_add(target + pos, contribution * scale, mask=tile_mask, sem="relaxed")
        if MARK:
            tl.store(touched + pos, tl.full([BLOCK_N, BLOCK_D], 1, tl.uint8), mask=tile_mask)
        first += BLOCK_N


@triton.jit(do_not_specialize=["m", "num_ids"])
def _segment_scatter_kernel(
    target, grad_out, grad_stride_b, grad_stride_d, sorted_ids, sorted_keys, sorted_bags, sorted_scales,
    coef_ptr, scale, m, num_ids,
    DIM: tl.constexpr, Z: tl.constexpr, USE_SIGN: tl.constexpr, HAS_SCALES: tl.constexpr,
    NARROW: tl.constexpr, KEY_PER_BAG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < DIM
    cols64 = cols.to(tl.int64)
    x = tl.load(sorted_ids + head)
    previous = tl.maximum(head - 1, 0)
    is_head = (head == 0) | (tl.load(sorted_ids + previous) != x)
    if KEY_PER_BAG:
        key = tl.load(sorted_keys + head)
        is_head = is_head | (tl.load(sorted_keys + previous) != key)
    else:
        key = tl.load(sorted_keys)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = head
    running = is_head
    while running:
        rows = first + tl.arange(0, BLOCK_N)
        in_range = rows < num_ids
        same = in_range & (tl.load(sorted_ids + rows, mask=in_range, other=0) == x)
        if KEY_PER_BAG:
            same = same & (tl.load(sorted_keys + rows, mask=in_range, other=0) == key)
        bags = tl.load(sorted_bags + rows, mask=same, other=0)
        g = tl.load(grad_out + bags[:, None] * grad_stride_b + cols64[None, :] * grad_stride_d,
                    mask=same[:, None] & col_mask[None, :], other=0.0)
        if HAS_SCALES:
            g = g * tl.load(sorted_scales + rows, mask=same, other=0.0)[:, None]
        acc += tl.sum(g, axis=0)
        running = tl.sum(same.to(tl.int32), axis=0) == BLOCK_N
        first += BLOCK_N
    _, t = _floor_divmod(key, _P)
    chunk_term, run_offset, sign_term = _column_terms(cols64, coef_ptr, coef_ptr + 4, DIM, Z)
    xs = tl.zeros([1], dtype=tl.int64) + x
    pos = _positions(xs, chunk_term, run_offset, t, m, coef_ptr, DIM, Z, NARROW)
    contribution = acc[None, :] * scale
    if USE_SIGN:
        contribution = contribution * _signs(xs, sign_term, t, coef_ptr + 4)
    tl.atomic_add(target + pos, contribution, mask=col_mask[None, :] & is_head, sem="relaxed")


@triton.jit(do_not_specialize=["m"])
def _weights_grad_kernel(
    memory, grad_out, ids_ptr, offsets, coef_ptr, keys_ptr, out, m,
    DIM: tl.constexpr, Z: tl.constexpr, USE_SIGN: tl.constexpr, MEAN: tl.constexpr, NARROW: tl.constexpr,
    KEY_PER_BAG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bag = tl.program_id(0)
    t = _bag_key(keys_ptr, bag, KEY_PER_BAG)
    start = tl.load(offsets + bag)
    end = tl.load(offsets + bag + 1)
    length = tl.maximum(end - start, 1).to(tl.float32)
    first = start
    while first < end:
        rows = first + tl.arange(0, BLOCK_N)
        row_mask = rows < end
        x = tl.load(ids_ptr + rows, mask=row_mask, other=0)
        dot = tl.zeros([BLOCK_N], dtype=tl.float32)
        for col0 in range(0, DIM, BLOCK_D):
            cols = col0 + tl.arange(0, BLOCK_D)
            col_mask = cols < DIM
            cols64 = cols.to(tl.int64)
            chunk_term, run_offset, sign_term = _column_terms(cols64, coef_ptr, coef_ptr + 4, DIM, Z)
            g = tl.load(grad_out + bag.to(tl.int64) * DIM + cols64, mask=col_mask, other=0.0)
            if MEAN:
                g = g / length
            pos = _positions(x, chunk_term, run_offset, t, m, coef_ptr, DIM, Z, NARROW)
            vals = tl.load(memory + pos, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            if USE_SIGN:
                vals = vals * _signs(x, sign_term, t, coef_ptr + 4)
            dot += tl.sum(vals * g[None, :], axis=1)
        tl.store(out + rows, dot, mask=row_mask)
        first += BLOCK_N


@triton.jit
def _adagrad_kernel(
    param, accumulator, grad, clr, eps, numel,
    BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr, BLOCK_COLS: tl.constexpr,
):
    blocks = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    block_mask = blocks * BLOCK_SIZE < numel
    if BLOCK_COLS >= BLOCK_SIZE:  # a whole block per tile row: its gradient is read once
        cols = tl.arange(0, BLOCK_COLS)
        idx = blocks[:, None] * BLOCK_SIZE + cols[None, :]
        mask = (cols[None, :] < BLOCK_SIZE) & (idx < numel)
        g = tl.load(grad + idx, mask=mask, other=0.0)
        total = tl.load(accumulator + blocks, mask=block_mask, other=0.0) + tl.sum(g * g, axis=1) / BLOCK_SIZE
        tl.store(accumulator + blocks, total, mask=block_mask)
        std = tl.sqrt_rn(total) + eps
        p = tl.load(param + idx, mask=mask, other=0.0)
        tl.store(param + idx, p - clr * tl.div_rn(g, std[:, None]), mask=mask)
    else:  # blocks wider than a tile: sum the squares tile by tile, then update tile by tile
        squares = tl.zeros([BLOCKS], dtype=tl.float32)
        for start in tl.static_range(0, BLOCK_SIZE, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            idx = blocks[:, None] * BLOCK_SIZE + cols[None, :]
            mask = (cols[None, :] < BLOCK_SIZE) & (idx < numel)
            g = tl.load(grad + idx, mask=mask, other=0.0)
            squares += tl.sum(g * g, axis=1)
        total = tl.load(accumulator + blocks, mask=block_mask, other=0.0) + squares / BLOCK_SIZE
        tl.store(accumulator + blocks, total, mask=block_mask)
        std = tl.sqrt_rn(total) + eps
        for start in tl.static_range(0, BLOCK_SIZE, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            idx = blocks[:, None] * BLOCK_SIZE + cols[None, :]
            mask = (cols[None, :] < BLOCK_SIZE) & (idx < numel)
            g = tl.load(grad + idx, mask=mask, other=0.0)
            p = tl.load(param + idx, mask=mask, other=0.0)
            tl.store(param + idx, p - clr * tl.div_rn(g, std[:, None]), mask=mask)


_POOLED_FORWARD = Launcher(_pooled_forward_kernel)
_SCATTER = Launcher(_scatter_kernel)
_SEGMENT_SCATTER = Launcher(_segment_scatter_kernel)
_WEIGHTS_GRAD = Launcher(_weights_grad_kernel)
_ADAGRAD = Launcher(_adagrad_kernel)


def _check_bags(
    ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, coefficients: torch.Tensor,
    keys: torch.Tensor, memory_size: int, dim: int, chunk_size: int, op: str,
) -> None:
    """Raises on bad dtypes / shapes, an empty or too large ``M``, or a chunk size that neither divides ``dim`` nor
    is a multiple of it; asserts the offsets on the device (:func:`~torchrec_pss.device_checks.assert_offsets`:
    offsets past the ids would read beyond them and write the hashed garbage into ``M``). Any int64 id is
    hashed: there is no id range to check."""
    if not 0 < memory_size <= PRIME:
        raise ValueError(f"{op}: the memory must hold 1 to 2^31 - 1 elements, got {memory_size}")
    if coefficients.shape != (2, 4) or coefficients.dtype != torch.int64:
        raise ValueError(f"{op}: coefficients must be [2, 4] int64, got {tuple(coefficients.shape)} {coefficients.dtype}")
    if ids.dtype != torch.int64 or offsets.dtype != torch.int64 or keys.dtype != torch.int64:
        raise TypeError(f"ids, offsets and keys must be int64, got {ids.dtype}, {offsets.dtype} and {keys.dtype}")
    if ids.dim() != 1 or offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"ids must be [N] and offsets [B + 1], got {tuple(ids.shape)} and {tuple(offsets.shape)}")
    if keys.dim() != 1 or keys.numel() not in (1, offsets.numel() - 1):
        raise ValueError(f"keys must be [1] or [B] = [{offsets.numel() - 1}], got {tuple(keys.shape)}")
    if weights is not None and weights.shape != ids.shape:
        raise ValueError(f"weights must be [N] = {tuple(ids.shape)}, got {tuple(weights.shape)}")
    if dim % chunk_size and chunk_size % dim:
        raise ValueError(f"chunk_size={chunk_size} must divide dim={dim} or be a multiple of it")
    assert_offsets(ids, offsets, op)


def _launch(num_ids: int, num_bags: int, dim: int, chunk_size: int, memory_size: int,
            keys: torch.Tensor) -> dict[str, int | bool]:
    """The constants of one launch: ``BLOCK_N`` (ids per step, up to ``BLOCK_N`` and no more than the mean bag
    length needs), ``BLOCK_D``, ``NARROW`` (32-bit positions when ``M`` and a run fit in them), ``KEY_PER_BAG``,
    and ``num_warps``."""
    mean_length = triton.cdiv(num_ids, max(num_bags, 1))
    return {
        "KEY_PER_BAG": keys.numel() > 1,
        "BLOCK_N": max(2, min(BLOCK_N, triton.next_power_of_2(mean_length))),
        "BLOCK_D": min(triton.next_power_of_2(dim), MAX_BLOCK_D),
        "NARROW": memory_size < NARROW_LIMIT and chunk_size + dim < NARROW_LIMIT,
        "num_warps": NUM_WARPS[memory_size * torch.float32.itemsize <= CACHED_MEMORY_BYTES],
    }


def _grid(num_bags: int, dim: int, tiles: dict[str, int | bool]) -> tuple[int, int]:
    return num_bags, triton.cdiv(dim, tiles["BLOCK_D"])


def _contiguous_weights(weights: torch.Tensor | None) -> torch.Tensor | None:
    return None if weights is None else weights.to(torch.float32).contiguous()


def robe_pooled_forward(
    memory: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    coefficients: torch.Tensor,
    keys: torch.Tensor,
    dim: int,
    chunk_size: int,
    use_sign: bool,
    mean: bool,
) -> torch.Tensor:
    """Pooled ROBE-Z embeddings ``[B, dim]`` (float32) of the bags of ``ids``, one fused kernel.

    ``memory`` ``[|M|]`` float32; ``ids`` ``[N]`` int64; ``offsets`` ``[B + 1]`` int64; ``weights`` ``[N]``
    or None; ``coefficients`` ``[2, 4]`` int64 (``RobeMemory.hash_coefficients``: location row, sign row);
    ``keys`` the table keys ``t`` (``[1]`` or ``[B]``). MEAN divides by the bag length (empty bags give zeros).
    Equals ``RobeMemory.pooled``.
    """
    _check_bags(ids, offsets, weights, coefficients, keys, memory.numel(), dim, chunk_size, "robe_pooled")
    num_bags = offsets.numel() - 1
    out = torch.empty(num_bags, dim, dtype=torch.float32, device=memory.device)
    if num_bags == 0:
        return out
    tiles = _launch(ids.numel(), num_bags, dim, chunk_size, memory.numel(), keys)
    _POOLED_FORWARD(
        _grid(num_bags, dim, tiles), memory.contiguous(), ids.contiguous(), offsets.contiguous(),
        _contiguous_weights(weights), coefficients.contiguous(), keys.contiguous(), out, memory.numel(),
        DIM=dim, Z=chunk_size, USE_SIGN=use_sign, HAS_WEIGHTS=weights is not None, MEAN=mean, **tiles,
    )
    return out


def _sorted_occurrences(
    ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, keys: torch.Tensor, mean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The occurrences of ``ids`` sorted by (table key, id): their ids, keys (``[N]``, or ``keys`` itself when
    it is ``[1]``), bags and pooling factors (``per_id_scale``: weight, / bag length for MEAN; None when all are 1),
    each ``[N]``. No device synchronisation."""
    order = torch.sort(ids, stable=True).indices
    bags = offsets_to_bag_index(offsets, ids.numel())
    sorted_keys = keys
    if keys.numel() > 1:
        occurrence_keys = keys.index_select(0, bags).index_select(0, order)
        by_key = torch.sort(occurrence_keys, stable=True)
        order, sorted_keys = order.index_select(0, by_key.indices), by_key.values
    scales = per_id_scale(offsets, weights, mean, ids.numel(), torch.float32)
    sorted_scales = None if scales is None else scales.index_select(0, order)
    return ids.index_select(0, order), sorted_keys.contiguous(), bags.index_select(0, order), sorted_scales


def _scatter(
    target: torch.Tensor,
    scale: float,
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    coefficients: torch.Tensor,
    keys: torch.Tensor,
    dim: int,
    chunk_size: int,
    use_sign: bool,
    mean: bool,
    segments: bool,
    touched: torch.Tensor | None = None,
) -> None:
    """``target[pos] += scale · contribution`` for every element every id reads (atomics); ``grad_out`` may be
    strided (e.g. the expanded gradient of a ``sum``: no copy). ``segments``: see :func:`robe_pooled_backward`.
    ``touched`` (uint8 ``[|M|]``, atomic scatter only): set to 1 at every position read."""
    if segments and touched is not None:
        raise ValueError("touched positions are marked by the atomic scatter only (segments=False)")
    _check_bags(ids, offsets, weights, coefficients, keys, target.numel(), dim, chunk_size, "robe backward")
    num_bags = offsets.numel() - 1
    if grad_out.shape != (num_bags, dim):
        raise ValueError(f"grad_out must be [B, dim] = {(num_bags, dim)}, got {tuple(grad_out.shape)}")
    if num_bags == 0 or ids.numel() == 0:
        return
    tiles = _launch(ids.numel(), num_bags, dim, chunk_size, target.numel(), keys)
    grad_out = grad_out.to(torch.float32)
    if segments:
        sorted_ids, sorted_keys, sorted_bags, sorted_scales = _sorted_occurrences(ids, offsets, weights, keys, mean)
        _SEGMENT_SCATTER(
            (ids.numel(), triton.cdiv(dim, tiles["BLOCK_D"])), target, grad_out, grad_out.stride(0),
            grad_out.stride(1), sorted_ids, sorted_keys, sorted_bags, sorted_scales, coefficients.contiguous(),
            float(scale), target.numel(), ids.numel(),
            DIM=dim, Z=chunk_size, USE_SIGN=use_sign, HAS_SCALES=sorted_scales is not None,
            **{**tiles, "BLOCK_N": SEGMENT_BLOCK_N},
        )
        return
    _SCATTER(
        _grid(num_bags, dim, tiles), target, touched, grad_out, grad_out.stride(0), grad_out.stride(1),
        ids.contiguous(), offsets.contiguous(), _contiguous_weights(weights), coefficients.contiguous(),
        keys.contiguous(), float(scale), target.numel(),
        DIM=dim, Z=chunk_size, USE_SIGN=use_sign, HAS_WEIGHTS=weights is not None, MEAN=mean,
        MARK=touched is not None, **tiles,
    )


def robe_pooled_backward(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    coefficients: torch.Tensor,
    keys: torch.Tensor,
    memory_size: int,
    dim: int,
    chunk_size: int,
    use_sign: bool,
    mean: bool,
    segments: bool = False,
) -> torch.Tensor:
    """Dense gradient ``[memory_size]`` (float32) of :func:`robe_pooled_forward` wrt ``memory``.

    ``grad_out`` ``[B, dim]``; the other arguments as for the forward. Every element's contribution is
    added with ``tl.atomic_add`` into a zeroed buffer (the summation order is not deterministic).
    ``segments``: sort the ids first (sorted segments), sum the gradient rows of each distinct (table, id)
    once, and add each distinct id's elements once — fewer atomics where ids repeat, a sort's cost always.
    """
    grad = torch.zeros(memory_size, dtype=torch.float32, device=grad_out.device)
    _scatter(grad, 1.0, grad_out, ids, offsets, weights, coefficients, keys,
             dim, chunk_size, use_sign, mean, segments)
    return grad


def robe_sparse_grad(
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    coefficients: torch.Tensor,
    keys: torch.Tensor,
    memory_size: int,
    dim: int,
    chunk_size: int,
    use_sign: bool,
    mean: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse gradient of ``M``: ``(positions [U]`` int64, ascending and unique: every position the bags read,
    ``values [U]`` float32), the coalesced form of :func:`robe_pooled_backward`'s gradient.

    One atomic scatter into a dense ``[memory_size]`` buffer that also marks the positions it reads, then the
    marked positions (``nonzero``: the one device synchronisation, as ``U`` is data-dependent) and their values.
    """
    grad = torch.zeros(memory_size, dtype=torch.float32, device=grad_out.device)
    touched = torch.zeros(memory_size, dtype=torch.uint8, device=grad_out.device)
    _scatter(grad, 1.0, grad_out, ids, offsets, weights, coefficients, keys, dim, chunk_size, use_sign, mean,
             segments=False, touched=touched)
    positions = touched.nonzero().squeeze(1)
    return positions, grad.index_select(0, positions)


def robe_sgd_update_(
    memory: torch.Tensor,
    grad_out: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    weights: torch.Tensor | None,
    coefficients: torch.Tensor,
    keys: torch.Tensor,
    dim: int,
    chunk_size: int,
    use_sign: bool,
    mean: bool,
    lr: float,
    segments: bool = False,
) -> torch.Tensor:
    """Fused backward + SGD, in place: ``memory -= lr · grad`` without materialising ``grad``; returns ``memory``.

    ``memory`` ``[|M|]`` float32 and contiguous; each contribution ``-lr · g`` is added at its position
    with ``tl.atomic_add`` (equal to ``memory - lr * robe_pooled_backward(...)`` up to rounding).
    ``segments`` as for :func:`robe_pooled_backward`.
    """
    if not memory.is_contiguous() or memory.dtype != torch.float32:
        raise ValueError("memory must be a contiguous float32 tensor (it is updated in place)")
    _scatter(memory, -lr, grad_out, ids, offsets, weights, coefficients, keys,
             dim, chunk_size, use_sign, mean, segments)
    return memory


def robe_weights_grad(
    grad_out: torch.Tensor,
    memory: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    coefficients: torch.Tensor,
    keys: torch.Tensor,
    dim: int,
    chunk_size: int,
    use_sign: bool,
    mean: bool,
) -> torch.Tensor:
    """Gradient ``[N]`` (float32) of :func:`robe_pooled_forward` wrt the per-sample weights.

    ``grad_weights[j] = <grad_out[bag(j)] (/ bag length for MEAN), E[ids[j]]>``; one program per bag.
    """
    _check_bags(ids, offsets, None, coefficients, keys, memory.numel(), dim, chunk_size, "robe_weights_grad")
    num_bags = offsets.numel() - 1
    if grad_out.shape != (num_bags, dim):
        raise ValueError(f"grad_out must be [B, dim] = {(num_bags, dim)}, got {tuple(grad_out.shape)}")
    out = torch.zeros(ids.numel(), dtype=torch.float32, device=memory.device)
    if num_bags == 0:
        return out
    _WEIGHTS_GRAD(
        (num_bags,), memory.contiguous(), grad_out.to(torch.float32).contiguous(), ids.contiguous(),
        offsets.contiguous(), coefficients.contiguous(), keys.contiguous(), out, memory.numel(),
        DIM=dim, Z=chunk_size, USE_SIGN=use_sign, MEAN=mean,
        **_launch(ids.numel(), num_bags, dim, chunk_size, memory.numel(), keys),
    )
    return out


def blockwise_adagrad_update_(
    param: torch.Tensor,
    accumulator: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    eps: float,
    block_size: int,
    lr_decay: float = 0.0,
    step: int = 1,
) -> torch.Tensor:
    """Blockwise Adagrad step in place on a dense gradient; returns ``param``.

    ``param`` / ``grad`` ``[m]`` (any shape, flattened; float32, contiguous); ``accumulator``
    ``[ceil(m / block_size)]`` (any shape of that many elements, e.g. FusedUpdate's ``[rows, 1]``;
    ``block_size = 1``: elementwise Adagrad, shape of ``param``). For every block ``b`` of
    ``block_size`` consecutive elements (the last one may be partial, counted as zero-padded):
    ``sum_b += mean(g_b²)``, ``p_b -= clr · g_b / (sqrt(sum_b) + eps)`` with
    ``clr = lr / (1 + (step - 1) · lr_decay)`` (``step`` counts from 1), as ``FusedUpdate``'s dense step.
    """
    numel = param.numel()
    rows = triton.cdiv(numel, block_size)
    for name, tensor in (("param", param), ("accumulator", accumulator)):
        if not tensor.is_contiguous() or tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be a contiguous float32 tensor (it is updated in place)")
    if grad.numel() != numel or accumulator.numel() != rows:
        raise ValueError(
            f"grad must have {numel} elements and accumulator {rows}, got {grad.numel()} and {accumulator.numel()}"
        )
    if numel == 0:
        return param
    block_cols = min(triton.next_power_of_2(block_size), MAX_ADAGRAD_COLS)
    blocks = max(1, _ROWS_PER_ADAGRAD_TILE // block_cols)
    _ADAGRAD(
        (triton.cdiv(rows, blocks),), param, accumulator, grad.to(torch.float32).contiguous(),
        lr / (1 + (step - 1) * lr_decay), eps, numel,
        BLOCK_SIZE=block_size, BLOCKS=blocks, BLOCK_COLS=block_cols,
    )
    return param
