"""DistributedModelParallel with 2 gloo ranks: compressed tables replicated, a plain table sharded table-wise."""

from __future__ import annotations

import os
import random

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from helpers import make_dmp, make_kjt, random_bags, spawn_ranks
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.distributed import (
    ShardedCompressedEmbeddingBagCollection,
    assert_replicas_identical,
)
from torchrec_pss.hashing import hash_coefficients

WORLD = 2
LOCAL_BATCH = 6
STEPS = 3
LR = 0.1
SIZES = {"fp": 20, "f1": 1000, "f2": 500}


class Net(nn.Module):
    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        torch.manual_seed(0)
        tables = [
            # constant init: TorchRec (re)initialises sharded tables from weight_init_min/max
            EmbeddingBagConfig(name="p", embedding_dim=8, num_embeddings=20, feature_names=["fp"],
                               weight_init_min=0.05, weight_init_max=0.05),
            EmbeddingBagConfig(name="r1", embedding_dim=8, num_embeddings=1000, feature_names=["f1"]),
            EmbeddingBagConfig(name="r2", embedding_dim=8, num_embeddings=500, feature_names=["f2"]),
        ]
        robe = RobeConfig(memory_size=256, chunk_size=4, gradient="dense")
        self.ebc = CompressedEmbeddingBagCollection(tables, {"r1": robe, "r2": robe}, device)
        self.head = nn.Linear(24, 1, device=device)

    def forward(self, kjt) -> torch.Tensor:
        return self.head(self.ebc(kjt).values()).squeeze(1)


def batch(step: int, ranks: range):
    rng = random.Random(step)
    bags = {f: random_bags(rng, n, batch=WORLD * LOCAL_BATCH, max_len=3) for f, n in SIZES.items()}
    rows = [i for r in ranks for i in range(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)]
    return make_kjt({f: [b[i] for i in rows] for f, b in bags.items()})


def loss_of(model, kjt) -> torch.Tensor:
    return (model(kjt) - 1.0).pow(2).mean()


def train_steps(dmp: DistributedModelParallel, rank: int, steps: range) -> None:
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                  lambda params: torch.optim.SGD(params, lr=LR))
    for step in steps:
        dense.zero_grad()
        loss_of(dmp, batch(step, range(rank, rank + 1))).backward()
        dense.step()


