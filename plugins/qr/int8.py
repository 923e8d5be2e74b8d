"""Inference-only int8 QR part tables: int8 rows, one float32 scale per row (see :mod:`torchrec_pss.quantize` for the scheme)."""

from __future__ import annotations

import torch
from torch import nn

from torchrec_pss.quantize import Int8Memory, frozen, quantize_rows
from torchrec_pss_plugins.qr import ops as qr_ops
from torchrec_pss_plugins.qr.qr import QRMemory


class Int8QRMemory(Int8Memory, QRMemory):
    """QR part tables as int8 ``parts.<j>`` ``[rows_j, width]`` with float32 ``parts_qscale.<j>`` ``[rows_j]``."""

    def __init__(self, source: QRMemory, block_size: int | None = None) -> None:
        """``block_size`` is not used (one scale per row)."""
        super().__init__(source.config, list(source.tables.values()), device=torch.device("meta"))
        quantized = [quantize_rows(part) for part in source.parts]
        self.parts = nn.ParameterList(frozen(codes) for codes, _ in quantized)
        self.parts_qscale = nn.ParameterList(frozen(scales) for _, scales in quantized)
        self.copy_constants(source)

    def dequantized(self) -> list[torch.Tensor]:
        """Every part ``q · s`` ``[rows_j, width]`` float32."""
        return [codes.float() * scales.unsqueeze(1) for codes, scales in zip(self.parts, self.parts_qscale)]

    @property
    def compute_dtype(self) -> torch.dtype:
        """float32: the parts are dequantized before pooling."""
        return torch.float32

    def _bags(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool) -> torch.Tensor:
        self.check_inference()
        parts = self.dequantized()
        return qr_ops.qr_pooled(parts, ids, offsets, weights, self.collisions, self.config.operation, mean,
                                [False] * len(parts))
