"""Gradient averaging for memories replicated on every rank (data parallel), inside backward.

Every replicated parameter reports its local gradient when backward has accumulated it; one callback
queued at the end of backward then, on every rank in the same order:

1. agrees on each gradient's layout (one small all-reduce): sparse only where it is sparse on every
   rank that has a gradient — so all ranks run the same collectives and the same update path;
2. averages all dense gradients in ONE bucketed all-reduce, and each sparse gradient with an
   all-gather of its (row, value) pairs, coalesced in rank order;
3. applies the fused update (when the parameter has one) or leaves the average in ``.grad``.

A parameter unused on a rank contributes zeros, so no rank waits on a collective another skips.
Results are identical on every rank, so replicas stay bit-identical.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torchrec.optim.fused import FusedOptimizerModule

from torchrec_pss.optim.fused import PSSFusedOptimizer
from torchrec_pss.optim.fused_update import FusedUpdate


class ReplicatedGradientSync:
    """Average the gradients of ``params`` (name -> replicated parameter) across ``process_group``.

    Parameters with an entry in ``updates`` get their fused update after the average; the others
    get the averaged gradient in ``.grad`` for an ordinary optimizer.
    """

    def __init__(
        self,
        params: Mapping[str, nn.Parameter],
        updates: Mapping[str, FusedUpdate],
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.params = dict(sorted(params.items()))
        self.updates = dict(updates)
        self.process_group = process_group
        self._pending: dict[str, torch.Tensor] = {}
        self._queued = False
        for name, param in self.params.items():
            if name in self.updates:
                self.updates[name].deferred_to = self._collect_fused
            param.register_post_accumulate_grad_hook(self._hook(name))

    def _hook(self, name: str):
        """Collects the accumulated gradient (a fused update's torch hook may already have taken it)."""

        def hook(param: nn.Parameter) -> None:
            if param.grad is not None:
                self._collect(name, param.grad)

        return hook

    def _collect_fused(self, update: FusedUpdate, grad: torch.Tensor) -> None:
        self._collect(update.name, grad)

    def _collect(self, name: str, grad: torch.Tensor) -> None:
        self._pending[name] = grad
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._sync)

    @torch.no_grad()
    def _sync(self) -> None:
        self._queued = False
        pending, self._pending = self._pending, {}
        world = dist.get_world_size(self.process_group)
        names = list(self.params)
        local_sparse = torch.tensor(
            [1 if name not in pending or pending[name].is_sparse else 0 for name in names], dtype=torch.int32
        )
        dist.all_reduce(local_sparse, op=dist.ReduceOp.MIN, group=self.process_group)
        sparse = {name for name, flag in zip(names, local_sparse.tolist()) if flag}
        averaged: dict[str, torch.Tensor] = {}
        dense_names = [n for n in names if n not in sparse]
        if dense_names:
            flat = [self._dense_grad(n, pending.get(n)).reshape(-1) for n in dense_names]
            bucket = torch.cat(flat)
            dist.all_reduce(bucket, group=self.process_group)
            bucket /= world
            for name, part in zip(dense_names, bucket.split([f.numel() for f in flat])):
                averaged[name] = part.view_as(self.params[name])
        for name in sorted(sparse):
            averaged[name] = self._sparse_average(name, pending.get(name), world)
        for name in names:
            if name in self.updates:
                self.updates[name].apply(averaged[name])
                self.params[name].grad = None
            else:
                self.params[name].grad = averaged[name]

    def _dense_grad(self, name: str, grad: torch.Tensor | None) -> torch.Tensor:
        if grad is None:
            return torch.zeros_like(self.params[name])
        return grad.to_dense() if grad.is_sparse else grad

    def _sparse_average(self, name: str, grad: torch.Tensor | None, world: int) -> torch.Tensor:
        """All ranks' (row, value) pairs gathered in rank order, coalesced, divided by the world size."""
        param = self.params[name]
        if grad is None:
            rows = torch.zeros(0, dtype=torch.int64, device=param.device)
            values = param.new_zeros((0, *param.shape[1:]))
        else:
            grad = grad.coalesce()
            rows, values = grad.indices()[0], grad.values()
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
        dist.all_gather(counts, torch.tensor([rows.numel()]), group=self.process_group)
        longest = int(max(c.item() for c in counts))
        padded_rows = torch.cat([rows, rows.new_zeros(longest - rows.numel())])
        padded_values = torch.cat([values, values.new_zeros((longest - rows.numel(), *values.shape[1:]))])
        all_rows = [torch.empty_like(padded_rows) for _ in range(world)]
        all_values = [torch.empty_like(padded_values) for _ in range(world)]
        dist.all_gather(all_rows, padded_rows, group=self.process_group)
        dist.all_gather(all_values, padded_values, group=self.process_group)
        keep = [int(c.item()) for c in counts]
        rows = torch.cat([r[:k] for r, k in zip(all_rows, keep)])
        values = torch.cat([v[:k] for v, k in zip(all_values, keep)])
        summed = torch.sparse_coo_tensor(rows.unsqueeze(0), values, param.shape).coalesce()
        return summed / world


def replicate_gradients(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> ReplicatedGradientSync:
    """Keep ``module`` (every parameter replicated on every rank) in sync: average gradients in backward.

    Parameters given a fused optimizer (``apply_optimizer_in_backward`` on a
    ``CompressedEmbeddingBagCollection``) are updated right after their average; the rest keep the
    average in ``.grad``. Call it once, after ``apply_optimizer_in_backward``.
    """
    fused = module.fused_optimizer if isinstance(module, FusedOptimizerModule) else None
    updates = fused.updates if isinstance(fused, PSSFusedOptimizer) else {}
    return ReplicatedGradientSync(dict(module.named_parameters()), updates, process_group)