def fresh_model() -> Net:
    model = Net()
    apply_optimizer_in_backward(torch.optim.Adagrad, model.ebc.parameters(), {"lr": LR})
    return model


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    dmp = make_dmp(fresh_model(), WORLD)
    assert isinstance(dmp.module.ebc, ShardedCompressedEmbeddingBagCollection)
    train_steps(dmp, rank, range(STEPS))
    state = dmp.state_dict()
    keys = sorted(state)
    optimizer_state = dmp.fused_optimizer.state_dict()
    memory = state["ebc.pss_memories.robe_default.weight"].clone()
    restored = make_dmp(fresh_model(), WORLD)
    restored.load_state_dict(dict(state))  # a copy: DMP renames the keys of the dict it loads
    restored.fused_optimizer.load_state_dict(optimizer_state)
    probe = batch(STEPS, range(rank, rank + 1))
    same_outputs = torch.equal(restored(probe), dmp(probe))
    train_steps(dmp, rank, range(STEPS, STEPS + 2))
    train_steps(restored, rank, range(STEPS, STEPS + 2))
    continued = [torch.equal(a, b) for a, b in zip(dmp.module.head.parameters(), restored.module.head.parameters())]
    continued.append(torch.equal(dmp.state_dict()["ebc.pss_memories.robe_default.weight"],
                                 restored.state_dict()["ebc.pss_memories.robe_default.weight"]))
    torch.save({"memory": memory, "keys": keys, "fused_keys": sorted(optimizer_state["state"]),
                "same_outputs": same_outputs, "continued": all(continued)}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def single_process():
    model = fresh_model()
    head = torch.optim.SGD(model.head.parameters(), lr=LR)
    for step in range(STEPS):
        head.zero_grad()
        loss_of(model, batch(step, range(WORLD))).backward()
        head.step()
    return model


def test_dmp_replicates_memories_and_matches_one_process() -> None:
    ranks = spawn_ranks(_worker, WORLD, "rank")
    reference = single_process()
    assert torch.equal(ranks[0]["memory"], ranks[1]["memory"]), "replicas must stay bit-identical"
    torch.testing.assert_close(ranks[0]["memory"], reference.ebc.pss_memories["robe_default"].weight.detach(),
                               rtol=1e-5, atol=1e-6)
    assert "ebc.embedding_bags.p.weight" in ranks[0]["keys"] and "ebc._extra_state" in ranks[0]["keys"]
    assert "ebc.pss_memories.robe_default.weight" in ranks[0]["fused_keys"]
    assert "ebc.embedding_bags.p.weight" in ranks[0]["fused_keys"], "TorchRec's fused optimizer of the plain table"
    assert all(r["same_outputs"] and r["continued"] for r in ranks), "a DMP checkpoint must restore the run exactly"


class PipelineNet(Net):
    """``Net`` taking a torchrec ``Batch`` and returning ``(loss, logits)``, as TrainPipelineSparseDist expects."""

    def forward(self, batch: Batch):
        logits = super().forward(batch.sparse_features)
        return (logits - batch.labels).pow(2).mean(), logits.detach()


def as_batch(step: int, rank: int) -> Batch:
    return Batch(dense_features=torch.zeros(LOCAL_BATCH, 1), sparse_features=batch(step, range(rank, rank + 1)),
                 labels=torch.ones(LOCAL_BATCH))


def _pipeline_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    memories = []
    for pipelined in (False, True):
        model = PipelineNet()
        apply_optimizer_in_backward(torch.optim.Adagrad, model.ebc.parameters(), {"lr": LR})
        dmp = make_dmp(model, WORLD)
        dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                      lambda params: torch.optim.SGD(params, lr=LR))
        batches = [as_batch(step, rank) for step in range(STEPS)]
        if pipelined:
            pipeline = TrainPipelineSparseDist(dmp, dense, torch.device("cpu"))
            iterator = iter(batches)
            for _ in range(STEPS):
                pipeline.progress(iterator)
        else:
            for b in batches:
                dense.zero_grad()
                dmp(b)[0].backward()
                dense.step()
        memories.append(dmp.state_dict()["ebc.pss_memories.robe_default.weight"].clone())
    torch.save(memories, os.path.join(out_dir, f"pipeline{rank}.pt"))
    dist.destroy_process_group()


def test_train_pipeline_sparse_dist_gives_the_same_training() -> None:
    runs = spawn_ranks(_pipeline_worker, WORLD, "pipeline")
    for plain, pipelined in runs:
        torch.testing.assert_close(pipelined, plain, rtol=1e-6, atol=1e-7)
    assert torch.equal(runs[0][1], runs[1][1])


def _meta_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    model = Net("meta")
    apply_optimizer_in_backward(torch.optim.Adagrad, model.ebc.parameters(), {"lr": LR})
    dmp = make_dmp(model, WORLD)
    memory = dmp.module.ebc.pss_memories["robe_default"]
    materialised = not memory.weight.is_meta and torch.equal(memory.hash_coefficients, hash_coefficients(0, 2))
    before = memory.weight.detach().clone()
    train_steps(dmp, rank, range(2))
    assert_replicas_identical(dict(dmp.module.ebc.pss_memories.named_parameters()))
    moved = not torch.equal(before, memory.weight)
    fused = "ebc.pss_memories.robe_default.weight" in dmp.fused_optimizer.state_dict()["state"]
    torch.save([materialised, moved, fused], os.path.join(out_dir, f"meta{rank}.pt"))
    dist.destroy_process_group()


def test_dmp_materialises_a_meta_model_and_trains_it() -> None:
    flags = spawn_ranks(_meta_worker, WORLD, "meta")
    assert flags == [[True, True, True]] * WORLD
