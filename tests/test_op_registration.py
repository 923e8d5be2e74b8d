"""The ops' registration (torchrec_pss.kernels.define_op / register_autograd): autograd through list inputs,
version counters of in-place ops, a compiled training step through the autograd kernel, and the module's
cached parameter list after parameters are swapped."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward

from helpers import make_kjt
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.hashing import hash_coefficients
from torchrec_pss.optim import FusedUpdate
from torchrec_pss_plugins.qr import ops as qr_ops
from torchrec_pss_plugins.qr import reference as qr_reference
from torchrec_pss_plugins.robe import ops as robe_ops

IDS = torch.tensor([3, 17, 5, 0, 22, 9, 11])
OFFSETS = torch.tensor([0, 3, 3, 7])
COEFFICIENTS, KEYS = hash_coefficients(5, 2), torch.tensor([77])


def robe_args(memory: torch.Tensor, weights: torch.Tensor | None) -> tuple:
    return (memory, IDS, OFFSETS, weights, COEFFICIENTS, KEYS, 8, 4, True, False, False)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, True, True)])
def test_list_input_gradients_match_autograd_of_the_reference(needs: tuple[bool, bool, bool]) -> None:
    generator = torch.Generator().manual_seed(1)
    parts = [torch.randn(5, 4, generator=generator), torch.randn(5, 4, generator=generator)]
    weights = torch.rand(IDS.numel(), generator=generator)
    mine = [parts[0].clone().requires_grad_(needs[0]), parts[1].clone().requires_grad_(needs[1])]
    theirs = [parts[0].clone().requires_grad_(needs[0]), parts[1].clone().requires_grad_(needs[1])]
    my_weights, their_weights = weights.clone().requires_grad_(needs[2]), weights.clone().requires_grad_(needs[2])
    grad = torch.randn(3, 4, generator=generator)
    (qr_ops.qr_pooled(mine, IDS, OFFSETS, my_weights, 5, "mult", False, [False, False]) * grad).sum().backward()
    (qr_reference.pooled_forward(theirs, IDS, OFFSETS, their_weights, 5, "mult", False) * grad).sum().backward()
    for a, b in ((mine[0], theirs[0]), (mine[1], theirs[1]), (my_weights, their_weights)):
        if b.requires_grad:
            torch.testing.assert_close(a.grad, b.grad)
        else:
            assert a.grad is None


def test_an_in_place_update_of_a_saved_memory_is_caught_by_autograd() -> None:
    memory = torch.randn(64, requires_grad=True)
    pooled = robe_ops.robe_pooled(*robe_args(memory, None))
    version = memory._version
    with torch.no_grad():
        robe_ops.robe_sgd_update_(memory, torch.ones(3, 8), IDS, OFFSETS, None, COEFFICIENTS, KEYS, 4, True, False, 0.1)
    assert memory._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pooled.sum().backward()


def test_adagrad_update_bumps_memory_and_accumulator_versions() -> None:
    memory, accumulator = torch.randn(64), torch.zeros(16)
    versions = memory._version, accumulator._version
    robe_ops.robe_adagrad_update_(memory, accumulator, torch.ones(3, 8), IDS, OFFSETS, None, COEFFICIENTS, KEYS, 4,
                                  True, False, 0.1, 1e-8, 4)
    assert memory._version > versions[0] and accumulator._version > versions[1]


def test_a_compiled_training_step_through_the_op_matches_eager() -> None:
    generator = torch.Generator().manual_seed(2)
    memory, weights = torch.randn(64, generator=generator), torch.rand(IDS.numel(), generator=generator)
    grad = torch.randn(3, 8, generator=generator)

    def loss(m: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (robe_ops.robe_pooled(*robe_args(m, w)) * grad).sum()

    eager = [memory.clone().requires_grad_(), weights.clone().requires_grad_()]
    compiled = [memory.clone().requires_grad_(), weights.clone().requires_grad_()]
    loss(*eager).backward()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(*compiled).backward()
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_parameters_swapped_by_load_state_dict_get_the_fused_update() -> None:
    table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["f"])
    module = CompressedEmbeddingBagCollection([table], {"t": RobeConfig(memory_size=64, chunk_size=4)},
                                              validate_inputs=False)
    kjt = make_kjt({"f": [[1, 2], [3]]})
    module(kjt)  # caches the parameter list
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in module.state_dict().items()}
    parent = torch.nn.ModuleDict({"ebc": module})  # loading through a parent calls the module's hooks only
    parent.load_state_dict({f"ebc.{k}": v for k, v in state.items()}, assign=True)
    weight = module.pss_memories["robe_default"].weight
    assert weight is not None and weight.data_ptr() == state["pss_memories.robe_default.weight"].data_ptr()
    apply_optimizer_in_backward(torch.optim.SGD, [weight], {"lr": 0.1})
    before = weight.detach().clone()
    module(kjt).values().sum().backward()
    assert isinstance(weight._in_backward_optimizers[0], FusedUpdate)
    assert weight.grad is None and not torch.equal(weight.detach(), before)
