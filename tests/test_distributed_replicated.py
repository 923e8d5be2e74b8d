"""Replicated memories across 2 real gloo ranks: averaged gradients in backward, bit-identical replicas,
equal to one process training on the concatenated global batch."""

from __future__ import annotations

import os
import random
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, QRConfig, RobeConfig
from torchrec_pss.distributed import assert_replicas_identical, replicate_gradients
from torchrec_pss.optim import BlockwiseAdagrad

WORLD = 2
LOCAL_BATCH = 6
STEPS = 3
# Non-zero accumulator / eps: with Adagrad's 0 start (Adam's 1e-8 eps) the first step is ~lr * sign(g), so an
# element whose gradient is 1e-9 in one summation order and 0 in another would move by lr in one run only.
OPTIMIZERS = {
    "adagrad": (torch.optim.Adagrad, {"lr": 0.1, "initial_accumulator_value": 0.1}),
    "blockwise_adagrad": (BlockwiseAdagrad, {"lr": 0.1, "initial_accumulator_value": 0.1}),
    "adam": (torch.optim.Adam, {"lr": 0.01, "eps": 1e-3}),
    "unfused_sgd": None,
}


def build(gradient: str) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=60, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=40, feature_names=["f3"]),
        EmbeddingBagConfig(name="plain", embedding_dim=8, num_embeddings=10, feature_names=["f4"]),
    ]
    robe = RobeConfig(memory_size=128, chunk_size=4, gradient=gradient)
    return CompressedEmbeddingBagCollection(
        tables, {"t1": robe, "t2": QRConfig(collisions=5, gradient=gradient)}, is_weighted=True
    )


def global_bags(step: int) -> dict[str, list[list[int]]]:
    rng = random.Random(step)
    bags = {f: random_bags(rng, n, batch=WORLD * LOCAL_BATCH, max_len=4) for f, n in
            {"f1": 60, "f2": 60, "f3": 40, "f4": 10}.items()}
    if step == 1:  # rank 1 reads nothing of t2 in this step: its gradient is missing there
        bags["f3"][LOCAL_BATCH:] = [[] for _ in range(LOCAL_BATCH)]
    return bags


def batch_of(step: int, ranks: range):
    bags = global_bags(step)
    rng = random.Random(100 + step)
    weights = {f: random_weights(rng, b) for f, b in bags.items()}
    rows = [i for r in ranks for i in range(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)]
    return make_kjt({f: [b[i] for i in rows] for f, b in bags.items()}, {f: [w[i] for i in rows] for f, w in weights.items()})


def loss_of(module, kjt) -> torch.Tensor:
    out = module(kjt).values()
    return (out.pow(2).sum(1) + out.sum(1)).mean()


def train(module, optimizer: str, ranks: range) -> None:
    unfused = OPTIMIZERS[optimizer] is None
    if not unfused:
        cls, kwargs = OPTIMIZERS[optimizer]
        apply_optimizer_in_backward(cls, module.parameters(), kwargs)
    sgd = torch.optim.SGD(module.parameters(), lr=0.1) if unfused else None
    return sgd


def _worker(rank: int, init_file: str, out_dir: str, optimizer: str, gradient: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    module = build(gradient)
    sgd = train(module, optimizer, range(rank, rank + 1))
    replicate_gradients(module)
    for step in range(STEPS):
        if sgd is not None:
            sgd.zero_grad()
        loss_of(module, batch_of(step, range(rank, rank + 1))).backward()
        if sgd is not None:
            sgd.step()
    assert_replicas_identical(dict(module.named_parameters()))
    state = module.fused_optimizer.state_dict()["state"]
    params = {n: p.detach().clone() for n, p in module.named_parameters()}
    torch.save({"params": params, "state": state}, os.path.join(out_dir, f"rank{rank}.pt"))
    if rank == 1:
        with torch.no_grad():
            module.pss_memories["robe_default"].weight[0] += 1e-3
    try:
        assert_replicas_identical(dict(module.named_parameters()))
    except RuntimeError as error:
        torch.save(str(error), os.path.join(out_dir, f"divergence{rank}.pt"))
    dist.destroy_process_group()


def single_process(optimizer: str, gradient: str):
    module = build(gradient)
    sgd = train(module, optimizer, range(WORLD))
    for step in range(STEPS):
        if sgd is not None:
            sgd.zero_grad()
        loss_of(module, batch_of(step, range(WORLD))).backward()
        if sgd is not None:
            sgd.step()
    return dict(module.named_parameters()), module.fused_optimizer.state_dict()["state"]


@pytest.mark.parametrize("gradient", ["dense", "sparse"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_two_ranks_match_one_process_on_the_global_batch(optimizer: str, gradient: str) -> None:
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "init")
        mp.spawn(_worker, args=(init_file, out_dir, optimizer, gradient), nprocs=WORLD, join=True)
        ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]
        divergence = [torch.load(os.path.join(out_dir, f"divergence{r}.pt")) for r in range(WORLD)]
    params, state = single_process(optimizer, gradient)
    for name, expected in params.items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(ranks[0]["params"][name], expected.detach(), rtol=1e-5, atol=1e-6, msg=name)
        for key, value in state.get(name, {}).items():
            if key != "step":
                torch.testing.assert_close(ranks[0]["state"][name][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert all("'pss_memories.robe_default.weight' differs across ranks" in d for d in divergence)
