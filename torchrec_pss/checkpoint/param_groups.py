"""A KeyedOptimizer's param groups in a checkpoint, keyed by parameter.

TorchRec's ``KeyedOptimizer.save_param_groups(True)`` puts a list of groups in its state_dict, each naming its
parameters. Under DMP each rank's fused optimizer lists only the tables that rank holds, so group ``i`` differs
from rank to rank, and DCP, which keeps one value per key, would store a group of one rank's hyper-parameters
with another rank's parameters. Saved here instead is every parameter's hyper-parameters
(``param_groups.<parameter key>.<name>``): each rank writes its own parameters' entries, and a resume on any
number of ranks reads those of the parameters it holds, then puts them back into its own groups.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch.optim import Optimizer
from torchrec.optim.keyed import KeyedOptimizer

GROUPS = "param_groups"


def groups_by_parameter(optimizer: Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (``optimizer.state_dict()``) with a KeyedOptimizer's groups as ``{parameter key: {name: value}}``
    (other optimizers' state as it is)."""
    if not isinstance(optimizer, KeyedOptimizer) or GROUPS not in state:
        return state
    by_parameter = {key: {name: value for name, value in group.items() if name != "params"}
                    for group in state[GROUPS] for key in group["params"]}
    return {**state, GROUPS: by_parameter}


def groups_of_optimizer(optimizer: Optimizer, name: str, state: dict[str, Any]) -> dict[str, Any]:
    """The inverse for loading: ``state`` with the optimizer's own groups (its parameters, in its order), each
    holding the hyper-parameters read for its parameters.

    Raises ``ValueError`` naming the optimizer, parameters and values when the parameters of one of this
    optimizer's groups were saved with different hyper-parameters (they were in different groups then).
    """
    if not isinstance(optimizer, KeyedOptimizer) or GROUPS not in state:
        return state
    by_parameter: Mapping[str, Mapping[str, Any]] = state[GROUPS]
    groups = []
    for group in optimizer.state_dict()[GROUPS]:
        keys = group["params"]
        read = [by_parameter[key] for key in keys]
        for key, values in zip(keys[1:], read[1:]):
            if not _same(values, read[0]):
                raise ValueError(
                    f"optimizer {name!r}: parameters {keys[0]!r} and {key!r} share a param group here but were saved "
                    f"with {dict(read[0])} and {dict(values)}; nothing was loaded"
                )
        groups.append({**group, **(read[0] if read else {})})
    return {**state, GROUPS: groups}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b
