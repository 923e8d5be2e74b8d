"""QR as ``torch.library`` ops (namespace ``torchrec_pss``; :func:`~torchrec_pss.kernels.define_op`):
compose + pool.

``qr_pooled(parts, ids, offsets, weights, collisions, operation, mean, sparse_grads) -> [B, d]``,
differentiable in every part (dense, or sparse COO for part ``j`` when ``sparse_grads[j]``) and in
``weights``; ``qr_pooled_backward`` gives the dense part gradients, ``qr_grad_rows`` every part's gradient over
the rows the batch reads (``(rows, values)``: lists of ``[U_j]`` and ``[U_j, width]``, the sparse gradients and,
beside them, dense ones) and ``qr_weights_grad`` the gradient of the per-sample weights ``[N]``. Default kernels:
the reference (:mod:`~torchrec_pss_plugins.qr.reference`); CPU: the C++ extension
(:mod:`~torchrec_pss_plugins.qr.cpu_kernels`; the reference when it cannot be built); CUDA: Triton
(:mod:`~torchrec_pss_plugins.qr.triton_kernels`); fake kernels for ``torch.compile`` / ``torch.export``.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from torchrec_pss.kernels import define_op, optional_module, register_autograd
from torchrec_pss_plugins.qr import cpu_kernels, reference

_triton = optional_module("torchrec_pss_plugins.qr.triton_kernels")


def _pooled_kernel(kernels: ModuleType, parts: list[Tensor], ids: Tensor, offsets: Tensor, weights: Tensor | None,
                   collisions: int, operation: str, mean: bool, sparse_grads: list[bool]) -> Tensor:
    return kernels.qr_pooled_forward(parts, ids, offsets, weights, collisions, operation, mean)


@define_op("qr_pooled", cpu=(cpu_kernels.load, _pooled_kernel), cuda=(_triton, _pooled_kernel))
def qr_pooled(parts: list[Tensor], ids: Tensor, offsets: Tensor, weights: Tensor | None, collisions: int,
              operation: str, mean: bool, sparse_grads: list[bool]) -> Tensor:
    return reference.pooled_forward(parts, ids, offsets, weights, collisions, operation, mean)


@torch.library.register_fake(qr_pooled)
def _qr_pooled_fake(parts: list[Tensor], ids: Tensor, offsets: Tensor, weights: Tensor | None, collisions: int,
                    operation: str, mean: bool, sparse_grads: list[bool]) -> Tensor:
    width = parts[0].shape[1]
    return parts[0].new_empty(offsets.shape[0] - 1, width * len(parts) if operation == "concat" else width)


def _backward_kernel(kernels: ModuleType, grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor,
                     weights: Tensor | None, collisions: int, operation: str, mean: bool) -> list[Tensor]:
    return kernels.qr_pooled_backward(grad, parts, ids, offsets, weights, collisions, operation, mean)


@define_op("qr_pooled_backward", cpu=(cpu_kernels.load, _backward_kernel), cuda=(_triton, _backward_kernel))
def qr_pooled_backward(grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor, weights: Tensor | None,
                       collisions: int, operation: str, mean: bool) -> list[Tensor]:
    return reference.pooled_backward(grad, parts, ids, offsets, weights, collisions, operation, mean)


@torch.library.register_fake(qr_pooled_backward)
def _qr_pooled_backward_fake(grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor,
                             weights: Tensor | None, collisions: int, operation: str, mean: bool) -> list[Tensor]:
    return [part.new_empty(part.shape) for part in parts]


def _grad_rows_kernel(kernels: ModuleType, grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor,
                      weights: Tensor | None, collisions: int, operation: str,
                      mean: bool) -> tuple[list[Tensor], list[Tensor]]:
    return kernels.qr_grad_rows(grad, parts, ids, offsets, weights, collisions, operation, mean)


@define_op("qr_grad_rows", cpu=(cpu_kernels.load, _grad_rows_kernel), cuda=(_triton, _grad_rows_kernel))
def qr_grad_rows(grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor, weights: Tensor | None,
                 collisions: int, operation: str, mean: bool) -> tuple[list[Tensor], list[Tensor]]:
    return reference.grad_rows(grad, parts, ids, offsets, weights, collisions, operation, mean)


@torch.library.register_fake(qr_grad_rows)
def _qr_grad_rows_fake(grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor, weights: Tensor | None,
                       collisions: int, operation: str, mean: bool) -> tuple[list[Tensor], list[Tensor]]:
    ctx = torch.library.get_ctx()
    unique = [ctx.new_dynamic_size() for _ in parts]
    return ([ids.new_empty(u, dtype=torch.int64) for u in unique],
            [grad.new_empty(u, part.shape[1]) for u, part in zip(unique, parts, strict=True)])


def _weights_grad_kernel(kernels: ModuleType, grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor,
                         collisions: int, operation: str, mean: bool) -> Tensor:
    return kernels.qr_weights_grad(grad, parts, ids, offsets, collisions, operation, mean)


@define_op("qr_weights_grad", cpu=(cpu_kernels.load, _weights_grad_kernel), cuda=(_triton, _weights_grad_kernel))
def qr_weights_grad(grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor, collisions: int, operation: str,
                    mean: bool) -> Tensor:
    return reference.weights_grad(grad, parts, ids, offsets, collisions, operation, mean)


@torch.library.register_fake(qr_weights_grad)
def _qr_weights_grad_fake(grad: Tensor, parts: list[Tensor], ids: Tensor, offsets: Tensor, collisions: int,
                          operation: str, mean: bool) -> Tensor:
    return grad.new_empty(ids.shape[0])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    parts, ids, offsets, weights, collisions, operation, mean, sparse_grads = inputs
    ctx.num_parts = len(parts)
    ctx.save_for_backward(ids, offsets, weights, *parts)
    ctx.layout = (collisions, operation, mean, list(sparse_grads))


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    ids, offsets, weights, *parts = ctx.saved_tensors
    collisions, operation, mean, sparse_grads = ctx.layout
    parts = [part.detach() for part in parts]
    weights = None if weights is None else weights.detach()
    part_grads = None
    if ctx.needs_input_grad[0]:
        if any(sparse_grads):
            rows, values = qr_grad_rows(grad, parts, ids, offsets, weights, collisions, operation, mean)
            part_grads = [_part_grad(part, part_rows, part_values, sparse) for part, part_rows, part_values, sparse
                          in zip(parts, rows, values, sparse_grads, strict=True)]
        else:
            part_grads = qr_pooled_backward(grad, parts, ids, offsets, weights, collisions, operation, mean)
    weights_grad = None
    if ctx.needs_input_grad[3]:
        weights_grad = qr_weights_grad(grad, parts, ids, offsets, collisions, operation, mean).to(weights.dtype)
    return part_grads, None, None, weights_grad, None, None, None, None


def _part_grad(part: Tensor, rows: Tensor, values: Tensor, sparse: bool) -> Tensor:
    """A part's gradient from its ``qr_grad_rows`` entry: sparse COO (coalesced) or dense."""
    if sparse:
        return torch.sparse_coo_tensor(rows.unsqueeze(0), values, part.shape, is_coalesced=True, check_invariants=False)
    return values.new_zeros(part.shape).index_copy_(0, rows, values)


register_autograd(qr_pooled, _backward, _setup_context)
