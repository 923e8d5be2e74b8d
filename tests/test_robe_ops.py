"""ROBE's torch.library custom ops: schema/fake/autograd checks (opcheck), the fused backward + optimizer
path against the unfused reference path, and torch.export through the fake kernels."""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import apply_optimizer_in_backward

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.hashing import hash_coefficients
from torchrec_pss.kernels import ENVIRONMENT_VARIABLE
from torchrec_pss.optim import BlockwiseAdagrad
from torchrec_pss_plugins.robe import ops


def op_inputs(z: int, use_sign: bool, weighted: bool, mean: bool, m: int = 50) -> dict:
    generator = torch.Generator().manual_seed(z * 7 + use_sign)
    lengths = torch.tensor([3, 0, 2, 4])
    ids = torch.randint(0, 2**62, (int(lengths.sum()),), generator=generator)
    return {
        "memory": torch.randn(m, generator=generator),
        "ids": ids,
        "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
        "weights": torch.rand(ids.numel(), generator=generator) if weighted else None,
        "coefficients": hash_coefficients(3, 2),
        "keys": torch.tensor([12345]), "dim": 8, "chunk_size": z, "use_sign": use_sign, "mean": mean,
    }


@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_opcheck_pooled_and_backward(z: int, use_sign: bool, weighted: bool, mean: bool) -> None:
    a = op_inputs(z, use_sign, weighted, mean)
    memory = a["memory"].clone().requires_grad_(True)
    weights = a["weights"].clone().requires_grad_(True) if weighted else None
    args = (memory, a["ids"], a["offsets"], weights, a["coefficients"], a["keys"], a["dim"], z, use_sign, mean,
            False)
    torch.library.opcheck(ops.robe_pooled, args)
    grad = torch.randn(4, 8)
    torch.library.opcheck(ops.robe_pooled_backward, (grad, a["ids"], a["offsets"], a["weights"], a["coefficients"],
                                                     a["keys"], a["memory"].numel(), z, use_sign, mean))
    torch.library.opcheck(ops.robe_sparse_grad, (grad, a["ids"], a["offsets"], a["weights"], a["coefficients"],
                                                 a["keys"], a["memory"].numel(), z, use_sign, mean))
    torch.library.opcheck(ops.robe_weights_grad, (grad, a["memory"], a["ids"], a["offsets"],
                                                  a["coefficients"], a["keys"], z, use_sign, mean))
    torch.library.opcheck(ops.robe_sgd_update_, (a["memory"].clone(), grad, a["ids"], a["offsets"],
                                                 a["weights"], a["coefficients"], a["keys"], z, use_sign, mean,
                                                 0.1))
    torch.library.opcheck(ops.robe_adagrad_update_, (a["memory"].clone(), torch.full((13,), 0.1), grad,
                                                     a["ids"], a["offsets"], a["weights"], a["coefficients"],
                                                     a["keys"], z, use_sign, mean, 0.1, 1e-8, 4))


def test_opcheck_int32_ids() -> None:
    """int32 ids and offsets: the sparse gradient's positions are int64 in every kernel and the fake one."""
    a = op_inputs(4, True, False, False)
    ids, offsets = (a["ids"] % 2**31).to(torch.int32), a["offsets"].to(torch.int32)
    memory = a["memory"].clone().requires_grad_(True)
    torch.library.opcheck(ops.robe_pooled, (memory, ids, offsets, None, a["coefficients"], a["keys"], 8, 4, True,
                                            False, False))
    grad = torch.randn(4, 8)
    torch.library.opcheck(ops.robe_sparse_grad, (grad, ids, offsets, None, a["coefficients"], a["keys"], 50, 4, True,
                                                 False))
    positions, _ = ops.robe_sparse_grad(grad, ids, offsets, None, a["coefficients"], a["keys"], 50, 4, True, False)
    assert positions.dtype == torch.int64


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.01}),
    "blockwise": (BlockwiseAdagrad, {"lr": 0.1}),
}


