"""Configuration of MLET (multi-layer embedding training)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torchrec_pss import config_checks as checks
from torchrec_pss.contract import IN_SIGNATURE, MethodConfig
from torchrec_pss.gradient_layout import GRADIENT_MODES

_NOT_SIGNED = {IN_SIGNATURE: False}


@dataclasses.dataclass(frozen=True)
class MLETConfig(MethodConfig):
    """MLET (Deng et al., 2021): train ``E = W1 · W2`` with ``W1 [n, k]``, ``W2 [k, d]``, serve ``E``.

    Args:
        inner_dim: ``k``; the paper's gains are for ``k / d >= 4``.
        init_std: both factors start ``N(0, init_std^2)``; the paper's ``N(0, 0.0625)`` is
            ``init_std = 0.25``.
        gradient: ``"dense"``, ``"sparse"`` or ``"auto"`` gradient of ``W1`` (see
            :mod:`torchrec_pss.gradient_layout`).
    """

    inner_dim: int
    init_std: float = dataclasses.field(default=0.25, metadata=_NOT_SIGNED)
    gradient: Literal["dense", "sparse", "auto"] = dataclasses.field(default="dense", metadata=_NOT_SIGNED)

    def __post_init__(self) -> None:
        checks.integer_at_least(self, "inner_dim", 1)
        checks.positive(self, "init_std")
        checks.one_of(self, "gradient", GRADIENT_MODES)
