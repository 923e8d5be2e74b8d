"""Free a model trained with in-backward optimizers: torch's records of them keep its parameters alive.

``apply_optimizer_in_backward`` (torch's, which TorchRec's calls) stores each parameter's AccumulateGrad
node in a weak-keyed map; the node holds the parameter, so the entry, the parameter and its optimizer
state stay alive for the rest of the process even after the model is dropped. A process that trains
several models one after another (sweeps, benchmarks) runs out of memory that way.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.optim import apply_optimizer_in_backward as in_backward

_PARAM_ATTRIBUTES = ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs")


def release_in_backward_optimizers(module: nn.Module) -> None:
    """Undo ``apply_optimizer_in_backward`` for every parameter of ``module``: remove the hooks, torch's
    records and the optimizers attached to the parameters, so that dropping the module frees them.

    The module trains no more through those optimizers afterwards (its gradients accumulate in ``.grad``).
    """
    for param in module.parameters():
        for handle in in_backward.param_to_optim_hook_handle_map.pop(param, []):
            handle.remove()
        in_backward.param_to_acc_grad_map.pop(param, None)
        for name in _PARAM_ATTRIBUTES:
            if hasattr(param, name):
                delattr(param, name)