def trained(optimizer: str, tables: int, use_sign: bool, mean: bool) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=1000, feature_names=[f"f{i}"],
                                  pooling=PoolingType.MEAN if mean else PoolingType.SUM) for i in range(tables)]
    robe = RobeConfig(memory_size=300, chunk_size=4, use_sign=use_sign)
    module = CompressedEmbeddingBagCollection(configs, {c.name: robe for c in configs}, is_weighted=True)
    cls, kwargs = OPTIMIZERS[optimizer]
    apply_optimizer_in_backward(cls, module.parameters(), kwargs)
    for step in range(4):
        rng = random.Random(step)
        bags = {f"f{i}": random_bags(rng, 1000, 8, 5) for i in range(tables)}
        out = module(make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})).values()
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return module


@pytest.mark.parametrize("optimizer,tables", [("sgd", 1), ("sgd", 2), ("adagrad", 1), ("blockwise", 1),
                                              ("adagrad", 2)])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_fused_kernels_train_like_the_reference_path(monkeypatch: pytest.MonkeyPatch, optimizer: str, tables: int,
                                                     use_sign: bool, mean: bool) -> None:
    fast = trained(optimizer, tables, use_sign, mean)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "reference")
    slow = trained(optimizer, tables, use_sign, mean)
    memory = "pss_memories.robe_default.weight"
    assert fast.pss_memories["robe_default"].weight.grad is None
    torch.testing.assert_close(fast.state_dict()[memory], slow.state_dict()[memory], rtol=1e-5, atol=1e-6)
    fast_state, slow_state = fast.fused_optimizer.state_dict()["state"], slow.fused_optimizer.state_dict()["state"]
    for name, value in slow_state[memory].items():
        torch.testing.assert_close(torch.as_tensor(fast_state[memory][name]), torch.as_tensor(value), rtol=1e-5,
                                   atol=1e-6)


def test_in_place_updates_of_a_strided_memory_or_accumulator_take_the_reference(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused update ops write flat arrays: a strided ``memory`` / ``accumulator`` (a view of every other
    element) takes the reference kernel and gets the reference's update in place (the C++ kernel refused it)."""
    coefficients, keys = hash_coefficients(3, 2), torch.tensor([7])
    ids, offsets = torch.tensor([1, 5, 9, 5]), torch.tensor([0, 3, 4])
    grad = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    start = torch.randn(2 * 101, generator=torch.Generator().manual_seed(1))
    results = {}
    for kernels in ("reference", "fast"):
        monkeypatch.setenv(ENVIRONMENT_VARIABLE, kernels)
        memory, accumulator = start.clone(), torch.zeros(2 * 101)
        ops.robe_sgd_update_(memory[::2], grad, ids, offsets, None, coefficients, keys, 4, True, False, 0.1)
        ops.robe_adagrad_update_(memory[1::2], accumulator[::2], grad, ids, offsets, None, coefficients, keys, 4, True,
                                 False, 0.1, 1e-8, 1)
        results[kernels] = (memory, accumulator)
    for got, expected in zip(results["fast"], results["reference"]):
        assert torch.equal(got, expected)
    assert not torch.equal(results["fast"][0], start) and results["fast"][1][1::2].eq(0).all()


def test_bad_kernel_switch_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "fastest")
    with pytest.raises(ValueError, match="TORCHREC_PSS_KERNELS='fastest'"):
        trained("sgd", 1, False, False)


def test_export_and_compile_trace_the_ops() -> None:
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=1000, feature_names=["f0"])]
    memory = CompressedEmbeddingBagCollection(configs, {"t0": RobeConfig(memory_size=300, chunk_size=4)}).pss_memories[
        "robe_default"]

    class Lookup(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.memory = memory

        def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return self.memory.pooled("t0", ids, lengths, None, mean=False)

    ids, lengths = torch.tensor([1, 5, 999, 3, 3]), torch.tensor([2, 0, 3])
    lookup = Lookup().eval()
    with torch.no_grad():
        expected = lookup(ids, lengths)
        exported = torch.export.export(lookup, (ids, lengths))
        assert any("torchrec_pss.robe_pooled" in str(node.target) for node in exported.graph.nodes)
        torch.testing.assert_close(exported.module()(ids, lengths), expected)
        torch.testing.assert_close(torch.compile(lookup, backend="aot_eager")(ids, lengths), expected)
