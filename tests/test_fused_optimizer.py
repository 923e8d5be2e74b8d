"""Fused (in-backward) optimizers: parity with the unfused optimizers, dense vs sparse, state, LR."""

from __future__ import annotations

import gc
import random
import weakref

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig, MLETConfig, QRConfig, RobeConfig, TTConfig
from torchrec_pss.optim import BlockwiseAdagrad, release_in_backward_optimizers

METHODS = {
    "robe_dense": lambda: RobeConfig(memory_size=96, chunk_size=4, gradient="dense"),
    "robe_sparse": lambda: RobeConfig(memory_size=96, chunk_size=4, gradient="sparse"),
    "qr_dense": lambda: QRConfig(collisions=4),
    "qr_sparse": lambda: QRConfig(collisions=4, gradient="sparse"),
    "tt": lambda: TTConfig(ranks=3),
    "mlet_dense": lambda: MLETConfig(inner_dim=6),
    "mlet_sparse": lambda: MLETConfig(inner_dim=6, gradient="sparse"),
    "hashing_dense": lambda: HashingConfig(num_buckets=7),
    "hashing_sparse": lambda: HashingConfig(num_buckets=7, gradient="sparse"),
}
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.01}),
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "rowwise_adagrad": (BlockwiseAdagrad, {"lr": 0.1}),
}


def build(method: str, dtype: torch.dtype = torch.float32) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=40, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=30, feature_names=["f3"]),
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=10, feature_names=["f4"]),
    ]
    config = METHODS[method]()
    return CompressedEmbeddingBagCollection(tables, {"t1": config, "t2": config}, is_weighted=True).to(dtype)


EMPTY_STEP = 100
"""The step whose batch gives the compressed tables' features (f1-f3) no ids at all."""


def batch(step: int):
    rng = random.Random(step)
    bags = {f: random_bags(rng, n, batch=6, max_len=4) for f, n in {"f1": 40, "f2": 40, "f3": 30, "f4": 10}.items()}
    if step == EMPTY_STEP:
        bags.update({f: [[] for _ in range(6)] for f in ("f1", "f2", "f3")})
    return make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})


def loss_of(module, step: int) -> torch.Tensor:
    out = module(batch(step)).values()
    probe = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out * probe).sum() + out.pow(2).sum()


def fused(method: str, optimizer: str, dtype: torch.dtype = torch.float32) -> CompressedEmbeddingBagCollection:
    module = build(method, dtype)
    cls, kwargs = OPTIMIZERS[optimizer]
    apply_optimizer_in_backward(cls, module.parameters(), kwargs)
    return module


class UnfusedReference:
    """``loss.backward()`` then the unfused optimizer, one per parameter (SparseAdam for sparse Adam
    gradients; RowWiseAdagrad on a ``[blocks, block]`` shadow of each parameter)."""

    def __init__(self, module: CompressedEmbeddingBagCollection, optimizer: str, blocks: dict[str, int]) -> None:
        self.module, self.optimizer, self.blocks = module, optimizer, blocks
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.shadows: dict[str, torch.nn.Parameter] = {}

    def _optimizer_for(self, name: str, param: torch.nn.Parameter) -> torch.optim.Optimizer:
        if name not in self.optimizers:
            cls, kwargs = OPTIMIZERS[self.optimizer]
            if cls is BlockwiseAdagrad:
                cls = RowWiseAdagrad  # TorchRec's, on a [blocks, block] shadow: an independent implementation
                self.shadows[name] = torch.nn.Parameter(param.detach().clone().view(-1, self.blocks[name]))
                param = self.shadows[name]
            elif cls is torch.optim.Adam and param.grad.is_sparse:
                cls = torch.optim.SparseAdam
            self.optimizers[name] = cls([param], **kwargs)
        return self.optimizers[name]

    def step(self, step: int) -> None:
        self.module.zero_grad(set_to_none=True)
        loss_of(self.module, step).backward()
        for name, param in self.module.named_parameters():
            if param.grad is None:
                continue
            optimizer = self._optimizer_for(name, param)
            if name in self.shadows:
                shadow = self.shadows[name]
                shadow.grad = param.grad.to_dense().view_as(shadow)
                optimizer.step()
                with torch.no_grad():
                    param.copy_(shadow.view_as(param))
            else:
                optimizer.step()

    def state(self, name: str) -> dict:
        optimizer = self.optimizers[name]
        return optimizer.state[optimizer.param_groups[0]["params"][0]]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_fused_steps_equal_unfused_steps(method: str, optimizer: str) -> None:
    module = fused(method, optimizer)
    fused_optimizer = module.fused_optimizer
    blocks = {name: update.row_size for name, update in module._fused_updates.items()}
    reference = UnfusedReference(build(method), optimizer, blocks)
    for step in range(3):
        loss_of(module, step).backward()
        reference.step(step)
        assert all(p.grad is None for p in module.parameters()), "fused parameters keep no gradient"
    state = fused_optimizer.state_dict()["state"]
    # float32 kernels on both sides, summing a position's contributions in different orders (the fused scatter id
    # by id, the sparse gradient run start by run start): Adagrad's division brings such rounding to ~1e-7.
    tolerance = {"rtol": 1e-5, "atol": 1e-6}
    for (name, param), expected in zip(module.named_parameters(), reference.module.parameters()):
        torch.testing.assert_close(param, expected, **tolerance, msg=name)
        for key in ("sum", "exp_avg", "exp_avg_sq"):
            if key in state[name]:
                torch.testing.assert_close(state[name][key], reference.state(name)[key], **tolerance,
                                           msg=f"{name} {key}")


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("method", METHODS)
def test_a_batch_without_ids_for_the_compressed_tables_steps_as_unfused(method: str, optimizer: str) -> None:
    """A step whose batch reads no id of the compressed tables (an empty sparse gradient: BlockwiseAdagrad once
    failed to reshape it) steps as the unfused optimizers do, before and after steps with ids."""
    module = fused(method, optimizer)
    assert module.fused_optimizer is not None  # builds every parameter's update
    blocks = {name: update.row_size for name, update in module._fused_updates.items()}
    reference = UnfusedReference(build(method), optimizer, blocks)
    for step in (0, EMPTY_STEP, 1):
        loss_of(module, step).backward()
        reference.step(step)
    for (name, param), expected in zip(module.named_parameters(), reference.module.parameters()):
        torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("method", ["robe", "qr", "mlet", "hashing"])
