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

import dataclasses
import math
from collections.abc import Callable
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import BagRequest, PSSMemory
from torchrec_pss.gradient_layout import keep_coalesced_flag, use_sparse_gradient
from torchrec_pss.hashing import PRIME, hash_coefficients, table_key
from torchrec_pss.kernels import reference_only
from torchrec_pss.optim import FusedUpdate
from torchrec_pss.pooling import lengths_to_offsets, per_id_scale
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.robe import ops, reference
from torchrec_pss_plugins.robe.config import RobeConfig
from torchrec_pss_plugins.robe.fused_step import FusedRobeStep, pending_reads

_FUSED_KINDS = ("SGD", "Adagrad", "BlockwiseAdagrad", "RowWiseAdagrad")
CALL_GROUPINGS = ("auto", "per_width", "per_table")
ONE_CALL_MAX_FLOATS = 1 << 21
"""Pooled floats (bags x width, all tables together: 8 MB) up to which the CPU pools a memory's tables in one
call. Up to it one call made steps 1.3-6.6x faster than per-table calls in ``benchmarks/robe_calls.py`` (26
tables, fused SGD); beyond it, with one id per bag, one call ran at 0.79-1.58x their speed in two runs, while
per-table calls read each table's gradient in place."""


def one_call_per_width(grouping: str, device: torch.device, fused_adagrad: bool, floats: int) -> bool:
    """Whether a step's reads of a memory (``floats``: its pooled outputs' elements, all tables together) are
    pooled in one ``robe_pooled`` call per width (SUM and MEAN together), for :attr:`RobeMemory.call_grouping`
    ``grouping``. Each call costs the host tens of microseconds of Python and, on CUDA, a kernel launch, in forward
    and again in backward, which a model of many small tables pays per table; a fused Adagrad-type update
    (``fused_adagrad``) needs the step's whole gradient at once."""
    if grouping != "auto":
        return grouping == "per_width"
    return fused_adagrad or device.type == "cuda" or floats <= ONE_CALL_MAX_FLOATS


