"""Pure-PyTorch reference of TT row reconstruction (any device).

Core ``k`` is ``[p_k, R_{k-1}, q_k, R_k]`` (``R_0 = R_N = 1``); id ``x`` has mixed-radix digits
``(i_1, ..., i_N)`` over ``(p_1, ..., p_N)`` (the first digit unreduced), and its row
``[d = ∏ q_k]`` is the product of the slices ``core_k[i_k]``.
"""

from __future__ import annotations

import torch


def rows(cores: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows ``[U, d]`` of ``ids`` ``[U]`` by batched contraction of the cores' slices."""
    digits, rest = [], ids
    for core in reversed(cores[1:]):
        digits.append(torch.remainder(rest, core.shape[0]))
        rest = torch.div(rest, core.shape[0], rounding_mode="floor")
    digits.append(rest)
    digits.reverse()
    u = ids.numel()
    first, *rest_cores = cores
    out = first.index_select(0, digits[0]).reshape(u, first.shape[2], first.shape[3])
    width = first.shape[2]
    for core, digit in zip(rest_cores, digits[1:]):
        _, r_in, q, r_out = core.shape
        out = torch.bmm(out, core.index_select(0, digit).reshape(u, r_in, q * r_out))
        width *= q
        out = out.reshape(u, width, r_out)
    return out.reshape(u, width)
