"""Configuration of the hashing trick (whole-row hashing)."""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from torchrec_pss.contract import IN_SIGNATURE, MethodConfig

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
        gradient: ``"dense"`` (``[k, d]``) or ``"sparse"`` (torch sparse rows) table gradient.
    """

    compression: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    num_buckets: int | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    seed: int = 0
    init_scale: float | None = dataclasses.field(default=None, metadata=_NOT_SIGNED)
    gradient: Literal["dense", "sparse"] = dataclasses.field(default="dense", metadata=_NOT_SIGNED)

    def __post_init__(self) -> None:
        if (self.compression is None) == (self.num_buckets is None):
            raise ValueError(
                f"HashingConfig: give exactly one of compression and num_buckets "
                f"(got compression={self.compression}, num_buckets={self.num_buckets})"
            )
        if self.compression is not None and not (math.isfinite(self.compression) and self.compression >= 1):
            raise ValueError(f"HashingConfig.compression must be a finite number >= 1, got {self.compression}")
        if self.num_buckets is not None and not (isinstance(self.num_buckets, int) and self.num_buckets >= 1):
            raise ValueError(f"HashingConfig.num_buckets must be an int >= 1, got {self.num_buckets!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"HashingConfig.seed must be an int >= 0, got {self.seed!r}")
        if self.init_scale is not None and not (math.isfinite(self.init_scale) and self.init_scale > 0):
            raise ValueError(f"HashingConfig.init_scale must be a finite number > 0, got {self.init_scale}")
        if self.gradient not in ("dense", "sparse"):
            raise ValueError(f"HashingConfig.gradient must be 'dense' or 'sparse', got {self.gradient!r}")
