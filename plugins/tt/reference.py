"""Pure-PyTorch reference of TT row reconstruction (any device).

Core ``k`` is ``[p_k, R_{k-1}, q_k, R_k]`` (``R_0 = R_N = 1``); id ``x`` has mixed-radix digits
``(i_1, ..., i_N)`` over ``(p_1, ..., p_N)`` (the first digit unreduced), and its row
``[d = ∏ q_k]`` is the product of the slices ``core_k[i_k]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from torchrec_pss.pooling import offsets_to_bag_index


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
    grads = [core.new_zeros(core.shape) for core in cores]
    d_left = grad
    for k in range(len(cores) - 1, 0, -1):
        _, r_in, q, r_out = cores[k].shape
        d_left = d_left.reshape(u, left[k - 1].shape[1], q * r_out)
        slices = cores[k].index_select(0, digit_list[k]).reshape(u, r_in, q * r_out)
        grads[k].index_add_(0, digit_list[k], torch.bmm(left[k - 1].transpose(1, 2), d_left).reshape(u, *cores[k].shape[1:]))
        d_left = torch.bmm(d_left, slices.transpose(1, 2))
    grads[0].index_add_(0, digit_list[0], d_left.reshape(u, *cores[0].shape[1:]))
    return grads


def pooled(cores: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor | None,
           rows_of: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] = rows) -> torch.Tensor:
    """Bags ``[B, d]`` (``offsets`` ``[B + 1]``): ``out[b] = Σ_j scales_j · row(ids_j)`` over the ids of bag ``b``
    (``scales`` ``[N]`` or None for ones), the rows by ``rows_of`` (default :func:`rows`)."""
    embeddings = rows_of(cores, ids)
    if scales is not None:
        embeddings = embeddings * scales.to(embeddings.dtype).unsqueeze(1)
    out = embeddings.new_zeros(offsets.numel() - 1, embeddings.shape[1])
    return out.index_add_(0, offsets_to_bag_index(offsets, ids.numel()), embeddings)


def pooled_backward(grad: torch.Tensor, cores: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor,
                    scales: torch.Tensor | None,
                    rows_backward_of: Callable[..., list[torch.Tensor]] = rows_backward) -> list[torch.Tensor]:
    """Gradients of the cores for the gradient ``grad`` ``[B, d]`` of :func:`pooled`: each id's row gets
    ``scales_j · grad[bag_j]``, passed to ``rows_backward_of`` (default :func:`rows_backward`)."""
    row_grads = grad.index_select(0, offsets_to_bag_index(offsets, ids.numel()))
    if scales is not None:
        row_grads = row_grads * scales.to(grad.dtype).unsqueeze(1)
    return rows_backward_of(row_grads, cores, ids)
