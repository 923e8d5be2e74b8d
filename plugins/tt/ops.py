"""TT row reconstruction as a ``torch.library`` custom op (namespace ``torchrec_pss``).

``tt_rows(cores, ids) -> [U, d]``: default kernel the reference (:mod:`~torchrec_pss_plugins.tt.reference`),
CUDA kernel in Triton (:mod:`~torchrec_pss_plugins.tt.triton_kernels`), a fake kernel for
``torch.compile`` / ``torch.export``. Its backward recomputes the reference under autograd, so
``TTMemory`` calls the reference directly when it trains and this op when it serves.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from torchrec_pss.kernels import optional_module, register_device_kernels
from torchrec_pss_plugins.tt import reference

_triton = optional_module("torchrec_pss_plugins.tt.triton_kernels")


@torch.library.custom_op("torchrec_pss::tt_rows", mutates_args=())
def tt_rows(cores: list[Tensor], ids: Tensor) -> Tensor:
    return reference.rows(cores, ids)


def _rows_cuda(kernels: ModuleType, cores: list[Tensor], ids: Tensor) -> Tensor:
    return kernels.tt_rows(cores, ids)


register_device_kernels(tt_rows, reference.rows, cuda=(_triton, _rows_cuda))


@tt_rows.register_fake
def _tt_rows_fake(cores: list[Tensor], ids: Tensor) -> Tensor:
    return cores[0].new_empty(ids.shape[0], math.prod(core.shape[2] for core in cores))


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    cores, ids = inputs
    ctx.save_for_backward(ids, *cores)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    ids, *cores = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [core.detach().requires_grad_(True) for core in cores]
        grads = torch.autograd.grad(reference.rows(leaves, ids), leaves, grad)
    return list(grads), None


tt_rows.register_autograd(_backward, setup_context=_setup_context)
