"""Configuration of quotient-remainder (QR) compositional embeddings."""

from __future__ import annotations

import dataclasses
from typing import Literal

from torchrec_pss import config_checks as checks
from torchrec_pss.contract import IN_SIGNATURE, MethodConfig
from torchrec_pss.gradient_layout import GRADIENT_MODES

_NOT_SIGNED = {IN_SIGNATURE: False}
Operation = Literal["mult", "add", "concat"]


@dataclasses.dataclass(frozen=True)
class QRConfig(MethodConfig):
    """Quotient-remainder embeddings (Shi et al., 2020): id ``x`` composes rows of small tables.

    With ``num_partitions = k`` and collisions ``c`` the complementary partitions are the mixed-radix
    digits of ``x``: part ``j < k-1`` is ``(x // c^j) mod c`` (``c`` rows; part 0 is the remainder
    ``x mod c``) and the last part is the quotient ``x // c^(k-1)`` (``ceil(n / c^(k-1))`` rows),
    computed with integer floor division. Rows are composed per id, before pooling, by ``operation``:
    elementwise product, sum, or concatenation (each part then has ``d / k`` columns).

    Args:
        collisions: ``c >= 2``; or
        compression: target ratio ``n·d / stored`` (``>= 1``): the smallest ``c`` reaching it is used.
            Give exactly one.
        operation: ``"mult"`` (default, the paper's best), ``"add"`` or ``"concat"``.
        num_partitions: ``k``, 2 (quotient + remainder) or more.
        init_scale: every part initialised ``U(-s, s)``. Default: symmetric around 0 with ``s`` chosen
            so the composed embedding has the variance of TorchRec's default init of the full table,
            ``U(±sqrt(1/n))`` (variance ``1/(3n)``): each part has variance ``1/(3n)`` for concat,
            ``1/(3nk)`` for add and ``(1/(3n))^(1/k)`` for mult. (The reference DLRM code's
            ``U(sqrt(1/n), 1)`` makes every weight positive, so every product is positive too.)
        gradient: ``"dense"``, ``"sparse"`` or ``"auto"`` part-table gradients (see
            :mod:`torchrec_pss.gradient_layout`).
    """

    collisions: int | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    compression: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    operation: Operation = "mult"
    num_partitions: int = 2
    init_scale: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    gradient: Literal["dense", "sparse", "auto"] = dataclasses.field(default="dense", metadata=_NOT_SIGNED)

    def __post_init__(self) -> None:
        checks.exactly_one(self, "collisions", "compression")
        checks.integer_at_least(self, "collisions", 2, optional=True)
        checks.ratio(self, "compression", optional=True)
        checks.one_of(self, "operation", ("mult", "add", "concat"))
        checks.integer_at_least(self, "num_partitions", 2)
        checks.positive(self, "init_scale", optional=True)
        checks.one_of(self, "gradient", GRADIENT_MODES)
