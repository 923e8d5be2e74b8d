"""ROBE-Z gradients: gradcheck (dense), finite differences (sparse), dense vs sparse SGD steps."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from helpers import assert_coalesced_rows_of, make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, QRConfig, RobeConfig
from torchrec_pss.gradient_layout import keep_coalesced_flag

KEY = "pss_memories.robe_default.weight"


def build(z: int, use_sign: bool, gradient: str, pooling=PoolingType.SUM, memory_size: int = 40):
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=20, feature_names=["f1", "f2"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=10, feature_names=["f3"], pooling=pooling),
    ]
    config = RobeConfig(memory_size=memory_size, chunk_size=z, use_sign=use_sign, gradient=gradient, seed=1)
    return CompressedEmbeddingBagCollection(tables, {"t1": config, "t2": config}, is_weighted=True)


def batch(seed: int):
    rng = random.Random(seed)
    bags = {f: random_bags(rng, n, batch=4, max_len=5) for f, n in {"f1": 20, "f2": 20, "f3": 10}.items()}
    return make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})


def forward_of(module, kjt):
    return lambda weight: functional_call(module, {KEY: weight}, (kjt,)).values()


@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_dense_gradcheck(z: int, use_sign: bool, pooling: PoolingType) -> None:
    module = build(z, use_sign, "dense", pooling).double()
    weight = module.pss_memories["robe_default"].weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(forward_of(module, batch(z)), (weight,))


def test_per_sample_weights_gradcheck() -> None:
    module = build(4, False, "dense").double()
    kjt = batch(7)
    base = kjt.weights().double()

    def f(weights: torch.Tensor) -> torch.Tensor:
        with_weights = type(kjt)(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(), weights=weights)
        return module(with_weights).values()

    assert torch.autograd.gradcheck(f, (base.clone().requires_grad_(True),))


class _SparseToDense(torch.autograd.Function):
    """Identity whose backward densifies a sparse gradient, so gradcheck can read it."""

    @staticmethod
    def forward(ctx, weight):
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        assert grad.is_sparse, "the sparse mode must produce a sparse gradient"
        return grad.to_dense()


@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_sparse_gradcheck(z: int, use_sign: bool, pooling: PoolingType) -> None:
    module = build(z, use_sign, "sparse", pooling).double()
    weight = module.pss_memories["robe_default"].weight.detach().clone().requires_grad_(True)
    f = forward_of(module, batch(z + 20))
    assert torch.autograd.gradcheck(lambda w: f(_SparseToDense.apply(w)), (weight,))


@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("use_sign", [False, True])
def test_sparse_gradient_matches_finite_differences(z: int, use_sign: bool) -> None:
    module = build(z, use_sign, "sparse").double()
    weight = module.pss_memories["robe_default"].weight.detach().clone().requires_grad_(True)
    f = forward_of(module, batch(z + 10))
    probe = torch.randn_like(f(weight))
    (f(weight) * probe).sum().backward()
    assert weight.grad.is_sparse
    grad = weight.grad.coalesce()  # two tables read the memory: autograd sums two sparse gradients
    analytic = grad.to_dense()
    eps = 1e-6
    numeric = torch.empty_like(weight)
    with torch.no_grad():
        for j in range(weight.numel()):
            step = torch.zeros_like(weight)
            step[j] = eps
            numeric[j] = ((f(weight + step) - f(weight - step)) * probe).sum() / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-8)
    touched = analytic.nonzero().squeeze(1)
    assert torch.equal(grad.indices()[0], touched), "sparse gradient must hold the touched positions"


@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("use_sign", [False, True])
def test_dense_and_sparse_sgd_steps_agree(z: int, use_sign: bool) -> None:
    """Same updates up to summation order (float64, so order effects stay below 1e-12)."""
    dense, sparse = build(z, use_sign, "dense").double(), build(z, use_sign, "sparse").double()
    sparse.load_state_dict(dense.state_dict())
    initial = dense.pss_memories["robe_default"].weight.detach().clone()
    opt_dense = torch.optim.SGD(dense.parameters(), lr=0.1)
    opt_sparse = torch.optim.SGD(sparse.parameters(), lr=0.1)
    for step in range(5):
        kjt = batch(100 + step)
        for module, opt in ((dense, opt_dense), (sparse, opt_sparse)):
            opt.zero_grad()
            module(kjt).values().pow(2).sum().backward()
            opt.step()
    torch.testing.assert_close(
        sparse.pss_memories["robe_default"].weight, dense.pss_memories["robe_default"].weight, rtol=1e-12, atol=1e-12
    )
    assert not torch.equal(dense.pss_memories["robe_default"].weight, initial), "the steps must move the memory"


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("z", [1, 4, 16])
@pytest.mark.parametrize("use_sign", [False, True])
def test_sparse_gradient_is_coalesced_and_equals_the_dense_one(kernels: str, z: int, use_sign: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 (the C++ kernels, or the reference): the memory's ``.grad`` keeps the coalesced flag that
    ``robe_pooled``'s backward set (torch's AccumulateGrad drops it) and holds the dense gradient's touched positions."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    dense, sparse = build(z, use_sign, "dense", memory_size=1000), build(z, use_sign, "sparse", memory_size=1000)
    sparse.load_state_dict(dense.state_dict())
    kjt = batch(z + 40)
    for module in (dense, sparse):
        module(kjt).values().pow(2).sum().backward()
    assert_coalesced_rows_of(sparse.pss_memories["robe_default"].weight.grad,
                             dense.pss_memories["robe_default"].weight.grad)
    copied = copy.deepcopy(sparse)  # the copy's parameter has none of the original's hooks
    copied(kjt).values().pow(2).sum().backward()
    assert_coalesced_rows_of(copied.pss_memories["robe_default"].weight.grad,
                             dense.pss_memories["robe_default"].weight.grad)


class _SparseGrad(torch.autograd.Function):
    """``weight.sum()`` whose backward gives ``weight`` ones at ``rows`` (duplicates allowed), flagged ``coalesced``."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: torch.Tensor, coalesced: bool) -> torch.Tensor:
        ctx.rows, ctx.coalesced, ctx.shape = rows, coalesced, weight.shape
        return weight.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        values = grad.expand(ctx.rows.numel()).clone()
        return torch.sparse_coo_tensor(ctx.rows.unsqueeze(0), values, ctx.shape, is_coalesced=ctx.coalesced,
                                       check_invariants=False), None, None


