"""Pure-PyTorch reference of every ROBE-Z op (any device): the formulas of :mod:`torchrec_pss_plugins.robe.robe`.

Bags are ``offsets`` ``[B + 1]`` (int64; bag ``b`` = ``ids[offsets[b]:offsets[b + 1]]``); ``coefficients``
is ``RobeMemory.hash_coefficients`` (``[2, 4]`` int64: location hash, sign hash); ``keys`` the tables' ``t``
(int64 ``[1]``: every bag reads one table; ``[B]``: bag ``b`` reads table ``keys[b]``, so one call pools the
bags of several tables sharing ``M``). The helpers on ids take ``key``: an int, or a tensor ``[N]`` (per id) or
``[1]``. The device kernels of :mod:`torchrec_pss_plugins.robe.ops` must equal these functions.
"""

from __future__ import annotations

import torch

from torchrec_pss.hashing import universal_hash
from torchrec_pss.pooling import offsets_to_bag_index, per_id_scale

_LOCATION, _SIGN = 0, 1

Key = torch.Tensor | int


def id_keys(keys: torch.Tensor, offsets: torch.Tensor, num_ids: int) -> torch.Tensor:
    """Each id's table key ``[N]`` (or the single key ``[1]``) from the bag keys ``keys`` (``[1]`` or ``[B]``)."""
    return keys if keys.numel() == 1 else keys.index_select(0, offsets_to_bag_index(offsets, num_ids))


def _column(key: Key) -> Key:
    """``key`` shaped to broadcast against ``[N, *]`` per-id tensors."""
    return key.unsqueeze(1) if isinstance(key, torch.Tensor) else key


