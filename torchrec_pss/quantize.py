"""Inference-only int8 memories: ``quantize_memories_(model)`` turns trained ROBE, QR and TT memories into int8.

Symmetric quantization, no zero point: a group of values ``w`` is stored as ``q = round(w / s)`` in int8
(``[-127, 127]``) with one float32 scale ``s = max|w| / 127``, and read back as ``q · s``; every value is
off by at most ``s / 2``. Trained memories are centred on 0 (ROBE's signs make them so), so a zero point
would buy little, and without one 0 stays exact and nothing else is stored. Groups:

- ROBE ``weight`` ``[|M|]``: blocks of ``block_size`` consecutive elements (scales ``[ceil(|M| / B)]``).
  A lookup reads only the elements it needs (``q[h(x, i)] · s[h(x, i) // B]``): no full dequantization.
- QR ``parts.<j>`` ``[rows, width]``: one scale per row. TT ``cores.<k>`` ``[p, R_in, q, R_out]``: one scale
  per slice ``core[i]`` (``R_in · q · R_out`` elements; rows of ``q · R_out`` would leave the last core a
  4-byte scale per ``q`` values). Both are small (``O(sqrt(n))`` rows, a few cores), so a forward pass
  dequantizes them whole and runs the float kernels on the result.

Outputs equal those of the float module whose memories hold the dequantized values (``q · s``), exactly for
the recovered rows (the ROBE bags are pooled from them with :func:`torchrec_pss.pooling.pool`, so pooled
values may differ from the fused float kernel in the last bit). State-dict keys keep the float layout:
the int8 tensor under the parameter's key, its scales under the attribute name plus ``_qscale``
(``pss_memories.<group>.weight_qscale``, ``parts_qscale.<j>``, ``cores_qscale.<k>``), as torchrec's
quantized EBC stores ``weight_qscale`` beside ``weight``. Both are parameters with ``requires_grad=False``
(memory buffers are the recovery constants a checkpoint must match). Hashing-trick and MLET memories
(collapse MLET with :func:`torchrec_pss.collapse` first) and plain tables stay float32.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn
from torchrec_pss_plugins.qr import QRMemory
from torchrec_pss_plugins.qr import ops as qr_ops
from torchrec_pss_plugins.robe import RobeMemory
from torchrec_pss_plugins.tt import TTMemory
from torchrec_pss_plugins.tt import ops as tt_ops

from torchrec_pss.contract import PSSMemory
from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

DEFAULT_BLOCK_SIZE = 64
QMAX = 127


def quantize_rows(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes ``[R, C]`` and float32 scales ``[R]`` of ``values`` ``[R, C]``, one scale per row."""
    values = values.detach().float()
    scales = values.abs().amax(dim=1) / QMAX
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales)).unsqueeze(1)
    return torch.round(values / divisor).clamp_(-QMAX, QMAX).to(torch.int8), scales


def quantize_blocks(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes ``[L]`` and float32 scales ``[ceil(L / B)]`` of ``values`` ``[L]``, one scale per ``B`` elements."""
    padded = torch.cat([values.detach().float(), values.new_zeros((-values.numel()) % block_size)])
    codes, scales = quantize_rows(padded.view(-1, block_size))
    return codes.view(-1)[: values.numel()], scales


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _Int8Memory(PSSMemory):
    """What the int8 memories share: a forward that refuses training, no re-initialisation, bytes of every tensor.

    Every subclass is built as ``cls(float_memory, block_size)``.
    """

    def _copy_constants(self, source: PSSMemory) -> None:
        """The source memory's recovery constants (buffers) and mode."""
        for name, buffer in source.named_buffers(recurse=False):
            setattr(self, name, buffer.detach().clone())
        self.train(source.training)

    def reset_parameters(self) -> None:
        """Nothing to draw: an int8 memory holds trained values (load a state_dict to change them)."""

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.parameters(), self.buffers()))

    def _check_inference(self) -> None:
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(self).__name__} is inference-only (int8 memories take no gradients): call model.eval() or "
                "run under torch.no_grad() / torch.inference_mode(); train the float32 module, then quantize it"
            )


