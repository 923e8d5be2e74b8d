"""``torchrec_pss.triton_launcher.Launcher``: the cached launch gives what ``kernel[grid]`` gives.

Without CUDA the kernel runs in the Triton interpreter (every call takes ``kernel[grid]``); with CUDA the
second call of a kind launches the cached ``CompiledKernel`` directly, so the CUDA runs check that a change
of any specialized property (pointer alignment, an integer equal to 1 or a multiple of 16, a None pointer)
compiles anew instead of reusing a kernel built for another kind.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from torchrec_pss.triton_launcher import Launcher, _kind  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@triton.jit
def _affine_kernel(x, bias, out, n, stride, scale, BLOCK: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``out[i] = scale * x[i * stride] (+ bias[i])`` for ``i < n``."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    value = scale * tl.load(x + i * stride, mask=mask, other=0.0)
    if HAS_BIAS:
        value += tl.load(bias + i, mask=mask, other=0.0)
    tl.store(out + i, value, mask=mask)


def test_kind_separates_what_triton_specializes() -> None:
    base = torch.zeros(8)
    assert _kind(base) != _kind(base[1:])  # 16-byte alignment of the pointer
    assert _kind(base) != _kind(base.double())
    assert len({_kind(v) for v in (1, 2, 16, 2**31, 2**63)}) == 5  # == 1, plain, % 16, 64-bit, unsigned 64-bit
    assert _kind(True) != _kind(None) != _kind(1.0)
    with pytest.raises(TypeError, match="unsupported"):
        _kind((base,))


def test_cached_launches_match_torch_across_kinds() -> None:
    launcher = Launcher(_affine_kernel)
    source = torch.randn(1100, device=DEVICE)
    bias = torch.randn(64, device=DEVICE)
    cases = [  # (offset of x, stride, bias, scale): the first five and the last are new kinds, the rest repeats
        (0, 1, None, 2.0),
        (0, 2, None, 2.0),
        (1, 1, None, 0.5),  # x 4 bytes off 16-byte alignment
        (0, 1, bias, 3.0),
        (0, 3, bias, 1.5),
        (0, 1, None, -1.0),
        (1, 1, None, 4.0),
        (0, 2, None, 0.25),
        (0, 16, None, 2.0),
    ]
    for offset, stride, b, scale in cases:
        x = source[offset:]
        out = torch.full((64,), float("nan"), device=DEVICE)
        launcher((triton.cdiv(64, 32),), x, b, out, 64, stride, scale, BLOCK=32, HAS_BIAS=b is not None, num_warps=1)
        expected = scale * x[: 64 * stride : stride] + (0 if b is None else b)
        torch.testing.assert_close(out, expected)
    if DEVICE == "cuda":
        assert len(launcher._compiled) == 6