@register_method(RobeConfig)
class RobeMemory(PSSMemory):
    """One ROBE-Z array ``weight`` (``[|M|]`` float32) shared by ``tables``; see the module docstring."""

    name = "robe"
    per_table_buffers = ("table_keys",)
    config: RobeConfig
    call_grouping: str = "auto"
    """How :meth:`pooled_many` splits a step's reads into ``robe_pooled`` calls (set it on a memory to override):
    ``"per_width"``, one call per embedding width with every table's bags; ``"per_table"``, one
    call per table (a fused Adagrad-type update then runs unfused: it needs the step's whole gradient at once);
    ``"auto"``, per width on CUDA, with a fused Adagrad-type update, or on the CPU up to ``ONE_CALL_MAX_FLOATS``
    pooled floats, else per table (per width in a graph that ``torch.compile`` / ``torch.export`` trace, so that
    it holds for any batch size)."""

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
        self._key_index = {t.name: index for index, t in enumerate(tables)}
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

    def config_of_a_subset(self) -> RobeConfig:
        """``config`` with ``memory_size`` = this ``|M|``: the hash constants follow from the seed and the table names,
        so a memory of some of the tables reads the same positions of the same array."""
        return dataclasses.replace(self.config, compression=None, memory_size=self.memory_size)

    def optimizer_block_size(self, param: torch.Tensor) -> int:
        """One row-wise accumulator per Z consecutive memory elements."""
        return min(self.config.chunk_size, param.numel())

    def quantized(self, block_size: int) -> PSSMemory:
        from torchrec_pss_plugins.robe.int8 import Int8RobeMemory  # it subclasses this class

        return Int8RobeMemory(self, block_size)

    @torch.no_grad()
    def sketch_(self, weights: Mapping[str, torch.Tensor], rows_per_chunk: int) -> None:
        """``M = Σ_t S_t·E_t``: each ``E_t[x, i]`` (``weights[t]`` ``[n_t, d_t]``) added times ``g(t, x, i)``
        at ``h(t, x, i)``, accumulated in float64 (the error: :mod:`torchrec_pss.sketch`). Needs ``use_sign``:
        without signs every collision adds its value, a bias of ``sum(E) / |M|`` per element."""
        if not self.config.use_sign:
            raise ValueError(
                f"tables {sorted(self.tables)}: RobeConfig.use_sign=False; the sketch M = S·E is an unbiased "
                "estimate only with hashed signs (unsigned collisions add a bias of sum(E) / |M| per element); "
                "set use_sign=True"
            )
        total = torch.zeros(self.memory_size, dtype=torch.float64, device=self.weight.device)
        for name, weight in weights.items():
            for start in range(0, weight.shape[0], rows_per_chunk):
                rows = weight[start : start + rows_per_chunk].to(total)
                ids = torch.arange(start, start + rows.shape[0], device=total.device)
                signed = rows * self.signs(name, ids).to(total)
                total.index_add_(0, self.positions(name, ids).reshape(-1), signed.reshape(-1))
        self.weight.copy_(total)

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.weight, self.hash_coefficients, self.table_keys))

    def chunk_starts(self, table: str, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Start positions ``[N, C]`` (``< |M|``) of the runs of ``R`` elements each id reads, and ``R``."""
        return reference.chunk_starts(self.hash_coefficients, self._table_keys[table], ids,
                                      self.tables[table].embedding_dim, self.config.chunk_size, self.memory_size)

    def positions(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Memory positions ``[N, d]`` (int64) of every embedding element of ``ids``."""
        return reference.positions(self.hash_coefficients, self._table_keys[table], ids,
                                   self.tables[table].embedding_dim, self.config.chunk_size, self.memory_size)

    def signs(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """The signs ``g(t, x, i)`` ``[N, d]`` (float32, ``±1``)."""
        return reference.signs(self.hash_coefficients, self._table_keys[table], ids, self.tables[table].embedding_dim)

    def use_sparse_gradient(self, touched: int) -> bool:
        """The gradient layout for a batch touching ``touched`` memory elements (the ``gradient`` rule)."""
        return use_sparse_gradient(self.config.gradient, self.memory_size, touched, self.config.auto_dense_ratio)

    def _in_backward_update(self) -> FusedUpdate | None:
        """The in-backward update of ``M`` that the fused kernels can apply themselves, or None: a
        :class:`~torchrec_pss.optim.FusedUpdate` of a supported kind, not deferred (replicated memories' updates
        wait for the gradient all-reduce), in an eager float32 training forward with the fast kernels on."""
        if (not (torch.is_grad_enabled() and self.weight.requires_grad) or reference_only()
                or torch.compiler.is_compiling()):
            return None
        if self.weight.dtype != torch.float32:
            return None
        optimizers = getattr(self.weight, "_in_backward_optimizers", None)
        if not optimizers or len(optimizers) != 1 or not isinstance(optimizers[0], FusedUpdate):
            return None
        update = optimizers[0]
        return None if update.deferred_to is not None or update.kind not in _FUSED_KINDS else update

    def _key(self, table: str) -> torch.Tensor:
        """The table's key ``t`` as a ``[1]`` view of the ``table_keys`` buffer."""
        index = self._key_index[table]
        return self.table_keys[index : index + 1]

    def _bags(self, keys: torch.Tensor, dim: int, ids: torch.Tensor, offsets: torch.Tensor,
              weights: torch.Tensor | None, mean: bool, update: FusedUpdate | None, whole_step: bool,
              sparse_allowed: bool = True) -> torch.Tensor:
        """One ``robe_pooled`` call over bags of width ``dim``, fused with the in-backward ``update``
        (:mod:`~torchrec_pss_plugins.robe.fused_step`) when it pays: always for SGD; for Adagrad, whose step several
        fused reads would take on their summed dense gradient, only in a call that reads every table of the memory
        (``whole_step``); never with trainable weights. Unfused, ``M``'s gradient is sparse where the ``gradient``
        rule says so and ``sparse_allowed``."""
        z, sign = self.config.chunk_size, self.config.use_sign
        pending = None if update is None else pending_reads(update)
        if (pending is not None and (update.kind == "SGD" or whole_step)
                and (weights is None or not weights.requires_grad)):
            return FusedRobeStep.apply(self.weight, pending, ids, offsets, weights, self.hash_coefficients, keys, dim,
                                       z, sign, mean)
        sparse = sparse_allowed and self.use_sparse_gradient(ids.numel() * dim)
        if sparse:
            keep_coalesced_flag(self.weight)
        return ops.robe_pooled(self.weight, ids, offsets, weights, self.hash_coefficients, keys, dim, z, sign, mean,
                               sparse)

    def _pools_in_one_call(self, update: FusedUpdate | None, floats: int) -> bool:
        """:func:`one_call_per_width` for reads of ``floats`` pooled elements under ``update``."""
        if self.call_grouping not in CALL_GROUPINGS:
            raise ValueError(f"ROBE memory of tables {sorted(self.tables)}: call_grouping must be one of "
                             f"{CALL_GROUPINGS}, got {self.call_grouping!r}")
        if torch.compiler.is_compiling():  # a traced graph takes one call: no guard on the batch size
            return self.call_grouping != "per_table"
        return one_call_per_width(self.call_grouping, self.weight.device, update is not None and update.kind != "SGD",
                                  floats)

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(ids.numel() + 1, device=ids.device)
        return self._bags(self._key(table), self.tables[table].embedding_dim, ids, offsets, None, False,
                          self._in_backward_update(), len(self.tables) == 1)

    def pooled(
        self,
        table: str,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mean: bool,
    ) -> torch.Tensor:
        return self.pooled_many([BagRequest(table, ids, lengths, weights, mean)])[0]

    def pooled_many(self, requests: Sequence[BagRequest]) -> list[torch.Tensor]:
        """One ``robe_pooled`` call per embedding width (the requests' bags concatenated, each bag hashed with its
        own table's key; MEAN bags beside SUM bags pooled as sums weighted by 1 / bag length) or one call per
        request, as :attr:`call_grouping` says."""
        update = self._in_backward_update()
        one_call = self._pools_in_one_call(
            update, sum(r.lengths.numel() * self.tables[r.table].embedding_dim for r in requests))
        groups: dict[tuple[int, bool] | int, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(self.tables[request.table].embedding_dim if one_call else index, []).append(index)
        whole_step = len(groups) == 1 and {r.table for r in requests} == set(self.tables)
        # PyTorch's fake tensors cannot add sparse gradients of data-dependent size: several calls in a traced graph
        # take a dense gradient ("auto") or are refused ("sparse")
        sparse_allowed = len(groups) == 1 or not torch.compiler.is_compiling()
        if not sparse_allowed and self.config.gradient == "sparse":
            raise ValueError(
                f"ROBE memory of tables {sorted(self.tables)}: gradient='sparse' under torch.compile / torch.export "
                "needs every table read in one call (PyTorch cannot trace the sum of several sparse gradients of "
                "data-dependent size): give the tables one embedding_dim and call_grouping 'auto' or 'per_width', "
                "or use gradient='dense' / 'auto'"
            )
        out: list[torch.Tensor] = [torch.empty(0)] * len(requests)
        for members in groups.values():
            group = [requests[i] for i in members]
            mean = group[0].mean
            if any(r.mean != mean for r in group):
                group, mean = [_as_weighted_sum(r, self.weight.dtype) for r in group], False
            keys, ids, offsets, weights = _concatenated(group, self._key, self.weight.dtype)
            dim = self.tables[group[0].table].embedding_dim
            pooled = self._bags(keys, dim, ids, offsets, weights, mean, update, whole_step, sparse_allowed)
            blocks = [pooled] if len(group) == 1 else pooled.split([r.lengths.numel() for r in group])
            for index, block in zip(members, blocks):
                out[index] = block
        return out

    def pooled_stacked(self, tables: Sequence[str], ids: torch.Tensor, offsets: torch.Tensor,
                       weights: torch.Tensor | None, mean: bool, bags_per_table: int) -> torch.Tensor | None:
        """One ``robe_pooled`` call over the stacked bags (each hashed with its table's key) for one table, or for
        several when :attr:`call_grouping` pools their reads in one call; else None."""
        dim, count = self.tables[tables[0]].embedding_dim, len(tables)
        update = self._in_backward_update()
        if not self._pools_in_one_call(update, count * bags_per_table * dim) and count > 1:
            return None
        if count == 1:
            keys = self._key(tables[0])
        else:
            keys = self.table_keys if list(tables) == list(self.tables) else torch.cat([self._key(t) for t in tables])
            keys = keys.repeat_interleave(bags_per_table, output_size=count * bags_per_table)
        weights = None if weights is None else weights.to(self.weight.dtype)
        return self._bags(keys, dim, ids, offsets, weights, mean, update, set(tables) == set(self.tables))


def _as_weighted_sum(request: BagRequest, dtype: torch.dtype) -> BagRequest:
    """``request`` pooled as a sum: a MEAN request's weights divided by its bags' lengths (ones when unweighted)."""
    if not request.mean:
        return request
    offsets = request.bag_offsets()
    scale = per_id_scale(offsets, request.weights, True, request.ids.numel(), dtype)
    return request._replace(weights=scale, mean=False, offsets=offsets)


def _concatenated(requests: Sequence[BagRequest], key_of: Callable[[str], torch.Tensor], dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(keys, ids, offsets, weights)`` of the requests' bags, in order: ``keys`` ``[1]`` for one request,
    else one key per bag; weights of unweighted requests (when others have them) are ones."""
    if len(requests) == 1:
        (request,) = requests
        weights = None if request.weights is None else request.weights.to(dtype)
        return key_of(request.table), request.ids, request.bag_offsets(), weights
    keys = torch.cat([key_of(r.table).expand(r.lengths.numel()) for r in requests])
    ids = torch.cat([r.ids for r in requests])
    offsets = lengths_to_offsets(torch.cat([r.lengths for r in requests]))
    weights = None
    if any(r.weights is not None for r in requests):
        weights = torch.cat([r.ids.new_ones(r.ids.numel(), dtype=dtype) if r.weights is None else r.weights.to(dtype)
                             for r in requests])
    return keys, ids, offsets, weights
