"""QR, TT, MLET and the hashing trick behind the PSS contract: reference parity, gradients, bytes."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
from typing import Callable

import pytest
import torch
from torch.func import functional_call
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

import reference
from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig, MLETConfig, QRConfig, TTConfig
from torchrec_pss.contract import BagRequest

D = 8

CASES: dict[str, object] = {
    "qr_mult": QRConfig(collisions=4, operation="mult"),
    "qr_add": QRConfig(collisions=5, operation="add"),
    "qr_concat": QRConfig(collisions=3, operation="concat"),
    "qr_three_parts": QRConfig(collisions=3, num_partitions=3),
    "tt_3cores": TTConfig(ranks=3, num_cores=3),
    "tt_2cores": TTConfig(ranks=4, num_cores=2, init="normal"),
    "tt_4cores": TTConfig(ranks=(2, 3, 2), num_cores=4, p_shapes=(2, 2, 3, 4), q_shapes=(2, 1, 2, 2), init="uniform"),
    "mlet": MLETConfig(inner_dim=12),
    "hashing": HashingConfig(num_buckets=7),
}


def embed_of(memory, table: str) -> reference.Embed:
    """The reference embedding function for ``table`` read off ``memory``'s parameters."""
    kind = type(memory).name
    if kind == "qr":
        return reference.qr_embedding([p.detach() for p in memory.parts], memory.collisions, memory.config.operation)
    if kind == "tt":
        return reference.tt_embedding([c.detach() for c in memory.cores], list(memory.shapes.p_shapes),
                                      list(memory.shapes.q_shapes))
    if kind == "mlet":
        return reference.mlet_embedding(memory.w1.detach(), memory.w2.detach())
    return reference.hashing_embedding(memory.weight.detach(), memory.hash_coefficients, table)


def tables(pooling: PoolingType = PoolingType.SUM) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=D, num_embeddings=40, feature_names=["f1", "f2"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=D, num_embeddings=30, feature_names=["f3"], pooling=pooling),
        EmbeddingBagConfig(name="plain", embedding_dim=D, num_embeddings=10, feature_names=["f4"], pooling=pooling),
    ]


def build(case: str, pooling: PoolingType = PoolingType.SUM, weighted: bool = False) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    config = CASES[case]
    return CompressedEmbeddingBagCollection(tables(pooling), {"t1": config, "t2": config}, is_weighted=weighted)


def batch(seed: int, weighted: bool):
    rng = random.Random(seed)
    bags = {f: random_bags(rng, n, batch=5, max_len=4) for f, n in {"f1": 40, "f2": 40, "f3": 30, "f4": 10}.items()}
    weights = {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None
    return bags, weights


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_matches_reference(case: str, pooling: PoolingType, weighted: bool) -> None:
    module = build(case, pooling, weighted)
    bags, weights = batch(len(case), weighted)
    out = module(make_kjt(bags, weights)).to_dict()
    for feature, table in {"f1": "t1", "f2": "t1", "f3": "t2"}.items():
        expected = reference.pooled(embed_of(module.memory_for(table), table), D, bags[feature],
                                    None if weights is None else weights[feature], mean=pooling == PoolingType.MEAN)
        torch.testing.assert_close(out[feature].double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.all(out[feature][0] == 0), "empty bag must pool to zeros"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_gradcheck(case: str, pooling: PoolingType) -> None:
    """Gradients of the memories and of the per-sample weights against finite differences (the compressed
    features' outputs: the plain table pools in float32, as torchrec's EBC does, too coarse for them)."""
    module = build(case, pooling, weighted=True).double()
    names = [n for n, _ in module.named_parameters() if n.startswith("pss_memories.")]
    start = tuple(module.get_parameter(n).detach().clone().requires_grad_(True) for n in names)
    bags, weights = batch(7, True)
    kjt = make_kjt(bags, weights)
    sample_weights = kjt.weights().double().requires_grad_(True)

    def f(*inputs: torch.Tensor) -> torch.Tensor:
        *params, w = inputs
        features = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=w)
        out = functional_call(module, dict(zip(names, params)), (features,)).to_dict()
        return torch.cat([out[f] for f in ("f1", "f2", "f3")], dim=1)

    assert torch.autograd.gradcheck(f, (*start, sample_weights))


STORED: dict[str, Callable[[object, EmbeddingBagConfig], int]] = {
    "qr": lambda m, t: 4 * sum(p.shape[0] * p.shape[1] for p in m.parts),
    "tt": lambda m, t: 4 * sum(math.prod(c.shape) for c in m.cores),
    "mlet": lambda m, t: 4 * (t.num_embeddings * m.config.inner_dim + m.config.inner_dim * t.embedding_dim),
    "hashing": lambda m, t: 4 * m.config.num_buckets * t.embedding_dim + 4 * 8,
}


@pytest.mark.parametrize("case", CASES)
def test_bytes_are_what_is_stored(case: str) -> None:
    module = build(case)
    for table in tables()[:2]:
        memory = module.memory_for(table.name)
        stored = sum(t.numel() * t.element_size() for t in memory.state_dict().values())
        assert memory.num_bytes() == stored == STORED[type(memory).name](memory, table)
    assert module.num_bytes()["plain"] == 10 * D * 4


@pytest.mark.parametrize("case", CASES)
def test_state_dict_round_trip(case: str) -> None:
    source, target = build(case), build(case)
    with torch.no_grad():
        for p in source.parameters():
            p.mul_(1.5).add_(0.01)
    target.load_state_dict(source.state_dict())
    kjt = make_kjt(*batch(3, False))
    assert torch.equal(target(kjt).values(), source(kjt).values())


SPARSE_CASES = {
    "qr": lambda gradient: QRConfig(collisions=4, gradient=gradient),
    "mlet": lambda gradient: MLETConfig(inner_dim=6, gradient=gradient),
    "hashing": lambda gradient: HashingConfig(num_buckets=7, gradient=gradient),
}


@pytest.mark.parametrize("case", SPARSE_CASES)
def test_sparse_and_dense_gradients_give_the_same_sgd_steps(case: str) -> None:
    modules = {}
    for gradient in ("dense", "sparse"):
        torch.manual_seed(0)
        config = SPARSE_CASES[case](gradient)
        modules[gradient] = CompressedEmbeddingBagCollection(tables(), {"t1": config, "t2": config}).double()
    optimizers = {g: torch.optim.SGD(m.parameters(), lr=0.1) for g, m in modules.items()}
    for step in range(3):
        kjt = make_kjt(*batch(step, False))
        for gradient, module in modules.items():
            optimizers[gradient].zero_grad()
            module(kjt).values().pow(2).sum().backward()
            optimizers[gradient].step()
    sparse_grads = [p.grad for p in modules["sparse"].parameters() if p.grad is not None and p.grad.is_sparse]
    assert sparse_grads, "the sparse mode must produce sparse gradients"
    for (name, dense), sparse in zip(modules["dense"].named_parameters(), modules["sparse"].parameters()):
        torch.testing.assert_close(sparse, dense, rtol=1e-12, atol=1e-12, msg=name)


AUTO_CASES = {
    "qr": lambda: QRConfig(collisions=4, gradient="auto"),
    "mlet": lambda: MLETConfig(inner_dim=6, gradient="auto"),
    "hashing": lambda: HashingConfig(compression=2, gradient="auto"),
}


@pytest.mark.parametrize("case", AUTO_CASES)
def test_auto_gradient_picks_sparse_for_large_memories_only(case: str) -> None:
    config = AUTO_CASES[case]()
    small = [EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=20, feature_names=["f"])]
    large = [EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=400_000, feature_names=["f"])]
    kjt = make_kjt({"f": [[1, 2], [3]]})
    layouts = {}
    for name, tables_ in (("small", small), ("large", large)):
        module = CompressedEmbeddingBagCollection(tables_, {"t": config})
        module(kjt).values().sum().backward()
        largest = max(module.memory_for("t").parameters(), key=lambda p: p.numel())
        layouts[name] = largest.grad.is_sparse
    assert layouts == {"small": False, "large": True}


