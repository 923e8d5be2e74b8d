"""Configuration of TT-Rec tensor-train embeddings."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torchrec_pss import config_checks as checks
from torchrec_pss.contract import IN_SIGNATURE, MethodConfig

_NOT_SIGNED = {IN_SIGNATURE: False}
Init = Literal["sampled_gaussian", "normal", "uniform"]


@dataclasses.dataclass(frozen=True)
class TTConfig(MethodConfig):
    """TT-Rec (Yin et al., 2021): the ``[n, d]`` table as a train of ``num_cores`` small cores.

    Core ``k`` has shape ``[p_k, R_{k-1}, q_k, R_k]`` (``R_0 = R_N = 1``) and
    ``E[x, j] = G_1[i_1, :, j_1, :] · G_2[i_2, :, j_2, :] ··· G_N[i_N, :, j_N, :]`` for the mixed-radix
    digits ``i`` of the row ``x`` (base ``p``) and ``j`` of the column (base ``q``), most significant first.

    Args:
        ranks: the inner TT ranks ``R_1 .. R_{N-1}``; an int means the same rank everywhere.
        num_cores: ``N``, 2 to 4.
        p_shapes: row factors, ``prod >= n`` (rows are padded, never truncated); default
            :func:`~torchrec_pss_plugins.tt.shapes.suggest_tt_shapes`.
        q_shapes: column factors, ``prod == d``; default likewise.
        init: ``"sampled_gaussian"`` (TT-Rec: keep ``N(0, 1)`` draws with ``|w| >= 2``), ``"normal"``
            (``N(0, 1)``) or ``"uniform"`` (``U(-1, 1)``), each then scaled so the reconstructed rows
            have the variance ``1/(3n)`` of TorchRec's default ``U(±sqrt(1/n))`` table init.
        seed: seeds the initial draws (``None``: torch's global generator).
    """

    ranks: int | tuple[int, ...] = 16
    num_cores: int = 3
    p_shapes: tuple[int, ...] | None = None
    q_shapes: tuple[int, ...] | None = None
    init: Init = dataclasses.field(default="sampled_gaussian", metadata=_NOT_SIGNED)
    seed: int | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)

    def __post_init__(self) -> None:
        for name in ("ranks", "p_shapes", "q_shapes"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        checks.integer_at_least(self, "num_cores", 2, 4)
        ranks = (self.ranks,) if isinstance(self.ranks, int) else self.ranks
        if not all(isinstance(r, int) and r >= 1 for r in ranks):
            raise ValueError(f"TTConfig.ranks must be ints >= 1, got {self.ranks!r}")
        if not isinstance(self.ranks, int) and len(self.ranks) != self.num_cores - 1:
            raise ValueError(
                f"TTConfig.ranks needs num_cores - 1 = {self.num_cores - 1} values, got {self.ranks!r}"
            )
        for name in ("p_shapes", "q_shapes"):
            value = getattr(self, name)
            if value is not None and (
                len(value) != self.num_cores or not all(isinstance(v, int) and v >= 1 for v in value)
            ):
                raise ValueError(f"TTConfig.{name} must be {self.num_cores} ints >= 1, got {value!r}")
        checks.one_of(self, "init", ("sampled_gaussian", "normal", "uniform"))
        checks.integer_at_least(self, "seed", 0, optional=True)

    def rank_list(self) -> tuple[int, ...]:
        """``(1, R_1, ..., R_{N-1}, 1)``."""
        inner = (self.ranks,) * (self.num_cores - 1) if isinstance(self.ranks, int) else self.ranks
        return (1, *inner, 1)
