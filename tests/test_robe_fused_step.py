"""ROBE's fused backward + in-backward optimizer keeps torch's contract: one step per backward pass, on the sum of
every gradient of ``M`` in that pass, applied after every node that reads ``M``.

Expected values: the same steps on the pure-PyTorch path (``TORCHREC_PSS_KERNELS=reference``: ``M`` gets its
gradient from autograd and torch's in-backward hook steps on it) and torch's own optimizers.
"""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec_pss_plugins.robe import fused_step, ops
from torchrec_pss_plugins.robe.fused_step import FusedRobeStep

from helpers import graph_nodes, make_kjt, random_bags
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.optim import BlockwiseAdagrad

OPTIMIZERS = [(torch.optim.SGD, {"lr": 0.1}), (torch.optim.Adagrad, {"lr": 0.1}), (BlockwiseAdagrad, {"lr": 0.1})]


def robe_module(kernels: str, monkeypatch: pytest.MonkeyPatch) -> CompressedEmbeddingBagCollection:
    """Two tables sharing one ROBE memory, built with ``TORCHREC_PSS_KERNELS=kernels`` in force."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=40, feature_names=[f"f{i}"])
              for i in range(2)]
    config = RobeConfig(memory_size=61, chunk_size=4, gradient="dense")
    return CompressedEmbeddingBagCollection(tables, {"t0": config, "t1": config})


def batch(seed: int):
    rng = random.Random(seed)
    return make_kjt({f"f{i}": random_bags(rng, 40, batch=4, max_len=3) for i in range(2)})


def readout(out: torch.Tensor) -> torch.Tensor:
    return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + out.pow(2).sum()


FUSED = FusedRobeStep.__name__ + "Backward"


def train_twice_per_pass(kernels: str, optimizer: type, kwargs: dict, monkeypatch: pytest.MonkeyPatch,
                         steps: int = 3) -> tuple[torch.Tensor, set[str]]:
    """Each step calls the module on two batches (two towers) and runs one backward; ``(M, graph node names)``."""
    module = robe_module(kernels, monkeypatch)
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    for step in range(steps):
        loss = readout(module(batch(2 * step)).values()) + 0.5 * readout(module(batch(2 * step + 1)).values())
        nodes = graph_nodes(loss)
        loss.backward()
    return module.memory_for("t0").weight.detach().clone(), nodes


@pytest.mark.parametrize("optimizer,kwargs", OPTIMIZERS)
def test_two_calls_in_one_pass_take_one_step_on_their_summed_gradient(
        optimizer: type, kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    fused, nodes = train_twice_per_pass("fast", optimizer, kwargs, monkeypatch)
    assert FUSED in nodes
    expected, reference_nodes = train_twice_per_pass("reference", optimizer, kwargs, monkeypatch)
    assert FUSED not in reference_nodes
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


def train_with_regulariser(kernels: str, optimizer: type, kwargs: dict, first: bool,
                           monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    """Steps whose loss also reads ``M`` outside the module (an L2 term built before or after the forward)."""
    module = robe_module(kernels, monkeypatch)
    memory = module.memory_for("t0").weight
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    for step in range(3):
        regulariser = 0.3 * memory.pow(2).sum() if first else None
        loss = readout(module(batch(step)).values())
        loss = loss + (regulariser if first else 0.3 * memory.pow(2).sum())
        loss.backward()
    return memory.detach().clone()


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("optimizer,kwargs", OPTIMIZERS)
def test_a_memory_also_read_outside_the_module_steps_once_on_the_whole_gradient(
        optimizer: type, kwargs: dict, first: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a regulariser built first saw ``M`` changed in place (autograd's version error, after the write),
    one built after the forward made Adagrad step twice."""
    fused = train_with_regulariser("fast", optimizer, kwargs, first, monkeypatch)
    expected = train_with_regulariser("reference", optimizer, kwargs, first, monkeypatch)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer,kwargs", OPTIMIZERS)
def test_one_read_per_pass_takes_the_fused_kernel_and_no_dense_gradient(
        optimizer: type, kwargs: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("robe_pooled_backward", "robe_sgd_update_", "robe_adagrad_update_"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, _name=name, _op=original: calls.append(_name) or _op(*args))
    module = robe_module("fast", monkeypatch)
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    readout(module(batch(0)).values()).backward()
    assert calls == ["robe_sgd_update_" if optimizer is torch.optim.SGD else "robe_adagrad_update_"]
    assert module.memory_for("t0").weight.grad is None


def test_autograd_grad_of_the_memory_gives_its_gradient_and_no_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """``autograd.grad`` runs no accumulator, so no in-backward step: ``M``'s gradient is returned instead."""
    grads = []
    for kernels in ("fast", "reference"):
        module = robe_module(kernels, monkeypatch)
        memory = module.memory_for("t0").weight
        apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": 0.1})
        before = memory.detach().clone()
        (grad,) = torch.autograd.grad(readout(module(batch(0)).values()), [memory])
        torch.testing.assert_close(memory.detach(), before, rtol=0, atol=0)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_a_backward_to_other_inputs_leaves_the_memory_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    module = robe_module("fast", monkeypatch)
    memory = module.memory_for("t0").weight
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": 0.1})
    scale = torch.tensor(2.0, requires_grad=True)
    before = memory.detach().clone()
    out = module(batch(0)).values()
    readout(scale * out).backward(inputs=[scale])
    torch.testing.assert_close(memory.detach(), before, rtol=0, atol=0)
    torch.testing.assert_close(scale.grad, torch.autograd.grad(readout(scale * out.detach()), [scale])[0])
    assert not fused_step.pending_reads(module.memory_for("t0").weight._in_backward_optimizers[0]).reads
