"""Optimizer states on resume: lazily created states are made before loading, and mismatches are refused first.

Torch optimizers such as Adam create a parameter's state at its first step, so a fresh one has none and DCP,
which loads in place, would silently keep it empty. :func:`materialize_lazy_states` creates the states the
checkpoint holds for such parameters by one step at learning rate 0 on zero gradients (TorchRec's
``KeyedOptimizer.init_state`` does the same at the configured rate). Fused optimizers (TorchRec's and
:class:`~torchrec_pss.optim.PSSFusedOptimizer`) create their states eagerly and are left alone.
"""

from __future__ import annotations

from typing import Any, Collection, Iterator, Mapping

import torch
from torch.optim import Optimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper


def _state_keys(optimizer: Optimizer) -> dict[str, torch.Tensor]:
    """Each parameter by its key in ``optimizer.state_dict()["state"]``: a KeyedOptimizer's parameter name, a
    torch optimizer's index in its param groups (as a string)."""
    if isinstance(optimizer, KeyedOptimizer):
        return dict(optimizer.params)
    params = [param for group in optimizer.param_groups for param in group["params"]]
    return {str(index): param for index, param in enumerate(params)}


def _steppable(optimizer: Optimizer) -> Iterator[Optimizer]:
    """The optimizers inside ``optimizer`` whose ``step`` applies ``param.grad`` (torch optimizers, also behind
    TorchRec's wrappers); fused ones are not listed."""
    if isinstance(optimizer, CombinedOptimizer):
        for _, inner in optimizer.optimizers:
            yield from _steppable(inner)
    elif isinstance(optimizer, OptimizerWrapper):
        yield from _steppable(optimizer._optimizer)  # its own step would also run e.g. a warm-up schedule
    elif isinstance(optimizer, KeyedOptimizerWrapper) or not isinstance(optimizer, KeyedOptimizer):
        yield optimizer


def _parameter_of(entry: str, keys: Collection[str]) -> str | None:
    """The parameter key among ``keys`` that the flattened entry ``entry`` (``<parameter key>.<name>...``, the
    parameter key possibly dotted) belongs to, or None."""
    parts = entry.split(".")
    return next((key for key in (".".join(parts[:n]) for n in range(1, len(parts))) if key in keys), None)


def _saved_params(saved: Collection[str], name: str, keys: Collection[str]) -> set[str]:
    """The keys among ``keys`` that have state entries in the checkpoint's metadata keys ``saved``."""
    prefix = f"optimizers.{name}.state."
    keys = set(keys)
    found = {_parameter_of(key[len(prefix):], keys) for key in saved if key.startswith(prefix)}
    return found - {None}


@torch.no_grad()
def _zero_rate_step(optimizer: Optimizer, params: list[torch.Tensor]) -> None:
    """One ``optimizer.step()`` at learning rate 0 with zero gradients on ``params`` only (the other parameters'
    gradients are set aside meanwhile, so the optimizer skips them); gradients and rates are restored after."""
    everything = [param for group in optimizer.param_groups for param in group["params"]]
    grads = [param.grad for param in everything]
    rates = [group.get("lr") for group in optimizer.param_groups]
    try:
        for param in everything:
            param.grad = None
        for param in params:
            zeros = torch.zeros_like(param)
            param.grad = zeros.to_sparse() if isinstance(optimizer, torch.optim.SparseAdam) else zeros
        for group in optimizer.param_groups:
            if "lr" in group:
                group["lr"] = torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
        optimizer.step()
    finally:
        for param, grad in zip(everything, grads):
            param.grad = grad
        for group, rate in zip(optimizer.param_groups, rates):
            if rate is not None:
                group["lr"] = rate


def materialize_lazy_states(optimizers: Mapping[str, Optimizer], saved: Collection[str]) -> list[tuple[Any, Any]]:
    """Create, in each of ``optimizers``, the states that the checkpoint (metadata keys ``saved``) holds for
    parameters that have none yet, without changing any parameter.

    Returns ``(state, param)`` for every state created, for :func:`drop_states` should the load be refused.
    Raises ``ValueError`` naming the optimizer and parameters when such a state cannot be created (a fused
    optimizer without it).
    """
    created: list[tuple[Any, Any]] = []
    for name, optimizer in optimizers.items():
        keys = _state_keys(optimizer)
        lazy = {key: param for key, param in keys.items() if not optimizer.state.get(param)}
        wanted = _saved_params(saved, name, lazy.keys())
        if not wanted:
            continue
        missing = {id(lazy[key]): key for key in wanted}
        for inner in _steppable(optimizer):
            params = [param for group in inner.param_groups for param in group["params"] if id(param) in missing]
            if params:
                _zero_rate_step(inner, params)
                created.extend((inner.state, param) for param in params)
                for param in params:
                    del missing[id(param)]
        if missing:
            raise ValueError(
                f"optimizer {name!r} has no state for {sorted(missing.values())}, which the checkpoint holds, "
                "and cannot create it: the checkpoint was written with an optimizer that keeps state this one does "
                "not (e.g. Adagrad, loaded into an SGD), or this optimizer creates it later (step it once, or "
                "call its init_state(), before loading)"
            )
    return created


def drop_states(created: list[tuple[Any, Any]]) -> None:
    """Undo :func:`materialize_lazy_states`: remove the states it created."""
    for state, param in created:
        state.pop(param, None)


def check_optimizer_states(path: str, mine: Mapping[str, Any], saved: Collection[str],
                           optimizers: Mapping[str, Optimizer]) -> None:
    """Refuse a checkpoint whose optimizer states are not the optimizers' (``mine``: their flattened state,
    ``saved``: the checkpoint's keys; neither holds an empty container).

    Every state and param-group entry of an optimizer must be in the checkpoint, and every entry the checkpoint
    holds for the optimizer's parameters must be loaded: an entry it would not read (e.g. AMSGrad's, or an
    Adagrad's sum loaded into an SGD) is refused. Entries of parameters a KeyedOptimizer does not hold are
    allowed (a TorchRec fused optimizer lists only the tables its rank holds).
    """
    for name, optimizer in optimizers.items():
        for section in ("state", "param_groups"):
            prefix = f"optimizers.{name}.{section}"
            ours = {key for key in mine if key == prefix or key.startswith(f"{prefix}.")}
            theirs = {key for key in saved if key == prefix or key.startswith(f"{prefix}.")}
            missing = ours - theirs
            unexpected = theirs - ours
            if isinstance(optimizer, KeyedOptimizer):
                keys = set(optimizer.params)
                unexpected = {key for key in unexpected if _parameter_of(key[len(prefix) + 1:], keys) is not None}
            if missing or unexpected:
                raise ValueError(
                    f"checkpoint {path}: the {section} entries of optimizer {name!r} do not match; missing {sorted(missing)}, "
                    f"unexpected {sorted(unexpected)}; nothing was loaded"
                )
