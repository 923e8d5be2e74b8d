"""Shared test helpers: KJTs from Python lists, random bags, multi-process runs, DMP on CPU ranks."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingEnv, ShardingType
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_pss.distributed import get_pss_sharders, pss_constraints


def make_kjt(bags: dict[str, list[list[int]]], weights: dict[str, list[list[float]]] | None = None) -> KeyedJaggedTensor:
    """A KJT with one key per entry of ``bags`` (each a list of B bags of ids)."""
    keys = list(bags)
    values = [x for k in keys for bag in bags[k] for x in bag]
    lengths = [len(bag) for k in keys for bag in bags[k]]
    kw = {}
    if weights is not None:
        kw["weights"] = torch.tensor([w for k in keys for bag in weights[k] for w in bag], dtype=torch.float32)
    return KeyedJaggedTensor(
        keys=keys,
        values=torch.tensor(values, dtype=torch.int64),
        lengths=torch.tensor(lengths, dtype=torch.int64),
        **kw,
    )


def random_bags(rng: random.Random, num_embeddings: int, batch: int, max_len: int) -> list[list[int]]:
    """``batch`` bags of 0..max_len uniform ids; the first bag is always empty."""
    bags = [[rng.randrange(num_embeddings) for _ in range(rng.randint(0, max_len))] for _ in range(batch)]
    bags[0] = []
    return bags


def random_weights(rng: random.Random, bags: list[list[int]]) -> list[list[float]]:
    return [[rng.uniform(-2.0, 2.0) for _ in bag] for bag in bags]


def assert_coalesced_rows_of(grad: torch.Tensor, dense: torch.Tensor) -> None:
    """``grad`` is a sparse COO gradient flagged coalesced, over strictly increasing rows (of dim 0), whose values
    are ``dense``'s rows there; ``dense`` is zero on every other row."""
    assert grad.is_sparse and grad.is_coalesced()
    rows = grad.indices()[0]
    assert rows.numel() and bool((rows[1:] > rows[:-1]).all())
    torch.testing.assert_close(grad.values(), dense.index_select(0, rows))
    untouched = torch.ones(dense.shape[0], dtype=torch.bool)
    untouched[rows] = False
    assert untouched.any() and not dense[untouched].any()


def train_dlrm_and_auc(model: torch.nn.Module, optimizer: torch.optim.Optimizer, train: Iterable[Batch],
                       test: Iterable[Batch]) -> float:
    """Train a torchrec ``DLRM`` on ``train`` (BCE on the logit, one optimizer step per batch); its AUC on ``test``."""
    for batch in train:
        logits = model(batch.dense_features, batch.sparse_features).squeeze(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    auroc = BinaryAUROC()
    with torch.no_grad():
        for batch in test:
            auroc.update(torch.sigmoid(model(batch.dense_features, batch.sparse_features).squeeze(1)), batch.labels.long())
    return auroc.compute().item()


def spawn_ranks(worker: Callable[..., None], world: int, name: str) -> list[Any]:
    """Run ``worker(rank, init_file, out_dir)`` on ``world`` processes; what each rank saved as
    ``<out_dir>/<name><rank>.pt``, in rank order."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(os.path.join(out_dir, "init"), out_dir), nprocs=world, join=True)
        return [torch.load(os.path.join(out_dir, f"{name}{rank}.pt")) for rank in range(world)]


def make_dmp(model: nn.Module, world: int) -> DistributedModelParallel:
    """``model`` under DMP on ``world`` CPU ranks: compressed tables replicated, table ``"p"`` table-wise."""
    sharders = get_pss_sharders() + get_default_sharders()
    constraints = {**pss_constraints(model), "p": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"), constraints=constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
                                    device=torch.device("cpu"), plan=plan, sharders=sharders)


def graph_nodes(tensor: torch.Tensor) -> set[str]:
    """Names of every autograd node ``tensor`` depends on."""
    seen, names, stack = set(), set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names
