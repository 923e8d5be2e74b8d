"""The dense-versus-sparse gradient rule shared by the methods (the PSS paper's Algorithm 1 choice).

A dense gradient costs about one pass over the memory (``|M|`` elements: zero, accumulate, update);
a sparse one costs a sort of the elements the batch touches. ``"auto"`` picks dense while
``|M| <= auto_dense_ratio x touched`` — 50 by default, the crossover measured by
``benchmarks/fused_step.py`` and ``benchmarks/lookup.py`` on the CPU (ROBE, whose sparse gradient has its
own kernel, uses 35: ``RobeConfig.auto_dense_ratio``). When the batch size is symbolic (``torch.compile``
with dynamic shapes) the comparison is guarded (``guard_or_false``): a batch on the other side of the threshold
recompiles the graph once. Where it cannot be decided without a guard (sizes that depend on the data, or
``torch.export`` with size-oblivious shapes), ``"auto"`` picks dense: the traced graph keeps one layout, and
dense works with every optimizer.

The methods whose sparse gradient is a set of rows (QR's parts, the hashing trick's table, MLET's ``W1``) use
:data:`ROWS_AUTO_DENSE_RATIO` = 8: in ``benchmarks/results/grid_cpu_interleaved.md`` their dense step won in 15
of the 16 cells at ``|M| / touched`` <= 3.9 (not QR's 16M-row, L = 20 cell at 1.95: 60 against 32 ms) and lost
at 9.8 (hashing, 1.8x) and 39 (QR and hashing, 8-11x).

A memory whose in-backward optimizer is a fused update that gives the same step for either layout (SGD,
Adagrad, row-/blockwise Adagrad; not deferred to an all-reduce) follows the ``"auto"`` rule whatever its
``gradient`` says (:func:`gradient_mode`, :func:`use_sparse_rows`): the layout then changes the speed only, as
in FBGEMM's TBE, which never forms a dense gradient.

A method whose sparse gradient is coalesced by construction (ROBE, QR) calls :func:`keep_coalesced_flag` on the
memory: torch's ``AccumulateGrad`` drops the flag when it stores the gradient in an empty ``.grad`` without a copy
(pytorch/pytorch#105916), so ``grad.values()`` would raise and every torch optimizer would sort it again.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_false
from torch.utils.hooks import unserializable_hook
from torch.utils.weak import WeakIdKeyDictionary

GRADIENT_MODES = ("dense", "sparse", "auto")
DEFAULT_AUTO_DENSE_RATIO = 50.0
ROWS_AUTO_DENSE_RATIO = 8.0
LAYOUT_FREE_UPDATES = ("SGD", "Adagrad", "RowWiseAdagrad", "BlockwiseAdagrad")


def gradient_mode(mode: str, param: torch.Tensor) -> str:
    """``mode``, or ``"auto"`` when ``param`` has one in-backward fused update of a kind in
    :data:`LAYOUT_FREE_UPDATES` that applies its gradient itself (not deferred to an all-reduce)."""
    optimizers = getattr(param, "_in_backward_optimizers", None)
    if not optimizers or len(optimizers) != 1:
        return mode
    update = optimizers[0]
    if getattr(update, "kind", None) not in LAYOUT_FREE_UPDATES or getattr(update, "deferred_to", True) is not None:
        return mode
    return "auto"


def use_sparse_rows(mode: str, table: torch.Tensor, touched_rows: int) -> bool:
    """Whether ``table`` (``[rows, width]``: QR's parts, the hashing trick's table, MLET's ``W1``), whose gradient
    layout is ``mode``, gets a sparse gradient for a batch reading ``touched_rows`` rows (:func:`gradient_mode`,
    then the rule with :data:`ROWS_AUTO_DENSE_RATIO`)."""
    return use_sparse_gradient(gradient_mode(mode, table), table.numel(), touched_rows * table.shape[1],
                               ROWS_AUTO_DENSE_RATIO)


def use_sparse_gradient(mode: str, memory_elements: int, touched_elements: int,
                        auto_dense_ratio: float = DEFAULT_AUTO_DENSE_RATIO) -> bool:
    """Whether a memory of ``memory_elements`` gets a sparse gradient for a batch touching ``touched_elements``."""
    if mode == "auto":
        return guard_or_false(memory_elements > auto_dense_ratio * touched_elements)
    return mode == "sparse"


class _CoalescedFlag:
    """The hooks of :func:`keep_coalesced_flag` on one parameter: :meth:`note` (a tensor hook) sees the gradient
    ``AccumulateGrad`` gets, :meth:`restore` (a post-accumulate-grad hook) the ``.grad`` it leaves."""

    def __init__(self) -> None:
        self.incoming: tuple[int, torch.Size] | None = None

    @staticmethod
    def _indices(grad: torch.Tensor) -> tuple[int, torch.Size]:
        """Where ``grad``'s indices ``[sparse_dim, nnz]`` lie, and their shape."""
        indices = grad._indices()
        return indices.data_ptr(), indices.shape

    @unserializable_hook
    def note(self, grad: torch.Tensor) -> None:
        """Remember where the incoming gradient's indices lie when it is sparse and flagged coalesced."""
        self.incoming = self._indices(grad) if grad.is_sparse and grad.is_coalesced() else None

    def restore(self, param: torch.Tensor) -> None:
        """Flag ``param.grad`` coalesced when it holds the very indices of the coalesced incoming gradient (stored
        without a copy into an empty ``.grad``, flag lost); a sum with an earlier ``.grad`` has new indices and
        its own flag."""
        incoming, self.incoming = self.incoming, None
        grad = param.grad
        if (incoming is not None and grad is not None and grad.is_sparse and not grad.is_coalesced()
                and self._indices(grad) == incoming):
            grad._coalesced_(True)


_COALESCED_FLAGS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def keep_coalesced_flag(param: torch.Tensor) -> None:
    """Make a coalesced sparse gradient of ``param`` stay flagged coalesced in ``param.grad`` (no sort, no copy).

    Idempotent and cheap, so a memory calls it in every forward that picks a sparse gradient (hooks registered in
    ``__init__`` would not survive ``copy.deepcopy`` or pickling of the parameter). Does nothing for a tensor that is
    not an ``nn.Parameter`` requiring grad (e.g. one passed to ``torch.func.functional_call``), under ``no_grad`` /
    ``inference_mode`` (nothing is recorded: a forward that serves adds no hooks) or while compiling.
    """
    if (torch.compiler.is_compiling() or not torch.is_grad_enabled() or not isinstance(param, nn.Parameter)
            or not param.requires_grad or param in _COALESCED_FLAGS):
        return
    flag = _COALESCED_FLAGS[param] = _CoalescedFlag()
    param.register_hook(flag.note)
    param.register_post_accumulate_grad_hook(flag.restore)
