"""Configuration of ROBE-Z (random offset block embedding) memories."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss import config_checks as checks
from torchrec_pss.contract import IN_SIGNATURE, MethodConfig
from torchrec_pss.gradient_layout import GRADIENT_MODES
from torchrec_pss.hashing import PRIME

GradientMode = Literal["dense", "sparse", "auto"]
ROBE_AUTO_DENSE_RATIO = 35.0
"""ROBE's dense / sparse crossover in ``|M|`` / touched elements: the dense step costs about one pass over
``|M|``, the sparse one (``robe_sparse_grad``) a sort of the touched elements. Measured by
``python benchmarks/lookup.py --rows 4000000 --pooling 1 --compression 10 20 40 100 --methods robe --chunk-size Z``
on a 2-core CPU (``benchmarks/results/lookup_crossover_z32.md``, ``_z1.md``; B = 4096, torch SGD after
backward): dense wins at 24.4 (Z = 32: 19.6 against 30.5 ms; Z = 1: 23.0 against 30.0), sparse at 48.8
(18.6 against 33.2; 37.4 against 44.0) and above. (Before ``robe_sparse_grad`` the crossover was near 50.)"""
_NOT_SIGNED = {IN_SIGNATURE: False}


@dataclasses.dataclass(frozen=True)
class RobeConfig(MethodConfig):
    """ROBE-Z over one shared array per ``share_group``.

    Args:
        compression: ratio of the group's logical size ``sum(n_t * d_t)`` to ``|M|`` (``>= 1``).
        memory_size: ``|M|`` in elements. Give exactly one of ``compression`` and ``memory_size``.
        chunk_size: Z, the number of consecutive embedding elements hashed as one block; either
            ``Z | d`` or ``d | Z`` for every table. ``Z = 1`` is HashedNet.
        share_group: all ROBE tables of one group in a module share ONE array.
        use_sign: multiply every element by a hashed sign ``g(t, x, i)`` in ``{-1, +1}``.
        seed: seeds the hash coefficients; part of the checkpoint signature.
        init_scale: memory initialised ``U(-s, s)``; default ``s = sqrt(d / |M|)``, the TorchRec default
            ``U(±sqrt(1/n))`` of a plain table holding as many rows as the memory does.
        gradient: ``"dense"`` (an ``|M|``-sized gradient), ``"sparse"`` (touched positions only,
            a torch sparse COO gradient) or ``"auto"`` (dense when ``|M| <= auto_dense_ratio`` x the
            number of elements the batch touches, sparse otherwise).
        auto_dense_ratio: threshold of the ``"auto"`` rule, :data:`ROBE_AUTO_DENSE_RATIO` by default.
    """

    compression: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    memory_size: int | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    chunk_size: int = 32
    share_group: str = "default"
    use_sign: bool = False
    seed: int = 0
    init_scale: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    gradient: GradientMode = dataclasses.field(default="auto", metadata=_NOT_SIGNED)
    auto_dense_ratio: float = dataclasses.field(default=ROBE_AUTO_DENSE_RATIO, metadata=_NOT_SIGNED)

    def __post_init__(self) -> None:
        checks.exactly_one(self, "compression", "memory_size")
        checks.ratio(self, "compression", optional=True)
        checks.integer_at_least(self, "memory_size", 1, PRIME, optional=True)
        checks.integer_at_least(self, "chunk_size", 1)
        checks.integer_at_least(self, "seed", 0)
        checks.positive(self, "init_scale", optional=True)
        checks.one_of(self, "gradient", GRADIENT_MODES)
        checks.positive(self, "auto_dense_ratio")
        checks.flag(self, "use_sign")
        checks.text(self, "share_group")

    @classmethod
    def for_memory(cls, table: EmbeddingBagConfig, elements: int) -> RobeConfig:
        """ROBE memory of ``elements`` elements for ``table`` alone (its own share group).

        Z is the largest divisor of ``d`` that is at most 32 (32 when ``d`` is a multiple of 32, ``d`` when
        ``d <= 32``, 24 for ``d = 48``, 1 for a prime ``d > 32``), so that ``Z | d``. The ``make_config`` of
        :func:`torchrec_pss.distributed.compression_for_budget`.
        """
        d = table.embedding_dim
        chunk_size = max(z for z in range(1, min(32, d) + 1) if d % z == 0)
        return cls(memory_size=elements, share_group=table.name, chunk_size=chunk_size)

    def group_key(self, table_name: str) -> str:
        return f"robe_{self.share_group}"
