"""ROBE's backward fused with the in-backward optimizer of ``M``: the update is scattered into ``M`` in place, so no
``[|M|]`` gradient is formed (SGD) or kept (Adagrad).

torch's in-backward optimizer steps once per backward pass, when the engine reaches ``M``'s gradient accumulator
with the sum of every gradient of ``M``. The fused update keeps that contract: a read's backward only records the
read (:class:`Read`); a pre-hook on the accumulator (:class:`PendingReads`) then applies the pass's reads together,
after every other node of the pass that reads ``M`` has run. One read and no other gradient of ``M`` (the common
case: one module call per step) takes the fused kernel. Several reads take one fused kernel each under SGD (it is
linear) and one dense step on their summed gradient under Adagrad. A gradient of ``M`` from elsewhere in the pass
(a regulariser, an unfused read) gets the reads' gradients added, and torch's optimizer hook steps on the sum.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.distributed.optim.apply_optimizer_in_backward import param_to_acc_grad_map

from torchrec_pss.optim import FusedUpdate
from torchrec_pss_plugins.robe import ops


@dataclass
class Read:
    """One ``robe_pooled`` call's backward input: ``grad`` ``[B, dim]`` and the bags it pooled."""

    grad: torch.Tensor
    ids: torch.Tensor
    offsets: torch.Tensor
    weights: torch.Tensor | None
    coefficients: torch.Tensor
    keys: torch.Tensor
    chunk_size: int
    use_sign: bool
    mean: bool

    def dense_grad(self, memory_size: int) -> torch.Tensor:
        """The read's gradient of ``M``, ``[memory_size]``."""
        return ops.robe_pooled_backward(self.grad, self.ids, self.offsets, self.weights, self.coefficients,
                                        self.keys, memory_size, self.chunk_size, self.use_sign, self.mean)


class PendingReads:
    """The reads of one memory whose backward ran in the current pass, applied by the pre-hook on ``M``'s
    gradient accumulator ``node`` (registered once)."""

    def __init__(self, update: FusedUpdate, node: torch.autograd.graph.Node) -> None:
        self.update = weakref.ref(update)  # weak, as the hook: a dropped model's update and memory are freed
        self.node = node
        self.task: int | None = None
        self.reads: list[Read] = []
        pending = weakref.ref(self)
        node.register_prehook(lambda grads: None if pending() is None else pending().apply(grads))

    def accumulates(self) -> bool:
        """Whether the engine runs ``M``'s accumulator in the current pass (not under ``autograd.grad``, whose
        engine asked about a leaf raises, nor for ``backward(inputs=...)`` without ``M``)."""
        try:
            return torch._C._will_engine_execute_node(self.node)
        except RuntimeError:
            return False

    def add(self, read: Read) -> None:
        task = torch._C._current_graph_task_id()
        if task != self.task:  # drop reads of a pass that stopped before the accumulator
            self.task, self.reads = task, []
        self.reads.append(read)

    def _take(self) -> list[Read]:
        reads = self.reads if self.task == torch._C._current_graph_task_id() else []
        self.task, self.reads = None, []
        return reads

    @torch.no_grad()
    def apply(self, grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor] | None:
        """The accumulator's pre-hook: ``grads`` holds the pass's other gradient of ``M`` (or None)."""
        reads, update = self._take(), self.update()
        if not reads or update is None:
            return None
        memory = update.param
        (incoming,) = grads
        if incoming is not None:
            total = incoming.to_dense() if incoming.is_sparse else incoming
            return (total + sum(read.dense_grad(memory.numel()) for read in reads),)
        group = update.group
        if update.kind == "SGD":
            for r in reads:
                ops.robe_sgd_update_(memory, r.grad, r.ids, r.offsets, r.weights, r.coefficients, r.keys,
                                     r.chunk_size, r.use_sign, r.mean, group["lr"])
        elif len(reads) == 1:
            (r,) = reads
            block = 1 if update.kind == "Adagrad" else update.row_size
            ops.robe_adagrad_update_(memory, update.state["sum"], r.grad, r.ids, r.offsets, r.weights,
                                     r.coefficients, r.keys, r.chunk_size, r.use_sign, r.mean, update.next_step_lr(),
                                     group["eps"], block)
        else:
            update.apply(sum(read.dense_grad(memory.numel()) for read in reads))
        return None


_PENDING: weakref.WeakKeyDictionary[FusedUpdate, PendingReads] = weakref.WeakKeyDictionary()


def pending_reads(update: FusedUpdate) -> PendingReads | None:
    """The pending reads of ``update.param``, or None when it has no accumulator kept by
    ``apply_optimizer_in_backward`` (then the update is not fused)."""
    node = param_to_acc_grad_map.get(update.param)
    if node is None:
        return None
    pending = _PENDING.get(update)
    if pending is None or pending.node is not node:
        pending = _PENDING[update] = PendingReads(update, node)
    return pending


class FusedRobeStep(torch.autograd.Function):
    """``robe_pooled`` whose backward hands its read to ``pending`` (see the module docstring); ``M`` gets no
    ``.grad``, except under ``autograd.grad`` (its accumulator does not run): then the read's dense gradient."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, memory: torch.Tensor, pending: PendingReads,
                ids: torch.Tensor, offsets: torch.Tensor, weights: torch.Tensor | None, coefficients: torch.Tensor,
                keys: torch.Tensor, dim: int, chunk_size: int, use_sign: bool, mean: bool) -> torch.Tensor:
        ctx.pending, ctx.layout = pending, (memory.numel(), chunk_size, use_sign, mean)
        ctx.save_for_backward(ids, offsets, weights, coefficients, keys)
        return ops.robe_pooled(memory, ids, offsets, weights, coefficients, keys, dim, chunk_size, use_sign, mean,
                               False)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        memory_size, chunk_size, use_sign, mean = ctx.layout
        read = Read(grad, *ctx.saved_tensors, chunk_size, use_sign, mean)
        if not ctx.pending.accumulates():
            return (read.dense_grad(memory_size),) + (None,) * 10
        ctx.pending.add(read)
        return (None,) * 11