def test_keep_coalesced_flag_restores_only_a_coalesced_incoming_gradient() -> None:
    weight = nn.Parameter(torch.zeros(6))
    keep_coalesced_flag(weight)
    _SparseGrad.apply(weight, torch.tensor([4, 1, 4]), False).backward()
    assert not weight.grad.is_coalesced()
    weight.grad = None
    _SparseGrad.apply(weight, torch.tensor([1, 4]), True).backward()
    assert weight.grad.is_coalesced() and weight.grad.indices()[0].tolist() == [1, 4]
    _SparseGrad.apply(weight, torch.tensor([1, 1, 5]), False).backward()  # torch sums it into .grad
    assert not weight.grad.is_coalesced()
    assert weight.grad.coalesce().to_dense().tolist() == [0.0, 3.0, 0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("serving", [torch.no_grad, torch.inference_mode])
def test_a_serving_forward_adds_no_gradient_hooks(serving: type) -> None:
    """Sparse-gradient ROBE and QR register their coalesced-flag hooks in a forward that records a backward only."""
    tables = [EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=100, feature_names=[f"f{n}"]) for n in "ab"]
    module = CompressedEmbeddingBagCollection(tables, {"a": RobeConfig(compression=4, chunk_size=4, gradient="sparse"),
                                                       "b": QRConfig(collisions=10, gradient="sparse")})
    bags = {"fa": [[1, 2], [3]], "fb": [[4], [5, 6]]}

    def hooked() -> list[str]:
        return [n for n, p in module.named_parameters() if p._backward_hooks or p._post_accumulate_grad_hooks]

    with serving():
        module(make_kjt(bags))
    assert hooked() == []
    module(make_kjt(bags)).values().sum().backward()  # a new KJT: one used in inference mode caches its offsets
    assert sorted(hooked()) == sorted(n for n, _ in module.named_parameters())


def test_auto_gradient_layout_rule() -> None:
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10**6, feature_names=["f"])]
    kjt = make_kjt({"f": [[1, 2, 3], [4]]})  # touches 4 ids x 8 = 32 elements
    at_threshold = RobeConfig(memory_size=8 * 32, gradient="auto", auto_dense_ratio=8.0)
    above = RobeConfig(memory_size=8 * 32 + 1, gradient="auto", auto_dense_ratio=8.0)
    small = CompressedEmbeddingBagCollection(tables, {"t": at_threshold})
    large = CompressedEmbeddingBagCollection(tables, {"t": above})
    small(kjt).values().sum().backward()
    large(kjt).values().sum().backward()
    assert not small.pss_memories["robe_default"].weight.grad.is_sparse
    assert large.pss_memories["robe_default"].weight.grad.is_sparse
