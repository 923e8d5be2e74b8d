"""Pure-PyTorch reference of TT row reconstruction (any device).

Core ``k`` is ``[p_k, R_{k-1}, q_k, R_k]`` (``R_0 = R_N = 1``); id ``x`` has mixed-radix digits
``(i_1, ..., i_N)`` over ``(p_1, ..., p_N)`` (the first digit unreduced), and its row
``[d = ∏ q_k]`` is the product of the slices ``core_k[i_k]``.
"""

from __future__ import annotations

import math

import torch


def rows(cores: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows ``[U, d]`` of ``ids`` ``[U]`` by batched contraction of the cores' slices."""
    width = math.prod(core.shape[2] for core in cores)
    return left_products(cores, digits(cores, ids))[-1].reshape(ids.numel(), width)


def left_products(cores: list[torch.Tensor], digit_list: list[torch.Tensor]) -> list[torch.Tensor]:
    """``L_k = G_1[i_1] ··· G_k[i_k]`` as ``[U, q_1···q_k, R_k]`` for every ``k`` (``digit_list``: one ``[U]`` per core)."""
    u = digit_list[0].numel()
    first = cores[0]
    out = [first.index_select(0, digit_list[0]).reshape(u, first.shape[2], first.shape[3])]
    for core, digit in zip(cores[1:], digit_list[1:]):
        _, r_in, q, r_out = core.shape
        product = torch.bmm(out[-1], core.index_select(0, digit).reshape(u, r_in, q * r_out))
        out.append(product.reshape(u, out[-1].shape[1] * q, r_out))
    return out


def digits(cores: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
    """The mixed-radix digits ``[U]`` of ``ids`` over the cores' ``p`` (the first one unreduced)."""
    out, rest = [], ids
    for core in reversed(cores[1:]):
        out.append(torch.remainder(rest, core.shape[0]))
        rest = torch.div(rest, core.shape[0], rounding_mode="floor")
    return [rest, *reversed(out)]


def rows_backward(grad: torch.Tensor, cores: list[torch.Tensor], ids: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the cores: :func:`rows`'s chain of batched products differentiated by hand (the op's
    kernels run below autograd). With the left products ``L_k = G_1[i_1] ··· G_k[i_k]`` ``[U, q_1···q_k, R_k]``
    and ``dL_N = grad``: ``dG_k[i_k] += L_{k-1}ᵀ dL_k`` and ``dL_{k-1} = dL_k G_k[i_k]ᵀ``."""
    u = ids.numel()
    digit_list = digits(cores, ids)
    left = left_products(cores[:-1], digit_list[:-1])
    grads = [torch.zeros_like(core) for core in cores]
    d_left = grad
    for k in range(len(cores) - 1, 0, -1):
        _, r_in, q, r_out = cores[k].shape
        d_left = d_left.reshape(u, left[k - 1].shape[1], q * r_out)
        slices = cores[k].index_select(0, digit_list[k]).reshape(u, r_in, q * r_out)
        grads[k].index_add_(0, digit_list[k], torch.bmm(left[k - 1].transpose(1, 2), d_left).reshape(u, *cores[k].shape[1:]))
        d_left = torch.bmm(d_left, slices.transpose(1, 2))
    grads[0].index_add_(0, digit_list[0], d_left.reshape(u, *cores[0].shape[1:]))
    return grads
