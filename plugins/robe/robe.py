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
from typing import Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import PSSMemory
from torchrec_pss.gradient_layout import use_sparse_gradient
from torchrec_pss.hashing import PRIME, hash_coefficients, table_key
from torchrec_pss.kernels import reference_only
from torchrec_pss.optim import FusedUpdate
from torchrec_pss.pooling import lengths_to_offsets
from torchrec_pss.registry import register_method
from torchrec_pss_plugins.robe import ops, reference
from torchrec_pss_plugins.robe.config import RobeConfig

_FUSED_KINDS = ("SGD", "Adagrad", "BlockwiseAdagrad", "RowWiseAdagrad")


class _FusedRobeStep(torch.autograd.Function):
    """``robe_pooled`` whose backward applies the in-backward optimizer to ``M`` directly (fused kernels).

    ``M`` gets no ``.grad``: the SGD / Adagrad update is scattered into it in place, so no ``[|M|]``
    gradient is formed (SGD) or kept (Adagrad).
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, memory: torch.Tensor, update: FusedUpdate,
                ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, coefficients: torch.Tensor,
                key: int, dim: int, chunk_size: int, use_sign: bool, mean: bool) -> torch.Tensor:
        ctx.update, ctx.layout = update, (key, chunk_size, use_sign, mean)
        ctx.save_for_backward(ids, offsets, weights, coefficients)
        return ops.robe_pooled(memory, ids, offsets, weights, coefficients, key, dim, chunk_size, use_sign, mean,
                               False)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        ids, offsets, weights, coefficients = ctx.saved_tensors
        update, (key, chunk_size, use_sign, mean) = ctx.update, ctx.layout
        memory, group = update.param, update.group
        with torch.no_grad():
            if update.kind == "SGD":
                ops.robe_sgd_update_(memory, grad, ids, offsets, weights, coefficients, key, chunk_size, use_sign,
                                     mean, group["lr"])
            else:
                block = 1 if update.kind == "Adagrad" else update.row_size
                ops.robe_adagrad_update_(memory, update.state["sum"], grad, ids, offsets, weights, coefficients, key,
                                         chunk_size, use_sign, mean, update.next_step_lr(), group["eps"], block)
        return (None,) * 11


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

    def _fused_update(self, weights: torch.Tensor | None) -> FusedUpdate | None:
        """The in-backward update the fused kernels can apply themselves, or None.

        SGD is linear, so any number of reads per step may each apply their share; Adagrad needs the
        whole step's gradient at once, so only a memory read by one table qualifies. Replicated
        memories (whose updates wait for the gradient all-reduce) and trainable weights do not.
        """
        if not (torch.is_grad_enabled() and self.weight.requires_grad) or reference_only():
            return None
        if self.weight.dtype != torch.float32:
            return None
        if weights is not None and weights.requires_grad:
            return None
        optimizers = getattr(self.weight, "_in_backward_optimizers", None)
        if not optimizers or len(optimizers) != 1 or not isinstance(optimizers[0], FusedUpdate):
            return None
        update = optimizers[0]
        if update.deferred_to is not None or update.kind not in _FUSED_KINDS:
            return None
        return update if update.kind == "SGD" or len(self.tables) == 1 else None

    def _bags(self, table: str, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None,
              mean: bool) -> torch.Tensor:
        d, z, sign = self.tables[table].embedding_dim, self.config.chunk_size, self.config.use_sign
        key = self._table_keys[table]
        update = self._fused_update(weights)
        if update is not None:
            return _FusedRobeStep.apply(self.weight, update, ids, offsets, weights, self.hash_coefficients, key, d, z,
                                        sign, mean)
        sparse = self.use_sparse_gradient(ids.numel() * d)
        return ops.robe_pooled(self.weight, ids, offsets, weights, self.hash_coefficients, key, d, z, sign, mean,
                               sparse)

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        return self._bags(table, ids, torch.arange(ids.numel() + 1, device=ids.device), None, False)

    def pooled(
        self,
        table: str,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mean: bool,
    ) -> torch.Tensor:
        offsets = lengths_to_offsets(lengths)
        weights = None if weights is None else weights.to(self.weight.dtype)
        return self._bags(table, ids, offsets, weights, mean)
