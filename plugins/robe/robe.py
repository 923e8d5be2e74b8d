"""ROBE-Z: every table of a share group reads its embeddings from ONE hashed array ``M``.

Recovery (ROBE paper, appendix 7.2, over the flattened parameter vector) — the contract for every
kernel of this method. Element ``i`` (``0 <= i < d``) of the embedding of id ``x`` in table ``t``::

    E_t[x, i] = M[(h(t, k, c) + o) mod |M|]  ·  g(t, x, i)   (the sign only when use_sign)

    Z <= d (Z | d):  k = x,              c = i // Z,  o = i mod Z
    Z >  d (d | Z):  k = x // (Z / d),   c = 0,       o = (x mod (Z / d)) · d + i

    h(t, k, c) = ((A·t + B·(k mod P) + C·c + D) mod P) mod |M|
    g(t, x, i) = 1 - 2 · (((A'·t + B'·(x mod P) + C'·i + D') mod P) mod 2)

with ``P = 2^31 - 1``, ``(A, B, C, D)`` and ``(A', B', C', D')`` drawn from ``seed`` (buffer
``hash_coefficients``, shape ``[2, 4]``), and ``t = crc32(table name) mod P`` (buffer ``table_keys``).
Every product is reduced mod ``P`` before it is summed (:mod:`torchrec_pss.hashing`), so ids up to
``2^62`` and beyond never overflow int64. ``Z = 1`` is HashedNet; a block never splits across
the end of ``M``: it wraps around (``M`` is circular).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.gradient_layout import use_sparse_gradient
from torchrec_pss.hashing import PRIME, hash_coefficients, table_key, universal_hash
from torchrec_pss.pooling import bag_index, bag_mean
from torchrec_pss.contract import PSSMemory
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.robe.config import RobeConfig

_LOCATION, _SIGN = 0, 1


def _read_runs(memory: torch.Tensor, starts: torch.Tensor, run: int) -> torch.Tensor:
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


def _dense_grad(starts: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
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
        positions = (starts.unsqueeze(1) + torch.arange(run, device=starts.device)).reshape(-1)
        extended = rows.new_zeros(m + run - 1).index_add_(0, positions, rows.reshape(-1))
    return _fold_circular(extended, m)


def _sparse_grad(starts: torch.Tensor, rows: torch.Tensor, m: int) -> torch.Tensor:
    """The same gradient as :func:`_dense_grad` as a coalesced sparse COO tensor over the touched positions."""
    run = rows.shape[1]
    unique, inverse = torch.unique(starts, return_inverse=True)
    per_start = rows.new_zeros(unique.numel(), run).index_add_(0, inverse, rows)
    positions = (unique.unsqueeze(1) + torch.arange(run, device=starts.device)).reshape(1, -1) % m
    return torch.sparse_coo_tensor(positions, per_start.reshape(-1), (m,)).coalesce()


class _RobeBag(torch.autograd.Function):
    """Read runs of ``R`` elements of ``M`` and (optionally) pool them into bags.

    ``starts`` ``[N, C]`` (each ``< |M|``): id ``j`` reads ``M[starts[j, c] + r]`` (circular) as its
    elements ``c·R + r``, giving ``rows`` ``[N, C·R]``; rows are multiplied by ``signs`` ``[N, C·R]`` and
    ``per_sample_weights`` ``[N]`` when given, then summed per bag (``bag_index`` ``[N]`` into
    ``num_bags`` rows) unless ``bag_index`` is None. The memory gradient is dense or sparse.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        memory: torch.Tensor,
        starts: torch.Tensor,
        run: int,
        signs: torch.Tensor | None,
        per_sample_weights: torch.Tensor | None,
        bag_index: torch.Tensor | None,
        num_bags: int,
        sparse: bool,
    ) -> torch.Tensor:
        n = starts.shape[0]
        rows = _read_runs(memory, starts.reshape(-1), run).view(n, starts.shape[1] * run)
        if signs is not None:
            rows = rows * signs
        weighted = rows if per_sample_weights is None else rows * per_sample_weights.unsqueeze(1)
        out = weighted if bag_index is None else weighted.new_zeros(num_bags, weighted.shape[1]).index_add_(
            0, bag_index, weighted
        )
        ctx.run, ctx.sparse, ctx.memory_size = run, sparse, memory.numel()
        keep_rows = per_sample_weights is not None and ctx.needs_input_grad[4]
        ctx.save_for_backward(starts, signs, per_sample_weights, bag_index, rows if keep_rows else None)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        starts, signs, per_sample_weights, bag_index, rows = ctx.saved_tensors
        if bag_index is not None:
            grad = grad.index_select(0, bag_index)
        weights_grad = (grad * rows).sum(1) if rows is not None else None
        if per_sample_weights is not None:
            grad = grad * per_sample_weights.unsqueeze(1)
        if signs is not None:
            grad = grad * signs
        memory_grad = None
        if ctx.needs_input_grad[0]:
            run_grads = grad.reshape(starts.numel(), ctx.run)
            make = _sparse_grad if ctx.sparse else _dense_grad
            memory_grad = make(starts.reshape(-1), run_grads, ctx.memory_size)
        return memory_grad, None, None, None, weights_grad, None, None, None


