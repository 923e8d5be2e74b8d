"""``BlockwiseAdagrad``: row-wise Adagrad for parameters of any shape (one accumulator per block)."""

from __future__ import annotations

from typing import Iterable

import torch

from torchrec_pss.optim.fused_update import FusedUpdate


class BlockwiseAdagrad(torch.optim.Optimizer):
    """``torchrec.optim.RowWiseAdagrad`` generalised to blocks: ``sum_b += mean(g_b²)``, ``p_b -= clr·g_b / (sqrt(sum_b) + eps)``.

    ``block_size`` elements share one accumulator (default: a row of a >= 2-D parameter, one element of a
    1-D one; a :class:`~torchrec_pss.CompressedEmbeddingBagCollection` running it fused uses each memory's
    own block, e.g. ROBE's chunk of Z elements). Unlike TorchRec's RowWiseAdagrad it accepts 1-D memories
    and sparse gradients. On a 2-D parameter with the default block it equals ``RowWiseAdagrad``.
    """

    fused_kind = "BlockwiseAdagrad"

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-2, lr_decay: float = 0.0,
                 eps: float = 1e-10, initial_accumulator_value: float = 0.0, block_size: int | None = None) -> None:
        defaults = {"lr": lr, "lr_decay": lr_decay, "eps": eps, "initial_accumulator_value": initial_accumulator_value,
                    "block_size": block_size}
        super().__init__(params, defaults)
        self._updates: dict[torch.Tensor, FusedUpdate] = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                kwargs = {k: v for k, v in group.items() if k != "params"}
                update = FusedUpdate(f"param {i}", p, BlockwiseAdagrad, kwargs, default_block_size(p))
                update.group = group
                self.state[p] = update.state
                self._updates[p] = update

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, then the loaded state and groups are the ones the updates use
        (torch replaces the ``state`` and ``param_groups`` dicts that the updates were built on)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for p in group["params"]:
                update = self._updates[p]
                update.state.update(self.state[p])
                self.state[p] = update.state
                update.group = group

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim.Optimizer's signature
        loss = closure() if closure is not None else None
        for update in self._updates.values():
            update.step()
        return loss


def default_block_size(param: torch.Tensor) -> int:
    """A row of a >= 2-D parameter, one element of a 1-D parameter."""
    return param[0].numel() if param.dim() > 1 else 1
