"""Inference-only int8 memories: ``quantize_memories_(model)`` turns trained ROBE, QR and TT memories into int8.

Each method provides its int8 memory through ``PSSMemory.quantized`` (``plugins/<method>/int8.py``,
built on :class:`Int8Memory` and the helpers here). Symmetric quantization, no zero point: a group of values
``w`` is stored as ``q = round(w / s)`` in int8 (``[-127, 127]``) with one float32 scale ``s = max|w| / 127``,
and read back as ``q · s``; every value is off by at most ``s / 2``. Trained memories are centred on 0 (ROBE's
signs make them so), so a zero point would buy little, and without one 0 stays exact and nothing else is
stored. Groups:

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


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """``tensor`` as a parameter without gradients (int8 codes and their scales)."""
    return nn.Parameter(tensor, requires_grad=False)


class Int8Memory(PSSMemory):
    """What the methods' int8 memories share (listed first among their bases): a forward that refuses
    training, no re-initialisation, bytes of every tensor, and no second quantization.
    """

    def quantized(self, block_size: int) -> None:
        """Already int8."""
        return None

    def copy_constants(self, source: PSSMemory) -> None:
        """The source memory's recovery constants (buffers) and mode."""
        for name, buffer in source.named_buffers(recurse=False):
            setattr(self, name, buffer.detach().clone())
        self.train(source.training)

    def reset_parameters(self) -> None:
        """Nothing to draw: an int8 memory holds trained values (load a state_dict to change them)."""

    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in itertools.chain(self.parameters(), self.buffers()))

    def check_inference(self) -> None:
        """``RuntimeError`` in training mode with gradients enabled."""
        if self.training and torch.is_grad_enabled():
            raise RuntimeError(
                f"{type(self).__name__} is inference-only (int8 memories take no gradients): call model.eval() or "
                "run under torch.no_grad() / torch.inference_mode(); train the float32 module, then quantize it"
            )


@torch.no_grad()
def quantize_memories_(model: nn.Module, block_size: int = DEFAULT_BLOCK_SIZE) -> nn.Module:
    """In place: every memory of every ``CompressedEmbeddingBagCollection`` in ``model`` (``model`` itself may
    be one) whose method has an int8 version (``PSSMemory.quantized``: ROBE, QR and TT) becomes it (see the
    module docstring); returns ``model``.

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
            int8 = memory.quantized(block_size)
            if int8 is not None:
                collection.pss_memories[group] = int8
    return model
