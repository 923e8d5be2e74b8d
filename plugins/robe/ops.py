"""ROBE-Z as ``torch.library`` ops (namespace ``torchrec_pss``), FBGEMM style.

Each op (:func:`~torchrec_pss.kernels.define_op`) has the pure-PyTorch reference of
:mod:`~torchrec_pss_plugins.robe.reference` as its default kernel, a fake kernel (so ``torch.compile`` /
``torch.export`` trace it), a CPU kernel from the C++ extension (:mod:`~torchrec_pss_plugins.robe.cpu_kernels`;
the reference when it cannot be built) and a CUDA kernel in Triton (:mod:`~torchrec_pss_plugins.robe.triton_kernels`;
the reference without Triton).

- ``robe_pooled(memory, ids, offsets, weights, coefficients, keys, dim, chunk_size, use_sign, mean,
  sparse_grad) -> [B, dim]``, differentiable in ``memory`` (dense, or sparse COO when ``sparse_grad``)
  and ``weights``.
- ``robe_pooled_backward(grad, ids, offsets, weights, coefficients, keys, memory_size, chunk_size,
  use_sign, mean) -> [|M|]``, ``robe_sparse_grad(...same...) -> (positions [U], values [U])`` (the touched
  positions, ascending and unique) and ``robe_weights_grad(grad, memory, ids, offsets,
  coefficients, keys, chunk_size, use_sign, mean) -> [N]``.
- ``robe_sgd_update_`` / ``robe_adagrad_update_``: backward fused with the optimizer step, in place.

``keys`` (int64) are the tables' keys ``t``: ``[1]`` when every bag reads one table, ``[B]`` (bag ``b`` reads
table ``keys[b]``) when one call pools the bags of several tables sharing ``M`` — one call per step is what
lets a fused Adagrad see the step's whole gradient of a shared memory.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from torchrec_pss.kernels import define_op, optional_module, register_autograd
from torchrec_pss_plugins.robe import cpu_kernels, reference

_triton = optional_module("torchrec_pss_plugins.robe.triton_kernels")


def _pooled_kernel(kernels: ModuleType, memory: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
                   coefficients: Tensor, keys: Tensor, dim: int, chunk_size: int, use_sign: bool, mean: bool,
                   sparse_grad: bool) -> Tensor:
    return kernels.robe_pooled_forward(memory.contiguous(), ids, offsets, weights, coefficients,
                                       keys, dim, chunk_size, use_sign, mean)


@define_op("robe_pooled", cpu=(cpu_kernels.load, _pooled_kernel), cuda=(_triton, _pooled_kernel))
def robe_pooled(memory: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, coefficients: Tensor,
                keys: Tensor, dim: int, chunk_size: int, use_sign: bool, mean: bool, sparse_grad: bool) -> Tensor:
    return reference.pooled_forward(memory, ids, offsets, weights, coefficients, keys, dim, chunk_size,
                                    use_sign, mean)


@torch.library.register_fake(robe_pooled)
def _robe_pooled_fake(memory: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, coefficients: Tensor,
                      keys: Tensor, dim: int, chunk_size: int, use_sign: bool, mean: bool,
                      sparse_grad: bool) -> Tensor:
    return memory.new_empty(offsets.shape[0] - 1, dim)


def _backward_kernel(kernels: ModuleType, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
                     coefficients: Tensor, keys: Tensor, memory_size: int, chunk_size: int, use_sign: bool,
                     mean: bool) -> Tensor:
    return kernels.robe_pooled_backward(grad, ids, offsets, weights, coefficients, keys,
                                        memory_size, grad.shape[1], chunk_size, use_sign, mean)


@define_op("robe_pooled_backward", cpu=(cpu_kernels.load, _backward_kernel), cuda=(_triton, _backward_kernel))
def robe_pooled_backward(grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, coefficients: Tensor,
                         keys: Tensor, memory_size: int, chunk_size: int, use_sign: bool, mean: bool) -> Tensor:
    return reference.pooled_backward(grad, ids, offsets, weights, coefficients, keys, memory_size, chunk_size,
                                     use_sign, mean)


@torch.library.register_fake(robe_pooled_backward)
def _robe_pooled_backward_fake(grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
                               coefficients: Tensor, keys: Tensor, memory_size: int, chunk_size: int,
                               use_sign: bool, mean: bool) -> Tensor:
    return grad.new_empty(memory_size)


def _sparse_grad_kernel(kernels: ModuleType, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
                        coefficients: Tensor, keys: Tensor, memory_size: int, chunk_size: int, use_sign: bool,
                        mean: bool) -> tuple[Tensor, Tensor]:
    return kernels.robe_sparse_grad(grad, ids, offsets, weights, coefficients, keys, memory_size,
                                    grad.shape[1], chunk_size, use_sign, mean)


@define_op("robe_sparse_grad", cpu=(cpu_kernels.load, _sparse_grad_kernel),
           cuda=(_triton, _sparse_grad_kernel))
def robe_sparse_grad(grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, coefficients: Tensor,
                     keys: Tensor, memory_size: int, chunk_size: int, use_sign: bool,
                     mean: bool) -> tuple[Tensor, Tensor]:
    return reference.sparse_grad(grad, ids, offsets, weights, coefficients, keys, memory_size, chunk_size, use_sign,
                                 mean)


@torch.library.register_fake(robe_sparse_grad)
def _robe_sparse_grad_fake(grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, coefficients: Tensor,
                           keys: Tensor, memory_size: int, chunk_size: int, use_sign: bool,
                           mean: bool) -> tuple[Tensor, Tensor]:
    unique = torch.library.get_ctx().new_dynamic_size()
    return ids.new_empty(unique, dtype=torch.int64), grad.new_empty(unique)


def _weights_grad_cpu(kernels: ModuleType, grad: Tensor, memory: Tensor, ids: Tensor, offsets: Tensor,
                      coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool, mean: bool) -> Tensor:
    return kernels.robe_weights_grad(memory.contiguous(), grad, ids, offsets, coefficients, keys,
                                     chunk_size, use_sign, mean)


def _weights_grad_cuda(kernels: ModuleType, grad: Tensor, memory: Tensor, ids: Tensor, offsets: Tensor,
                       coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool, mean: bool) -> Tensor:
    return kernels.robe_weights_grad(grad, memory.contiguous(), ids, offsets, coefficients, keys,
                                     grad.shape[1], chunk_size, use_sign, mean)


@define_op("robe_weights_grad", cpu=(cpu_kernels.load, _weights_grad_cpu), cuda=(_triton, _weights_grad_cuda))
def robe_weights_grad(grad: Tensor, memory: Tensor, ids: Tensor, offsets: Tensor, coefficients: Tensor,
                      keys: Tensor, chunk_size: int, use_sign: bool, mean: bool) -> Tensor:
    return reference.weights_grad(grad, memory, ids, offsets, coefficients, keys, chunk_size, use_sign, mean)


@torch.library.register_fake(robe_weights_grad)
def _robe_weights_grad_fake(grad: Tensor, memory: Tensor, ids: Tensor, offsets: Tensor, coefficients: Tensor,
                            keys: Tensor, chunk_size: int, use_sign: bool, mean: bool) -> Tensor:
    return grad.new_empty(ids.shape[0])


def _setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
    memory, ids, offsets, weights, coefficients, keys, dim, chunk_size, use_sign, mean, sparse_grad = inputs
    ctx.save_for_backward(memory, ids, offsets, weights, coefficients, keys)
    ctx.layout = (chunk_size, use_sign, mean, sparse_grad)


def _backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple:
    memory, ids, offsets, weights, coefficients, keys = ctx.saved_tensors
    chunk_size, use_sign, mean, sparse_grad = ctx.layout
    memory, weights = memory.detach(), None if weights is None else weights.detach()  # first-order only
    memory_grad = weights_grad = None
    if ctx.needs_input_grad[0]:
        if sparse_grad:
            positions, values = robe_sparse_grad(grad, ids, offsets, weights, coefficients, keys, memory.numel(),
                                                 chunk_size, use_sign, mean)
            memory_grad = torch.sparse_coo_tensor(positions.unsqueeze(0), values, memory.shape, is_coalesced=True,
                                                  check_invariants=False)
        else:
            memory_grad = robe_pooled_backward(grad, ids, offsets, weights, coefficients, keys, memory.numel(),
                                               chunk_size, use_sign, mean)
    if ctx.needs_input_grad[3]:
        weights_grad = robe_weights_grad(grad, memory, ids, offsets, coefficients, keys, chunk_size, use_sign,
                                         mean).to(weights.dtype)
    return memory_grad, None, None, weights_grad, None, None, None, None, None, None, None


register_autograd(robe_pooled, _backward, _setup_context)


def _sgd_cpu(kernels: ModuleType, memory: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor,
             weights: Tensor | None, coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool,
             mean: bool, lr: float) -> None:
    kernels.robe_sgd_update_(memory, grad, ids, offsets, weights, coefficients, keys, chunk_size, use_sign, mean, lr)


def _sgd_cuda(kernels: ModuleType, memory: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor,
              weights: Tensor | None, coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool,
              mean: bool, lr: float) -> None:
    kernels.robe_sgd_update_(memory, grad, ids, offsets, weights, coefficients, keys,
                             grad.shape[1], chunk_size, use_sign, mean, lr)


@define_op("robe_sgd_update_", mutates_args=("memory",), cpu=(cpu_kernels.load, _sgd_cpu),
           cuda=(_triton, _sgd_cuda))
def robe_sgd_update_(memory: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
                     coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool, mean: bool,
                     lr: float) -> None:
    reference.sgd_update_(memory, grad, ids, offsets, weights, coefficients, keys, chunk_size, use_sign, mean, lr)


@torch.library.register_fake(robe_sgd_update_)
def _robe_sgd_update_fake(memory: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
                          coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool, mean: bool,
                          lr: float) -> None:
    return None


def _adagrad_cpu(kernels: ModuleType, memory: Tensor, accumulator: Tensor, grad: Tensor, ids: Tensor,
                 offsets: Tensor, weights: Tensor | None, coefficients: Tensor, keys: Tensor, chunk_size: int,
                 use_sign: bool, mean: bool, lr: float, eps: float, block_size: int) -> None:
    kernels.robe_adagrad_update_(memory, accumulator, grad, ids, offsets, weights, coefficients,
                                 keys, chunk_size, use_sign, mean, lr, eps, block_size)


def _adagrad_cuda(kernels: ModuleType, memory: Tensor, accumulator: Tensor, grad: Tensor, ids: Tensor,
                  offsets: Tensor, weights: Tensor | None, coefficients: Tensor, keys: Tensor, chunk_size: int,
                  use_sign: bool, mean: bool, lr: float, eps: float, block_size: int) -> None:
    dense = kernels.robe_pooled_backward(grad, ids, offsets, weights, coefficients, keys,
                                         memory.numel(), grad.shape[1], chunk_size, use_sign, mean)
    kernels.blockwise_adagrad_update_(memory, accumulator, dense, lr, eps, block_size)


@define_op("robe_adagrad_update_", mutates_args=("memory", "accumulator"), cpu=(cpu_kernels.load, _adagrad_cpu),
           cuda=(_triton, _adagrad_cuda))
def robe_adagrad_update_(memory: Tensor, accumulator: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor,
                         weights: Tensor | None, coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool,
                         mean: bool, lr: float, eps: float, block_size: int) -> None:
    reference.adagrad_update_(memory, accumulator, grad, ids, offsets, weights, coefficients, keys, chunk_size,
                              use_sign, mean, lr, eps, block_size)


@torch.library.register_fake(robe_adagrad_update_)
def _robe_adagrad_update_fake(memory: Tensor, accumulator: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor,
                              weights: Tensor | None, coefficients: Tensor, keys: Tensor, chunk_size: int,
                              use_sign: bool, mean: bool, lr: float, eps: float, block_size: int) -> None:
    return None
