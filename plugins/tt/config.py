"""Configuration of TT-Rec tensor-train embeddings."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torchrec_pss import config_checks as checks
from torchrec_pss.contract import IN_SIGNATURE, MethodConfig

_NOT_SIGNED = {IN_SIGNATURE: False}
Init = Literal["sampled_gaussian", "normal", "uniform"]


def _positive_ints(values: object) -> tuple[int, ...] | None:
    """``values`` (a sequence) as a tuple of Python ints, or None unless every one is an integer >= 1."""
    if not isinstance(values, (tuple, list)):
        return None
    ints = tuple(checks.as_int(v) for v in values)
    return ints if all(v is not None and v >= 1 for v in ints) else None


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
        checks.integer_at_least(self, "num_cores", 2, 4)
        single = checks.as_int(self.ranks)
        ranks = _positive_ints(self.ranks if single is None else (single,))
        if ranks is None:
            raise ValueError(f"TTConfig.ranks must be an int >= 1 or a sequence of them, got {self.ranks!r}")
        if single is None and len(ranks) != self.num_cores - 1:
            raise ValueError(
                f"TTConfig.ranks needs num_cores - 1 = {self.num_cores - 1} values, got {self.ranks!r}"
            )
        object.__setattr__(self, "ranks", ranks[0] if single is not None else ranks)
        for name in ("p_shapes", "q_shapes"):
            value = getattr(self, name)
            if value is None:
                continue
            shapes = _positive_ints(value)
            if shapes is None or len(shapes) != self.num_cores:
                raise ValueError(f"TTConfig.{name} must be {self.num_cores} ints >= 1, got {value!r}")
            object.__setattr__(self, name, shapes)
        checks.one_of(self, "init", ("sampled_gaussian", "normal", "uniform"))
        checks.integer_at_least(self, "seed", 0, optional=True)

    def rank_list(self) -> tuple[int, ...]:
        """``(1, R_1, ..., R_{N-1}, 1)``."""
        inner = (self.ranks,) * (self.num_cores - 1) if isinstance(self.ranks, int) else self.ranks
        return (1, *inner, 1)