def test_dense_and_sparse_fused_paths_agree(method: str, optimizer: str) -> None:
    dense, sparse = fused(f"{method}_dense", optimizer, torch.float64), fused(f"{method}_sparse", optimizer, torch.float64)
    for step in range(3):
        loss_of(dense, step).backward()
        loss_of(sparse, step).backward()
    untrained = build(f"{method}_dense", torch.float64)
    for (name, a), b, start in zip(dense.named_parameters(), sparse.parameters(), untrained.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=name)
        assert not torch.equal(a, start), f"training must move {name}"


@pytest.mark.parametrize("optimizer", ["adagrad", "adam", "rowwise_adagrad"])
def test_state_dict_round_trip_mid_training_continues_identically(optimizer: str) -> None:
    original = fused("robe_sparse", optimizer)
    for step in range(2):
        loss_of(original, step).backward()
    model_state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in original.state_dict().items()}
    optimizer_state = original.fused_optimizer.state_dict()
    optimizer_state = {"state": {k: {n: t.clone() for n, t in s.items()} for k, s in optimizer_state["state"].items()}}
    restored = fused("robe_sparse", optimizer)
    restored.load_state_dict(model_state)
    restored.fused_optimizer.load_state_dict(optimizer_state)  # before its first step: state exists eagerly
    for step in range(2, 4):
        loss_of(original, step).backward()
        loss_of(restored, step).backward()
    for (name, a), b in zip(original.named_parameters(), restored.parameters()):
        assert torch.equal(a, b), name


def test_blockwise_adagrad_as_an_ordinary_optimizer_resumes_from_its_state_dict() -> None:
    """``load_state_dict`` of a standalone BlockwiseAdagrad: the loaded accumulators and groups are the ones its
    steps use (torch replaces the dicts its updates were built on), so a resume equals the uninterrupted run and
    a later change of the learning rate takes effect."""
    def train(param: torch.nn.Parameter, optimizer: torch.optim.Optimizer, steps: range) -> None:
        for step in steps:
            param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(step))
            optimizer.step()

    start = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    whole = torch.nn.Parameter(start.clone())
    optimizer = BlockwiseAdagrad([whole], lr=0.1)
    train(whole, optimizer, range(3))
    saved, halfway = optimizer.state_dict(), whole.detach().clone()
    saved = {"state": {k: {n: t.clone() for n, t in v.items()} for k, v in saved["state"].items()},
             "param_groups": saved["param_groups"]}
    train(whole, optimizer, range(3, 6))
    resumed = torch.nn.Parameter(halfway)
    optimizer = BlockwiseAdagrad([resumed], lr=0.1)
    optimizer.load_state_dict(saved)
    train(resumed, optimizer, range(3, 6))
    assert torch.equal(resumed, whole)
    optimizer.param_groups[0]["lr"] = 0.0
    before = resumed.detach().clone()
    train(resumed, optimizer, range(6, 7))
    assert torch.equal(resumed, before)


