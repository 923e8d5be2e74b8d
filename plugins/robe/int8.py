"""Inference-only int8 ROBE memory: int8 elements, one float32 scale per block (scheme: :mod:`torchrec_pss.quantize`)."""

from __future__ import annotations

import torch

from torchrec_pss.contract import PSSMemory
from torchrec_pss.quantize import DEFAULT_BLOCK_SIZE, Int8Memory, frozen, quantize_blocks
from torchrec_pss_plugins.robe.robe import RobeMemory


class Int8RobeMemory(Int8Memory, RobeMemory):
    """A ROBE memory as int8 ``weight`` ``[|M|]`` with float32 ``weight_qscale`` ``[ceil(|M| / block_size)]``."""

    def __init__(self, source: RobeMemory, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(source.config, list(source.tables.values()), device=torch.device("meta"))
        self.block_size = block_size
        codes, scales = quantize_blocks(source.weight, block_size)
        self.weight, self.weight_qscale = frozen(codes), frozen(scales)
        self.copy_constants(source)

    def dequantized(self) -> torch.Tensor:
        """The whole memory ``q · s`` ``[|M|]`` float32 (for references; lookups read single elements)."""
        return self.weight.float() * self.weight_qscale.repeat_interleave(self.block_size)[: self.memory_size]

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        self.check_inference()
        positions = self.positions(table, ids)
        values = self.weight[positions].float() * self.weight_qscale[positions // self.block_size]
        return values * self.signs(table, ids) if self.config.use_sign else values

    pooled = PSSMemory.pooled
    pooled_many = PSSMemory.pooled_many
    pooled_stacked = PSSMemory.pooled_stacked  # None: pooled table by table from the dequantized elements
