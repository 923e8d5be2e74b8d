"""Input checks of the Triton kernels' wrappers that run with the kernels, without a host synchronisation.

A bad id or offset would make a Triton kernel read or write outside its tensors. The wrappers therefore assert
their bags with ``torch._assert_async``: on CUDA a failed check is a device-side assert, as for an out-of-range
index of ``torch.nn.functional.embedding``; on CPU tensors (the Triton interpreter) it raises ``RuntimeError``
with the message at once. The modules check their inputs before they call the ops (naming the table, feature,
bag and value; inside a traced graph with :func:`assert_ids_below` too); these checks guard direct calls of the ops.
"""

from __future__ import annotations

import torch

INT64_MAX = torch.iinfo(torch.int64).max


def assert_ids_below(ids: torch.Tensor, limit: int, op: str) -> None:
    """Asserts ``0 <= ids < limit`` (``ids`` integer ``[N]``; a ``limit`` above the int64 range checks ``>= 0``).
    Also inside a traced graph (``torch.compile``, ``torch.export``): no branch on ``ids``' values or size."""
    bad = ids < 0 if limit > INT64_MAX else (ids < 0) | (ids >= limit)
    torch._assert_async(~bad.any(), f"{op}: an id is outside [0, {limit})")


def assert_offsets(ids: torch.Tensor, offsets: torch.Tensor, op: str) -> None:
    """Asserts that ``offsets`` ``[B + 1]`` run from 0 to ``N = ids.numel()`` without decreasing."""
    ends = (offsets[0] == 0) & (offsets[-1] == ids.numel())
    torch._assert_async(ends & (offsets.diff() >= 0).all(),
                        f"{op}: offsets must run from 0 to the number of ids ({ids.numel()}) without decreasing")
