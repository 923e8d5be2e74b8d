"""Configuration of the hashing trick (whole-row hashing)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torchrec_pss import config_checks as checks
from torchrec_pss.contract import IN_SIGNATURE, MethodConfig
from torchrec_pss.gradient_layout import GRADIENT_MODES

_NOT_SIGNED = {IN_SIGNATURE: False}


@dataclasses.dataclass(frozen=True)
class HashingConfig(MethodConfig):
    """The hashing trick: id ``x`` reads row ``h(x) mod k`` of a ``[k, d]`` table.

    Args:
        compression: ``n / k`` (``>= 1``); or
        num_buckets: ``k``. Give exactly one.
        seed: seeds the hash coefficients; part of the checkpoint signature.
        init_scale: rows initialised ``U(-s, s)``; default ``s = sqrt(1/k)`` (TorchRec's default for a
            ``k``-row table).
        gradient: ``"dense"`` (``[k, d]``), ``"sparse"`` (torch sparse rows) or ``"auto"`` table gradient
            (see :mod:`torchrec_pss.gradient_layout`).
    """

    compression: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    num_buckets: int | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    seed: int = 0
    init_scale: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    gradient: Literal["dense", "sparse", "auto"] = dataclasses.field(default="dense", metadata=_NOT_SIGNED)

    def __post_init__(self) -> None:
        checks.exactly_one(self, "compression", "num_buckets")
        checks.ratio(self, "compression", optional=True)
        checks.integer_at_least(self, "num_buckets", 1, optional=True)
        checks.integer_at_least(self, "seed", 0)
        checks.positive(self, "init_scale", optional=True)
        checks.one_of(self, "gradient", GRADIENT_MODES)
