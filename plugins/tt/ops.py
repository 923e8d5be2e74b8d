"""TT row reconstruction as ``torch.library`` ops (namespace ``torchrec_pss``;
:func:`~torchrec_pss.kernels.define_op`).

Each op has a pure-PyTorch reference as its default kernel (:mod:`~torchrec_pss_plugins.tt.reference`), a
fake kernel (so ``torch.compile`` / ``torch.export`` trace it) and a CPU kernel from the C++ extension
(:mod:`~torchrec_pss_plugins.tt.cpu_kernels`; the reference when it cannot be built).

- ``tt_rows(cores, ids) -> [U, d]``, differentiable in ``cores`` through ``tt_rows_backward``.
- ``tt_rows_backward(grad, cores, ids) -> list[Tensor]``: the dense gradients of the cores (their shapes) for
  the gradient ``grad`` ``[U, d]`` of the rows; its reference differentiates ``reference.rows``'s chain of
  batched products.
- ``tt_pooled(cores, ids, offsets, scales) -> [B, d]``: the rows pooled into bags (``offsets`` ``[B + 1]``), each
  times its scale (``scales`` ``[N]``: weight, / bag length for MEAN; None for ones), differentiable in
  ``cores`` (``tt_pooled_backward``) and ``scales``; its CPU kernel adds each row into its bag as it is
  contracted (or, with about one id per bag, sums the bags from an ``[N, d]`` block of rows) and never forms the
  rows' gradient.
- ``tt_pooled_backward(grad, cores, ids, offsets, scales) -> list[Tensor]``: the cores' gradients for ``grad``
  ``[B, d]``.

The CUDA kernels are in Triton (:mod:`~torchrec_pss_plugins.tt.triton_kernels`; the references without Triton);
on CUDA the pooled ops pool the Triton rows (and spread the bags' gradients over them) with torch ops.
"""

from __future__ import annotations

import math
from types import ModuleType

import torch
from torch import Tensor

from torchrec_pss.kernels import define_op, optional_module, register_autograd
from torchrec_pss.pooling import offsets_to_bag_index
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


def _pooled_cpu(kernels: ModuleType, cores: list[Tensor], ids: Tensor, offsets: Tensor,
                scales: Tensor | None) -> Tensor:
    return kernels.tt_pooled_forward(cores, ids, offsets, scales)


def _pooled_cuda(kernels: ModuleType, cores: list[Tensor], ids: Tensor, offsets: Tensor,
                 scales: Tensor | None) -> Tensor:
    return reference.pooled(cores, ids, offsets, scales, kernels.tt_rows)


@define_op("tt_pooled", cpu=(cpu_kernels.load, _pooled_cpu), cuda=(_triton, _pooled_cuda))
def tt_pooled(cores: list[Tensor], ids: Tensor, offsets: Tensor, scales: Tensor | None) -> Tensor:
    return reference.pooled(cores, ids, offsets, scales)


@torch.library.register_fake(tt_pooled)
def _tt_pooled_fake(cores: list[Tensor], ids: Tensor, offsets: Tensor, scales: Tensor | None) -> Tensor:
    return cores[0].new_empty(offsets.shape[0] - 1, math.prod(core.shape[2] for core in cores))


def _pooled_backward_cpu(kernels: ModuleType, grad: Tensor, cores: list[Tensor], ids: Tensor, offsets: Tensor,
                         scales: Tensor | None) -> list[Tensor]:
    return kernels.tt_pooled_backward(grad, cores, ids, offsets, scales)


def _pooled_backward_cuda(kernels: ModuleType, grad: Tensor, cores: list[Tensor], ids: Tensor, offsets: Tensor,
                          scales: Tensor | None) -> list[Tensor]:
    return reference.pooled_backward(grad, cores, ids, offsets, scales, kernels.tt_rows_backward)


@define_op("tt_pooled_backward", cpu=(cpu_kernels.load, _pooled_backward_cpu),
           cuda=(_triton, _pooled_backward_cuda))
def tt_pooled_backward(grad: Tensor, cores: list[Tensor], ids: Tensor, offsets: Tensor,
                       scales: Tensor | None) -> list[Tensor]:
    return reference.pooled_backward(grad, cores, ids, offsets, scales)


@torch.library.register_fake(tt_pooled_backward)
def _tt_pooled_backward_fake(grad: Tensor, cores: list[Tensor], ids: Tensor, offsets: Tensor,
                             scales: Tensor | None) -> list[Tensor]:
    return [core.new_empty(core.shape) for core in cores]


def _pooled_setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    cores, ids, offsets, scales = inputs
    ctx.save_for_backward(ids, offsets, scales, *cores)


def _pooled_backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    """The cores' gradients by ``tt_pooled_backward``; a scale's is its row dotted with its bag's gradient."""
    ids, offsets, scales, *cores = ctx.saved_tensors
    cores = [core.detach() for core in cores]  # first-order only
    scales = None if scales is None else scales.detach()
    core_grads = scales_grad = None
    if ctx.needs_input_grad[0]:
        core_grads = tt_pooled_backward(grad, cores, ids, offsets, scales)
    if ctx.needs_input_grad[3]:
        bag_grads = grad.index_select(0, offsets_to_bag_index(offsets, ids.numel()))
        scales_grad = (tt_rows(cores, ids) * bag_grads).sum(1).to(scales.dtype)
    return core_grads, None, None, scales_grad


register_autograd(tt_pooled, _pooled_backward, _pooled_setup_context)
