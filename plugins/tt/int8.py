"""Inference-only int8 TT cores: int8 slices, one float32 scale per slice (see :mod:`torchrec_pss.quantize` for the scheme)."""

from __future__ import annotations

import torch
from torch import nn

from torchrec_pss.quantize import Int8Memory, frozen, quantize_rows
from torchrec_pss_plugins.tt.tt import TTMemory


class Int8TTMemory(Int8Memory, TTMemory):
    """TT cores as int8 ``cores.<k>`` ``[p, R_in, q, R_out]`` with float32 ``cores_qscale.<k>`` ``[p]`` (one per slice)."""

    def __init__(self, source: TTMemory, block_size: int | None = None) -> None:
        """``block_size`` is not used (one scale per row)."""
        super().__init__(source.config, list(source.tables.values()), device=torch.device("meta"))
        quantized = [quantize_rows(core.reshape(core.shape[0], -1)) for core in source.cores]
        self.cores = nn.ParameterList(frozen(codes.view(core.shape)) for (codes, _), core in zip(quantized, source.cores))
        self.cores_qscale = nn.ParameterList(frozen(scales) for _, scales in quantized)
        self.copy_constants(source)

    def dequantized(self) -> list[torch.Tensor]:
        """Every core ``q · s`` float32."""
        return [codes.float() * scales[:, None, None, None] for codes, scales in zip(self.cores, self.cores_qscale)]

    def core_tensors(self) -> list[torch.Tensor]:
        self.check_inference()
        return self.dequantized()
