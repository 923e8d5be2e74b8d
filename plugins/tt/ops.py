"""TT row reconstruction as ``torch.library`` ops (namespace ``torchrec_pss``;
:func:`~torchrec_pss.kernels.define_op`).

Each op has a pure-PyTorch reference as its default kernel (:mod:`~torchrec_pss_plugins.tt.reference`), a
fake kernel (so ``torch.compile`` / ``torch.export`` trace it) and a CPU kernel from the C++ extension
(:mod:`~torchrec_pss_plugins.tt.cpu_kernels`; the reference when it cannot be built).

- ``tt_rows(cores, ids) -> [U, d]``, differentiable in ``cores`` through ``tt_rows_backward``.
- ``tt_rows_backward(grad, cores, ids) -> list[Tensor]``: the dense gradients of the cores (their shapes) for
  the gradient ``grad`` ``[U, d]`` of the rows; its reference differentiates ``reference.rows``'s chain of
  batched products.

Both CUDA kernels are in Triton (:mod:`~torchrec_pss_plugins.tt.triton_kernels`; the references without Triton).
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from torchrec_pss.kernels import define_op, optional_module, register_autograd
from torchrec_pss_plugins.tt import cpu_kernels, reference

_triton = optional_module("torchrec_pss_plugins.tt.triton_kernels")


def _rows_cpu(kernels: ModuleType, cores: list[Tensor], ids: Tensor) -> Tensor:
    return kernels.tt_rows_forward(cores, ids)


def _rows_cuda(kernels: ModuleType, cores: list[Tensor], ids: Tensor) -> Tensor:
    return kernels.tt_rows(cores, ids)


@define_op("tt_rows", cpu=(cpu_kernels.load, _rows_cpu), cuda=(_triton, _rows_cuda))
def tt_rows(cores: list[Tensor], ids: Tensor) -> Tensor:
    return reference.rows(cores, ids)


@torch.library.register_fake(tt_rows)
def _tt_rows_fake(cores: list[Tensor], ids: Tensor) -> Tensor:
    return cores[0].new_empty(ids.shape[0], math.prod(core.shape[2] for core in cores))


def _backward_cpu(kernels: ModuleType, grad: Tensor, cores: list[Tensor], ids: Tensor) -> list[Tensor]:
    return kernels.tt_rows_backward(grad, cores, ids)


def _backward_cuda(kernels: ModuleType, grad: Tensor, cores: list[Tensor], ids: Tensor) -> list[Tensor]:
    return kernels.tt_rows_backward(grad, cores, ids)


@define_op("tt_rows_backward", cpu=(cpu_kernels.load, _backward_cpu), cuda=(_triton, _backward_cuda))
def tt_rows_backward(grad: Tensor, cores: list[Tensor], ids: Tensor) -> list[Tensor]:
    return reference.rows_backward(grad, cores, ids)


@torch.library.register_fake(tt_rows_backward)
def _tt_rows_backward_fake(grad: Tensor, cores: list[Tensor], ids: Tensor) -> list[Tensor]:
    return [core.new_empty(core.shape) for core in cores]


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    cores, ids = inputs
    ctx.save_for_backward(ids, *cores)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    ids, *cores = ctx.saved_tensors
    return tt_rows_backward(grad, [core.detach() for core in cores], ids), None  # first-order only


register_autograd(tt_rows, _backward, _setup_context)