def chunk_starts(coefficients: torch.Tensor, key: Key, ids: torch.Tensor, dim: int, chunk_size: int,
                 memory_size: int) -> tuple[torch.Tensor, int]:
    """Start positions ``[N, C]`` (``< |M|``) of the runs of ``R`` elements each id reads, and ``R``.

    ``Z <= d``: ``C = d / Z`` blocks of ``R = Z``; ``Z > d``: one run of ``R = d`` inside its block.
    """
    location, z, m = coefficients[_LOCATION], chunk_size, memory_size
    if z <= dim:
        blocks = torch.arange(dim // z, device=ids.device).unsqueeze(0)
        return universal_hash(location, _column(key), ids.unsqueeze(1), blocks, m), z
    ids_per_block = z // dim
    block_start = universal_hash(location, key, torch.div(ids, ids_per_block, rounding_mode="floor"), 0, m)
    return torch.remainder(block_start + torch.remainder(ids, ids_per_block) * dim, m).unsqueeze(1), dim


def positions(coefficients: torch.Tensor, key: Key, ids: torch.Tensor, dim: int, chunk_size: int,
              memory_size: int) -> torch.Tensor:
    """Memory positions ``[N, d]`` (int64) of every embedding element of ``ids``."""
    starts, run = chunk_starts(coefficients, key, ids, dim, chunk_size, memory_size)
    offsets = torch.arange(run, device=ids.device)
    return torch.remainder(starts.unsqueeze(2) + offsets, memory_size).reshape(ids.numel(), dim)


def signs(coefficients: torch.Tensor, key: Key, ids: torch.Tensor, dim: int) -> torch.Tensor:
    """The signs ``g(t, x, i)`` ``[N, d]`` (float32, ``±1``)."""
    elements = torch.arange(dim, device=ids.device).unsqueeze(0)
    bits = universal_hash(coefficients[_SIGN], _column(key), ids.unsqueeze(1), elements, 2)
    return (1 - 2 * bits).to(torch.float32)


def read_runs(memory: torch.Tensor, starts: torch.Tensor, run: int) -> torch.Tensor:
    """``out[k, r] = M[(starts[k] + r) mod |M|]``: ``[K, run]`` for ``starts`` ``[K]`` (each ``< |M|``).

    Reads whole runs from a sliding-window view of ``M``; the few runs that wrap past the end are
    re-read element by element.
    """
    m = memory.numel()
    offsets = torch.arange(run, device=starts.device)
    if m < run:
        return memory[(starts.unsqueeze(1) + offsets) % m]
    rows = memory.unfold(0, run, 1).index_select(0, starts.clamp(max=m - run))
    wrapped = torch.nonzero(starts > m - run).squeeze(1)
    if wrapped.numel():
        rows[wrapped] = memory[(starts[wrapped].unsqueeze(1) + offsets) % m]
    return rows


def _fold_circular(extended: torch.Tensor, m: int) -> torch.Tensor:
    """Add the tail of an ``[|M| + run - 1]`` gradient back onto ``[0, |M|)`` (the circular wrap): ``[|M|]``."""
    tail = extended[m:]
    if tail.numel() <= m:
        extended[: tail.numel()] += tail
        return extended[:m]
    grad = extended[:m].clone()
    return grad.index_add_(0, torch.arange(m, m + tail.numel(), device=grad.device) % m, tail)


def dense_runs_grad(starts: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """``[|M|]`` gradient of runs ``M[s : s + R]`` (circular) whose gradients are ``rows`` ``[K, R]``.

    When ``|M| <= K`` it accumulates per start first (``[|M|, R]``) and shifts each column into place,
    which costs ``O(|M|·R)``; otherwise it adds every element at its position (``O(K·R)``).
    """
    run = rows.shape[1]
    if m <= starts.numel():
        per_start = rows.new_zeros(m, run).index_add_(0, starts, rows)
        extended = rows.new_zeros(m + run - 1)
        for offset in range(run):
            extended[offset : offset + m] += per_start[:, offset]
    else:
        where = (starts.unsqueeze(1) + torch.arange(run, device=starts.device)).reshape(-1)
        extended = rows.new_zeros(m + run - 1).index_add_(0, where, rows.reshape(-1))
    return _fold_circular(extended, m)


def sparse_runs_grad(starts: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """The same gradient as :func:`dense_runs_grad` as a coalesced sparse COO tensor over the touched positions."""
    run = rows.shape[1]
    unique, inverse = torch.unique(starts, return_inverse=True)
    per_start = rows.new_zeros(unique.numel(), run).index_add_(0, inverse, rows)
    where = (unique.unsqueeze(1) + torch.arange(run, device=starts.device)).reshape(1, -1) % m
    return torch.sparse_coo_tensor(where, per_start.reshape(-1), (m,)).coalesce()


def _layout(coefficients: torch.Tensor, key: Key, ids: torch.Tensor, dim: int, chunk_size: int,
            use_sign: bool, m: int) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """``(starts [N, C], run, signs [N, d] or None)``: with signs every element is its own run of 1."""
    if use_sign:
        return (positions(coefficients, key, ids, dim, chunk_size, m), 1,
                signs(coefficients, key, ids, dim))
    starts, run = chunk_starts(coefficients, key, ids, dim, chunk_size, m)
    return starts, run, None


def rows(memory: torch.Tensor, ids: torch.Tensor, coefficients: torch.Tensor, key: Key, dim: int,
         chunk_size: int, use_sign: bool) -> torch.Tensor:
    """The recovered embeddings ``[N, d]`` of ``ids``."""
    starts, run, sign = _layout(coefficients, key, ids, dim, chunk_size, use_sign, memory.numel())
    out = read_runs(memory, starts.reshape(-1), run).view(ids.numel(), dim)
    return out if sign is None else out * sign.to(out.dtype)


def pooled_forward(memory: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                   coefficients: torch.Tensor, keys: torch.Tensor, dim: int, chunk_size: int, use_sign: bool,
                   mean: bool) -> torch.Tensor:
    """Pooled embeddings ``[B, d]``: each id's row times its weight, summed per bag (MEAN: / bag length)."""
    embeddings = rows(memory, ids, coefficients, id_keys(keys, offsets, ids.numel()), dim, chunk_size, use_sign)
    scale = per_id_scale(offsets, weights, mean, ids.numel(), embeddings.dtype)
    if scale is not None:
        embeddings = embeddings * scale.unsqueeze(1)
    out = embeddings.new_zeros(offsets.numel() - 1, dim)
    return out.index_add_(0, offsets_to_bag_index(offsets, ids.numel()), embeddings)


def _run_grads(grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
               coefficients: torch.Tensor, keys: torch.Tensor, dim: int, chunk_size: int, use_sign: bool, mean: bool,
               m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(starts [K], run gradients [K, R])`` of the memory runs the bags read."""
    starts, run, sign = _layout(coefficients, id_keys(keys, offsets, ids.numel()), ids, dim, chunk_size, use_sign, m)
    per_id = grad.index_select(0, offsets_to_bag_index(offsets, ids.numel()))
    scale = per_id_scale(offsets, weights, mean, ids.numel(), grad.dtype)
    if scale is not None:
        per_id = per_id * scale.unsqueeze(1)
    if sign is not None:
        per_id = per_id * sign.to(grad.dtype)
    return starts.reshape(-1), per_id.reshape(-1, run)


def pooled_backward(grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                    coefficients: torch.Tensor, keys: torch.Tensor, memory_size: int, chunk_size: int, use_sign: bool,
                    mean: bool, sparse: bool = False) -> torch.Tensor:
    """The gradient ``[|M|]`` of ``M`` for the output gradient ``grad`` ``[B, d]`` (sparse COO when ``sparse``)."""
    starts, run_grads = _run_grads(grad, ids, offsets, weights, coefficients, keys,
                                   grad.shape[1], chunk_size, use_sign, mean, memory_size)
    return (sparse_runs_grad if sparse else dense_runs_grad)(starts, run_grads, memory_size)


def sparse_grad(grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
                coefficients: torch.Tensor, keys: torch.Tensor, memory_size: int, chunk_size: int, use_sign: bool,
                mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse gradient of ``M`` as ``(positions [U]`` ascending and unique, ``values [U])``: the indices and
    values of :func:`pooled_backward`'s coalesced COO gradient."""
    coo = pooled_backward(grad, ids, offsets, weights, coefficients, keys, memory_size, chunk_size, use_sign, mean,
                          sparse=True)
    return coo.indices()[0], coo.values()


def weights_grad(grad: torch.Tensor, memory: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                 coefficients: torch.Tensor, keys: torch.Tensor, chunk_size: int, use_sign: bool,
                 mean: bool) -> torch.Tensor:
    """The gradient ``[N]`` of the per-sample weights: each id's row dotted with its bag's output gradient."""
    key = id_keys(keys, offsets, ids.numel())
    embeddings = rows(memory, ids, coefficients, key, grad.shape[1], chunk_size, use_sign)
    out = (grad.index_select(0, offsets_to_bag_index(offsets, ids.numel())) * embeddings).sum(1)
    scale = per_id_scale(offsets, None, mean, ids.numel(), out.dtype)
    return out if scale is None else out * scale


def sgd_update_(memory: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                weights: torch.Tensor | None, coefficients: torch.Tensor, keys: torch.Tensor, chunk_size: int,
                use_sign: bool, mean: bool, lr: float) -> None:
    """``M -= lr · dL/dM`` in place."""
    memory.add_(pooled_backward(grad, ids, offsets, weights, coefficients, keys, memory.numel(), chunk_size,
                                use_sign, mean), alpha=-lr)


def adagrad_update_(memory: torch.Tensor, accumulator: torch.Tensor, grad: torch.Tensor, ids: torch.Tensor,
                    offsets: torch.Tensor, weights: torch.Tensor | None, coefficients: torch.Tensor, keys: torch.Tensor,
                    chunk_size: int, use_sign: bool, mean: bool, lr: float, eps: float, block_size: int) -> None:
    """Blockwise Adagrad in place (``block_size = 1``: elementwise) on ``g = dL/dM``.

    ``accumulator`` holds ``ceil(|M| / block_size)`` sums; per block ``sum_b += mean(g_b²)`` (the last
    block zero-padded) and ``M_b -= lr · g_b / (sqrt(sum_b) + eps)``; ``lr`` is the (decayed) step size.
    """
    g = pooled_backward(grad, ids, offsets, weights, coefficients, keys, memory.numel(), chunk_size,
                        use_sign, mean)
    pad = (-g.numel()) % block_size
    blocks = torch.cat([g, g.new_zeros(pad)]).view(-1, block_size)
    sums = accumulator.view(-1)
    sums += blocks.pow(2).mean(dim=1)
    std = sums.sqrt().add(eps)
    memory.view(-1).add_((blocks / std.unsqueeze(1)).reshape(-1)[: memory.numel()], alpha=-lr)
