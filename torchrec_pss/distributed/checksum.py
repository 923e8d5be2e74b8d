"""Detect replicas that diverged: an exact checksum of every replicated parameter, compared across ranks."""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn


def bit_checksum(tensor: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as int32 words (exact: any changed bit changes it, up to collisions)."""
    raw = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    pad = (-raw.numel()) % 4
    words = torch.cat([raw, raw.new_zeros(pad)]).view(torch.int32)
    return int(words.to(torch.int64).sum().item())


def assert_replicas_identical(
    params: Mapping[str, nn.Parameter], process_group: dist.ProcessGroup | None = None
) -> None:
    """Raise ``RuntimeError`` naming the parameter and the ranks whose replicas differ (every rank calls it)."""
    names = sorted(params)
    local = torch.tensor([bit_checksum(params[n]) for n in names], dtype=torch.int64)
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=process_group)
    for i, name in enumerate(names):
        values = [int(g[i]) for g in gathered]
        if len(set(values)) > 1:
            raise RuntimeError(f"replicated parameter {name!r} differs across ranks: checksums by rank {values}")
