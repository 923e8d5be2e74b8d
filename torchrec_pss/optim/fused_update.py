"""One parameter's optimizer step, run inside backward (dense or sparse gradient).

Supported optimizer classes and their formulas (identical to the unfused torch / TorchRec optimizer
on a dense gradient; a sparse gradient updates only the touched rows):

- ``torch.optim.SGD``: ``p -= lr·g``.
- ``torch.optim.Adagrad``: ``sum += g²; p -= clr·g / (sqrt(sum) + eps)``, ``clr = lr / (1 + (t-1)·lr_decay)``.
- ``torchrec_pss.optim.BlockwiseAdagrad`` (and TorchRec's ``RowWiseAdagrad``, which only accepts
  >= 2-D parameters): the same with one accumulator per block of ``row_size`` elements,
  ``sum_b += mean(g_b²)`` (a row of a table; for a 1-D memory consecutive runs, e.g. ROBE's Z).
- ``torch.optim.Adam`` on a dense gradient; on a sparse gradient the lazy update of
  ``torch.optim.SparseAdam`` (moments of untouched rows are left as they are, as FBGEMM's TBE does).

Dense and sparse gradients give the same update for SGD, Adagrad and RowWiseAdagrad (an untouched
element has a zero gradient, which changes neither its accumulator nor its value).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torchrec.optim import RowWiseAdagrad

_ADAGRAD = {"lr": 1e-2, "lr_decay": 0.0, "eps": 1e-10, "initial_accumulator_value": 0.0}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "SGD": {"lr": 1e-3},
    "Adagrad": _ADAGRAD,
    "RowWiseAdagrad": _ADAGRAD,
    "BlockwiseAdagrad": {**_ADAGRAD, "block_size": None},
    "Adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
}
_CLASSES = {torch.optim.SGD: "SGD", torch.optim.Adagrad: "Adagrad", RowWiseAdagrad: "RowWiseAdagrad",
            torch.optim.Adam: "Adam"}
_BLOCKWISE = ("RowWiseAdagrad", "BlockwiseAdagrad")
_TORCHREC_ANNOTATIONS = {"optimizer"}
"""Keys TorchRec's sharders add to the (shared) ``_optimizer_kwargs`` dict: the EmbOptimType of the class.
(They also add ``learning_rate``, FBGEMM's name for ``lr``, which is read as ``lr`` when ``lr`` is absent.)"""
_ANY_IMPLEMENTATION = (None, False, True)
_NEUTRAL: dict[str, tuple[Any, ...]] = {  # accepted only at these values: they leave the update as the fused one
    "momentum": (0,), "dampening": (0,), "weight_decay": (0,), "nesterov": (False,), "maximize": (False,),
    "amsgrad": (False,), "decoupled_weight_decay": (False,), "differentiable": (False,), "capturable": (False,),
    "foreach": _ANY_IMPLEMENTATION, "fused": _ANY_IMPLEMENTATION,  # how torch's own step runs, not what it does
}


class FusedUpdate:
    """The in-backward optimizer of one parameter: eager state, a live param group, ``step()`` on ``param.grad``.

    Installed by :class:`~torchrec_pss.CompressedEmbeddingBagCollection` in place of the torch optimizer
    that ``apply_optimizer_in_backward`` attached, so torch's backward hook calls this ``step()``.
    """

    def __init__(self, name: str, param: torch.nn.Parameter, optimizer_class: type, kwargs: dict[str, Any],
                 row_size: int) -> None:
        kind = getattr(optimizer_class, "fused_kind", None) or _CLASSES.get(optimizer_class)
        if kind is None:
            raise ValueError(
                f"parameter {name!r}: in-backward optimizer {optimizer_class.__name__} is not supported; "
                f"use one of {sorted(_DEFAULTS)}"
            )
        hyper = dict(_DEFAULTS[kind])
        for key, value in kwargs.items():
            if key in hyper:
                hyper[key] = value
            elif key == "learning_rate":
                if "lr" not in kwargs:
                    hyper["lr"] = value
            elif key in _TORCHREC_ANNOTATIONS:
                continue
            elif key not in _NEUTRAL or value not in _NEUTRAL[key]:
                raise ValueError(f"parameter {name!r}: {optimizer_class.__name__}({key}={value!r}) is not supported")
        self.name, self.param, self.kind = name, param, kind
        self.row_size = hyper.pop("block_size", None) or row_size
        self.group: dict[str, Any] = {"params": [param], **hyper}
        self.state: dict[str, torch.Tensor] = self._initial_state()
        self.deferred_to: Callable[[FusedUpdate, torch.Tensor], None] | None = None
        """When set (replicated memories), ``step`` hands the local gradient over instead of applying it."""

    @classmethod
    def from_tags(cls, name: str, param: torch.nn.Parameter, row_size: int) -> FusedUpdate:
        """The update ``apply_optimizer_in_backward`` asked for (``param._optimizer_classes`` / ``_kwargs``)."""
        classes, kwargs = param._optimizer_classes, param._optimizer_kwargs
        if len(classes) != 1:
            raise ValueError(f"parameter {name!r} has {len(classes)} in-backward optimizers; apply exactly one")
        return cls(name, param, classes[0], kwargs[0], row_size)

    def _initial_state(self) -> dict[str, torch.Tensor]:
        p, kind = self.param, self.kind
        if kind == "SGD":
            return {}
        step = torch.tensor(0.0)
        if kind == "Adam":
            return {"step": step, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        init = self.group["initial_accumulator_value"]
        if kind in _BLOCKWISE:
            rows = math.ceil(p.numel() / self.row_size)
            return {"step": step, "sum": torch.full((rows, 1), init, dtype=p.dtype, device=p.device)}
        return {"step": step, "sum": torch.full_like(p, init)}

    def next_step_lr(self) -> float:
        """Count one more step; Adagrad's step size for it, ``lr / (1 + (t - 1)·lr_decay)``.

        For kernels that apply the update themselves (e.g. a fused backward + Adagrad).
        """
        self.state["step"] += 1
        return self.group["lr"] / (1 + (self.state["step"].item() - 1) * self.group["lr_decay"])

    def step(self) -> None:
        """Apply ``param.grad`` (called by torch's in-backward hook, which then drops the gradient)."""
        grad = self.param.grad
        if grad is None:
            return
        if self.deferred_to is not None:
            self.deferred_to(self, grad)
        else:
            self.apply(grad)

    @torch.no_grad()
    def apply(self, grad: torch.Tensor) -> None:
        """One optimizer step with ``grad`` (dense, or sparse over rows of dim 0)."""
        if grad.is_sparse:
            grad = grad.coalesce()
            self._sparse(grad.indices()[0], grad.values())
        else:
            self._dense(grad)

    def _dense(self, g: torch.Tensor) -> None:
        p, s, group, kind = self.param, self.state, self.group, self.kind
        lr = group["lr"]
        if kind == "SGD":
            p.add_(g, alpha=-lr)
            return
        if kind == "Adam":
            s["step"] += 1
            t = s["step"].item()
            beta1, beta2 = group["betas"]
            s["exp_avg"].lerp_(g, 1 - beta1)
            s["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (s["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
            p.addcdiv_(s["exp_avg"], denom, value=-lr / (1 - beta1**t))
            return
        clr = self.next_step_lr()
        if kind in _BLOCKWISE:
            blocks = self._blocks(g.reshape(-1))
            s["sum"] += blocks.pow(2).mean(dim=1, keepdim=True)
            std = s["sum"].sqrt().add_(group["eps"])
            p.view(-1).add_((blocks / std).reshape(-1)[: p.numel()], alpha=-clr)
            return
        s["sum"].addcmul_(g, g, value=1)
        p.addcdiv_(g, s["sum"].sqrt().add_(group["eps"]), value=-clr)

    def _sparse(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Update the rows ``rows`` (dim 0 of the parameter) whose gradients are ``values``."""
        p, s, group, kind = self.param, self.state, self.group, self.kind
        lr = group["lr"]
        if kind == "SGD":
            p.index_add_(0, rows, values, alpha=-lr)
            return
        if kind == "Adam":
            s["step"] += 1
            t = s["step"].item()
            beta1, beta2 = group["betas"]
            old_avg, old_sq = s["exp_avg"][rows], s["exp_avg_sq"][rows]
            avg_update = (values - old_avg).mul_(1 - beta1)
            sq_update = (values.pow(2) - old_sq).mul_(1 - beta2)
            s["exp_avg"].index_add_(0, rows, avg_update)
            s["exp_avg_sq"].index_add_(0, rows, sq_update)
            numer = avg_update.add_(old_avg)
            denom = sq_update.add_(old_sq).sqrt_().add_(group["eps"])
            step_size = lr * math.sqrt(1 - beta2**t) / (1 - beta1**t)
            p.index_add_(0, rows, numer.div_(denom), alpha=-step_size)
            return
        clr = self.next_step_lr()
        if kind in _BLOCKWISE:
            self._sparse_rowwise(rows, values, clr)
            return
        s["sum"].index_add_(0, rows, values.pow(2))
        p.index_add_(0, rows, values / s["sum"][rows].sqrt().add_(group["eps"]), alpha=-clr)

    def _sparse_rowwise(self, rows: torch.Tensor, values: torch.Tensor, clr: float) -> None:
        """RowWiseAdagrad on a sparse gradient: only the blocks holding touched elements change."""
        p, s, size = self.param, self.state, self.row_size
        flat_values = values.reshape(rows.numel(), math.prod(values.shape[1:]))  # also for no rows
        positions = (rows.unsqueeze(1) * flat_values.shape[1] + torch.arange(flat_values.shape[1], device=rows.device))
        positions, flat_values = positions.reshape(-1), flat_values.reshape(-1)
        blocks = torch.div(positions, size, rounding_mode="floor")
        touched, inverse = torch.unique(blocks, return_inverse=True)
        squares = flat_values.new_zeros(touched.numel()).index_add_(0, inverse, flat_values.pow(2))
        s["sum"].index_add_(0, touched, (squares / size).unsqueeze(1))
        std = s["sum"].view(-1)[blocks].sqrt().add_(self.group["eps"])
        p.view(-1).index_add_(0, positions, flat_values / std, alpha=-clr)

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """``[rows, row_size]`` view of a flat tensor, zero-padded at the end when needed."""
        pad = (-flat.numel()) % self.row_size
        return (torch.cat([flat, flat.new_zeros(pad)]) if pad else flat).view(-1, self.row_size)