@register_method(RobeConfig)
class RobeMemory(PSSMemory):
    """One ROBE-Z array ``weight`` (``[|M|]`` float32) shared by ``tables``; see the module docstring."""

    name = "robe"
    config: RobeConfig

    def __init__(
        self,
        config: RobeConfig,
        tables: Sequence[EmbeddingBagConfig],
        device: torch.device | None = None,
    ) -> None:
        super().__init__(config, tables, device)
        z = config.chunk_size
        keys: dict[int, str] = {}
        for t in tables:
            d = t.embedding_dim
            if d % z != 0 and z % d != 0:
                raise ValueError(
                    f"table {t.name!r}: RobeConfig.chunk_size={z} must divide embedding_dim={d} or be a multiple of it"
                )
            key = table_key(t.name)
            if key in keys:
                raise ValueError(f"tables {keys[key]!r} and {t.name!r} hash to the same table key; rename one")
            keys[key] = t.name
        self._table_keys = {name: key for key, name in keys.items()}
        logical = sum(t.num_embeddings * t.embedding_dim for t in tables)
        size = config.memory_size if config.memory_size is not None else math.ceil(logical / config.compression)
        if size > PRIME:
            raise ValueError(
                f"ROBE group {config.share_group!r}: |M| = {size} exceeds the hash range {PRIME}; raise compression"
            )
        self.weight = nn.Parameter(torch.empty(size, device=device))
        self.register_buffer("hash_coefficients", torch.empty(2, 4, dtype=torch.int64, device=device))
        self.register_buffer("table_keys", torch.empty(len(tables), dtype=torch.int64, device=device))
        self.reset_parameters()

    @property
    def memory_size(self) -> int:
        """``|M|`` in elements."""
        return self.weight.numel()

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        scale = self.config.init_scale
        if scale is None:
            scale = math.sqrt(max(t.embedding_dim for t in self.tables.values()) / self.memory_size)
        with torch.no_grad():
            self.weight.uniform_(-scale, scale)
            self.hash_coefficients.copy_(hash_coefficients(self.config.seed, 2))
            self.table_keys.copy_(torch.tensor([self._table_keys[n] for n in self.tables], dtype=torch.int64))

    def optimizer_block_size(self, param: torch.Tensor) -> int:
        """One row-wise accumulator per Z consecutive memory elements."""
        return min(self.config.chunk_size, param.numel())

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.hash_coefficients, self.table_keys))

    def chunk_starts(self, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Start positions ``[N, C]`` (``< |M|``) of the runs of ``R`` elements each id reads, and ``R``.

        ``Z <= d``: ``C = d / Z`` blocks of ``R = Z``; ``Z > d``: one run of ``R = d`` inside its block.
        """
        d = self.tables[table].embedding_dim
        z = self.config.chunk_size
        t = self._table_keys[table]
        location = self.hash_coefficients[_LOCATION]
        m = self.memory_size
        if z <= d:
            blocks = torch.arange(d // z, device=ids.device).unsqueeze(0)
            return universal_hash(location, t, ids.unsqueeze(1), blocks, m), z
        ids_per_block = z // d
        block_start = universal_hash(location, t, torch.div(ids, ids_per_block, rounding_mode="floor"), 0, m)
        return torch.remainder(block_start + torch.remainder(ids, ids_per_block) * d, m).unsqueeze(1), d

    def positions(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Memory positions ``[N, d]`` (int64) of every embedding element of ``ids``."""
        starts, run = self.chunk_starts(table, ids)
        offsets = torch.arange(run, device=ids.device)
        return torch.remainder(starts.unsqueeze(2) + offsets, self.memory_size).reshape(ids.numel(), starts.shape[1] * run)

    def signs(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The signs ``g(t, x, i)`` ``[N, d]`` (float32, ``±1``)."""
        elements = torch.arange(self.tables[table].embedding_dim, device=ids.device).unsqueeze(0)
        bits = universal_hash(self.hash_coefficients[_SIGN], self._table_keys[table], ids.unsqueeze(1), elements, 2)
        return (1 - 2 * bits).to(self.weight.dtype)

    def use_sparse_gradient(self, touched: int) -> bool:
        """The gradient layout for a batch touching ``touched`` memory elements (the ``gradient`` rule)."""
        return use_sparse_gradient(self.config.gradient, self.memory_size, touched, self.config.auto_dense_ratio)

    def _read(
        self,
        table: str,
        ids: torch.Tensor,
        per_sample_weights: torch.Tensor | None,
        bag_index: torch.Tensor | None,
        num_bags: int,
    ) -> torch.Tensor:
        if self.config.use_sign:
            starts, run, signs = self.positions(table, ids), 1, self.signs(table, ids)
        else:
            (starts, run), signs = self.chunk_starts(table, ids), None
        sparse = self.use_sparse_gradient(starts.numel() * run)
        return _RobeBag.apply(self.weight, starts, run, signs, per_sample_weights, bag_index, num_bags, sparse)

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return self._read(table, ids, None, None, 0)

    def pooled(
        self,
        table: str,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mean: bool,
    ) -> torch.Tensor:
        weights = None if weights is None else weights.to(self.weight.dtype)
        out = self._read(table, ids, weights, bag_index(lengths, ids.numel()), lengths.numel())
        return bag_mean(out, lengths) if mean else out