def layouts_given_to_updates(module: CompressedEmbeddingBagCollection, kjt) -> dict[str, bool]:
    """One training step; whether each memory parameter's in-backward update got a sparse gradient."""
    seen: dict[str, bool] = {}
    module(kjt)  # adopts the in-backward optimizers as FusedUpdates
    for name, param in module.named_parameters():
        update = param._in_backward_optimizers[0]
        apply = update.apply
        update.apply = lambda grad, name=name, apply=apply: seen.__setitem__(name, grad.is_sparse) or apply(grad)
    module(kjt).values().sum().backward()
    return seen


@pytest.mark.parametrize("case", AUTO_CASES)
def test_layout_free_fused_updates_follow_the_auto_rule(case: str) -> None:
    """gradient="dense" on a 400k-row table: with an in-backward SGD (same step for either layout) the memory
    gets the sparse gradient the auto rule picks; with Adam (whose sparse step is lazy) it keeps the dense one;
    and the SGD step equals the unfused dense one."""
    config = dataclasses.replace(AUTO_CASES[case](), gradient="dense")
    large = [EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=400_000, feature_names=["f"])]
    kjt = make_kjt({"f": [[1, 2], [399_999]]})
    torch.manual_seed(0)
    fused = CompressedEmbeddingBagCollection(large, {"t": config}).double()
    plain = copy.deepcopy(fused)
    apply_optimizer_in_backward(torch.optim.SGD, fused.parameters(), {"lr": 0.1})
    largest = "pss_memories." + max(fused.pss_memories.named_parameters(), key=lambda p: p[1].numel())[0]
    assert layouts_given_to_updates(fused, kjt)[largest]
    optimizer = torch.optim.SGD(plain.parameters(), lr=0.1)
    for _ in range(2):
        plain(kjt).values().sum().backward()
        assert not plain.get_parameter(largest).grad.is_sparse
        optimizer.step()
        optimizer.zero_grad()
    fused(kjt).values().sum().backward()  # its second step (the first ran in layouts_given_to_updates)
    for (name, got), want in zip(fused.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    adam = CompressedEmbeddingBagCollection(large, {"t": config})
    apply_optimizer_in_backward(torch.optim.Adam, adam.parameters(), {"lr": 0.1})
    assert not layouts_given_to_updates(adam, kjt)[largest]


def test_bag_request_offsets_are_computed_only_when_not_given() -> None:
    lengths = torch.tensor([2, 0, 3])
    request = BagRequest("t", torch.arange(5), lengths, None, False)
    assert request.bag_offsets().tolist() == [0, 2, 2, 5]
    given = torch.tensor([0, 2, 2, 5])
    assert request._replace(offsets=given).bag_offsets() is given