def test_lr_changes_take_effect_on_the_next_step() -> None:
    module = fused("robe_dense", "adagrad")
    optimizer = module.fused_optimizer
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    before = [p.detach().clone() for p in module.parameters()]
    loss_of(module, 0).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters())), "lr 0 must not move anything"
    for group in optimizer.param_groups:
        group["lr"] = 0.1
    loss_of(module, 1).backward()
    assert not any(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_combined_optimizer_and_scheduler_drive_the_fused_lr() -> None:
    module = fused("robe_dense", "sgd")
    dense_param = torch.nn.Parameter(torch.ones(3))
    combined = CombinedOptimizer([
        ("embeddings", module.fused_optimizer),
        ("dense", KeyedOptimizerWrapper({"w": dense_param}, lambda params: torch.optim.SGD(params, lr=0.1))),
    ])
    assert set(combined.state_dict()["state"]) >= {"embeddings.pss_memories.robe_default.weight"}
    scheduler = torch.optim.lr_scheduler.LambdaLR(combined, lr_lambda=lambda epoch: 0.0 if epoch >= 1 else 1.0)
    loss_of(module, 0).backward()
    combined.step()
    scheduler.step()
    assert all(group["lr"] == 0.0 for group in module.fused_optimizer.param_groups)
    before = [p.detach().clone() for p in module.parameters()]
    loss_of(module, 1).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_hyperparameters_that_leave_the_update_unchanged_are_accepted() -> None:
    """``foreach`` / ``fused`` (how torch's own step runs) and Adam's ``decoupled_weight_decay=False`` give the
    plain steps; a value that changes the update is still refused."""
    plain, flagged = fused("robe_sparse", "adam"), build("robe_sparse")
    apply_optimizer_in_backward(torch.optim.Adam, flagged.parameters(),
                                {"lr": 0.01, "foreach": True, "fused": False, "decoupled_weight_decay": False})
    for step in range(2):
        loss_of(plain, step).backward()
        loss_of(flagged, step).backward()
    for (name, a), b in zip(plain.named_parameters(), flagged.parameters()):
        assert torch.equal(a, b), name
    refused = build("robe_sparse")
    apply_optimizer_in_backward(torch.optim.Adam, refused.parameters(), {"lr": 0.01, "decoupled_weight_decay": True})
    with pytest.raises(ValueError, match=r"Adam\(decoupled_weight_decay=True\) is not supported"):
        refused.fused_optimizer


def test_unsupported_optimizers_are_refused() -> None:
    module = build("robe_dense")
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": 0.1, "momentum": 0.9})
    with pytest.raises(ValueError, match=r"SGD\(momentum=0.9\) is not supported"):
        module.fused_optimizer
    other = build("robe_dense")
    apply_optimizer_in_backward(torch.optim.RMSprop, other.parameters(), {"lr": 0.1})
    with pytest.raises(ValueError, match="RMSprop is not supported"):
        other(batch(0))


def test_torch_apply_optimizer_in_backward_gives_the_same_steps() -> None:
    """torch.distributed.optim._apply_optimizer_in_backward (which TorchRec's wraps) configures the same update."""
    from torch.distributed.optim import _apply_optimizer_in_backward

    by_torchrec = fused("robe_sparse", "adagrad")
    by_torch = build("robe_sparse")
    cls, kwargs = OPTIMIZERS["adagrad"]
    _apply_optimizer_in_backward(cls, by_torch.parameters(), kwargs)
    for step in range(2):
        loss_of(by_torchrec, step).backward()
        loss_of(by_torch, step).backward()
    assert all(p.grad is None for p in by_torch.parameters())
    for (name, a), b in zip(by_torchrec.named_parameters(), by_torch.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("compressed", [True, False])
def test_release_frees_a_model_trained_with_in_backward_optimizers(compressed: bool) -> None:
    """torch's in-backward records keep parameters alive after the model is dropped; releasing frees them."""
    tables = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=50, feature_names=["f"])]
    module = CompressedEmbeddingBagCollection(tables, {"t": RobeConfig(compression=5)} if compressed else {})
    apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": 0.1})
    kjt = KeyedJaggedTensor(keys=["f"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]))
    before = [p.detach().clone() for p in module.parameters()]
    module(kjt).values().sum().backward()
    assert all(p.grad is None for p in module.parameters()), "stepped inside backward"
    assert any(not torch.equal(b, p) for b, p in zip(before, module.parameters()))
    params = [weakref.ref(p) for p in module.parameters()]
    release_in_backward_optimizers(module)
    module(kjt).values().sum().backward()  # no optimizer any more: the gradient stays in .grad
    assert all(p().grad is not None for p in params)
    del module
    gc.collect()
    assert all(p() is None for p in params)
