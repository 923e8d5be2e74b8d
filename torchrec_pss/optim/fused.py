"""``PSSFusedOptimizer``: the KeyedOptimizer view of a module's in-backward (fused) updates."""

from __future__ import annotations

from typing import Any, Mapping

from torchrec.optim.fused import FusedOptimizer

from torchrec_pss.optim.fused_update import FusedUpdate


class PSSFusedOptimizer(FusedOptimizer):
    """State and param groups of the :class:`FusedUpdate` of every parameter, keyed by parameter name.

    The updates run inside backward, so ``step`` and ``zero_grad`` do nothing. ``param_groups`` are the
    updates' own dicts: a changed ``lr`` (a scheduler, a warm-up) is read by the next backward.
    ``state_dict`` / ``load_state_dict`` round-trip the state, which exists from construction on.
    """

    def __init__(self, updates: Mapping[str, FusedUpdate]) -> None:
        self.updates = dict(updates)
        super().__init__(
            params={name: u.param for name, u in updates.items()},
            state={u.param: u.state for u in updates.values()},
            param_groups=[u.group for u in updates.values()],
        )

    def step(self, closure: Any = None) -> None:
        """Nothing: the update ran in backward."""

    def zero_grad(self, set_to_none: bool = False) -> None:
        """Nothing: fused parameters never keep a gradient."""