class Int8RobeMemory(_Int8Memory, RobeMemory):
    """A ROBE memory as int8 ``weight`` ``[|M|]`` with float32 ``weight_qscale`` ``[ceil(|M| / block_size)]``."""

    def __init__(self, source: RobeMemory, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        super().__init__(source.config, list(source.tables.values()), device=torch.device("meta"))
        self.block_size = block_size
        codes, scales = quantize_blocks(source.weight, block_size)
        self.weight, self.weight_qscale = _frozen(codes), _frozen(scales)
        self._copy_constants(source)

    def dequantized(self) -> torch.Tensor:
        """The whole memory ``q · s`` ``[|M|]`` float32 (for references; lookups read single elements)."""
        return self.weight.float() * self.weight_qscale.repeat_interleave(self.block_size)[: self.memory_size]

    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        self._check_inference()
        positions = self.positions(table, ids)
        values = self.weight[positions].float() * self.weight_qscale[positions // self.block_size]
        return values * self.signs(table, ids) if self.config.use_sign else values

    pooled = PSSMemory.pooled


class Int8QRMemory(_Int8Memory, QRMemory):
    """QR part tables as int8 ``parts.<j>`` ``[rows_j, width]`` with float32 ``parts_qscale.<j>`` ``[rows_j]``."""

    def __init__(self, source: QRMemory, block_size: int | None = None) -> None:
        """``block_size`` is not used (one scale per row)."""
        super().__init__(source.config, list(source.tables.values()), device=torch.device("meta"))
        quantized = [quantize_rows(part) for part in source.parts]
        self.parts = nn.ParameterList(_frozen(codes) for codes, _ in quantized)
        self.parts_qscale = nn.ParameterList(_frozen(scales) for _, scales in quantized)
        self._copy_constants(source)

    def dequantized(self) -> list[torch.Tensor]:
        """Every part ``q · s`` ``[rows_j, width]`` float32."""
        return [codes.float() * scales.unsqueeze(1) for codes, scales in zip(self.parts, self.parts_qscale)]

    def _bags(self, ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, mean: bool) -> torch.Tensor:
        self._check_inference()
        parts = self.dequantized()
        return qr_ops.qr_pooled(parts, ids, offsets, weights, self.collisions, self.config.operation, mean,
                                [False] * len(parts))


class Int8TTMemory(_Int8Memory, TTMemory):
    """TT cores as int8 ``cores.<k>`` ``[p, R_in, q, R_out]`` with float32 ``cores_qscale.<k>`` ``[p]`` (one per slice)."""

    def __init__(self, source: TTMemory, block_size: int | None = None) -> None:
        """``block_size`` is not used (one scale per row)."""
        super().__init__(source.config, list(source.tables.values()), device=torch.device("meta"))
        quantized = [quantize_rows(core.reshape(core.shape[0], -1)) for core in source.cores]
        self.cores = nn.ParameterList(_frozen(codes.view(core.shape)) for (codes, _), core in zip(quantized, source.cores))
        self.cores_qscale = nn.ParameterList(_frozen(scales) for _, scales in quantized)
        self._copy_constants(source)

    def dequantized(self) -> list[torch.Tensor]:
        """Every core ``q · s`` float32."""
        return [codes.float() * scales[:, None, None, None] for codes, scales in zip(self.cores, self.cores_qscale)]

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        self._check_inference()
        return tt_ops.tt_rows(self.dequantized(), ids)


INT8_MEMORIES: dict[type[PSSMemory], type[_Int8Memory]] = {
    RobeMemory: Int8RobeMemory,
    QRMemory: Int8QRMemory,
    TTMemory: Int8TTMemory,
}
"""Float memory class -> its int8 version (exact types: an int8 memory is never quantized again)."""


@torch.no_grad()
def quantize_memories_(model: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE) -> nn.Module:
    """In place: every ROBE, QR and TT memory of every ``CompressedEmbeddingBagCollection`` in ``model``
    (``model`` itself may be one) becomes its int8 version (see the module docstring); returns ``model``.

    ``block_size``: elements per scale of ROBE's 1-D memory (QR and TT use one scale per row). The result
    serves only: a forward pass in training mode with gradients enabled raises ``RuntimeError``.
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    collections = [m for m in model.modules() if isinstance(m, CompressedEmbeddingBagCollection)]
    if not collections:
        raise ValueError(f"{type(model).__name__} holds no CompressedEmbeddingBagCollection to quantize")
    for collection in collections:
        for group, memory in list(collection.pss_memories.items()):
            int8 = INT8_MEMORIES.get(type(memory))
            if int8 is not None:
                collection.pss_memories[group] = int8(memory, block_size)
    return model
