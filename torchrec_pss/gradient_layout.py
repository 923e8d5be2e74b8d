"""The dense-versus-sparse gradient rule shared by the methods (the PSS paper's Algorithm 1 choice).

A dense gradient costs about one pass over the memory (``|M|`` elements: zero, accumulate, update);
a sparse one costs a sort of the elements the batch touches. ``"auto"`` picks dense while
``|M| <= auto_dense_ratio x touched`` — 50 by default, the crossover measured by
``benchmarks/fused_step.py`` and ``benchmarks/lookup.py`` on the CPU (ROBE, whose sparse gradient has its
own kernel, uses 35: ``RobeConfig.auto_dense_ratio``). When the batch size is symbolic
(``torch.export`` or ``torch.compile`` with dynamic shapes) and the rule cannot be decided, ``"auto"``
picks dense: the traced graph keeps one layout, and dense works with every optimizer.
"""

from __future__ import annotations

from torch.fx.experimental.symbolic_shapes import guard_or_false

GRADIENT_MODES = ("dense", "sparse", "auto")
DEFAULT_AUTO_DENSE_RATIO = 50.0


def use_sparse_gradient(mode: str, memory_elements: int, touched_elements: int,
                        auto_dense_ratio: float = DEFAULT_AUTO_DENSE_RATIO) -> bool:
    """Whether a memory of ``memory_elements`` gets a sparse gradient for a batch touching ``touched_elements``."""
    if mode == "auto":
        return guard_or_false(memory_elements > auto_dense_ratio * touched_elements)
    return mode == "sparse"
