"""Loading into DMP-sharded compressed tables: another ROBE hashing setup is refused (through ``load_state_dict``,
through a DCP checkpoint and by the DLRM app's resume) with nothing written; memories built on meta keep their
in-backward optimizer tags, so they stay out of the dense optimizer and its checkpoint state."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.checkpoint import FileSystemReader
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from helpers import make_dmp, make_kjt, random_bags, spawn_ranks
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.checkpoint import complete_checkpoints, load_training_state, save_training_state
from torchrec_pss.optim import FusedUpdate

WORLD = 2
LR = 0.1
SIZES = {"fp": 20, "f1": 1000}
MEMORY = "pss_memories.robe_default.weight"
BASE = RobeConfig(memory_size=256, chunk_size=8)
OTHERS = {  # same memory size, other hashing: (config, the refusal's message)
    "chunk_size": (RobeConfig(memory_size=256, chunk_size=4), "chunk_size: checkpoint 8 vs module 4"),
    "seed": (RobeConfig(memory_size=256, chunk_size=8, seed=1), "seed: checkpoint 0 vs module 1"),
    "use_sign": (RobeConfig(memory_size=256, chunk_size=8, use_sign=True), "use_sign: checkpoint False vs module True"),
}


class Net(nn.Module):
    """A plain table (sharded table-wise by TorchRec) and a ROBE table (replicated), then a linear head."""

    def __init__(self, robe: RobeConfig, device: str = "cpu", optimizer: type = torch.optim.Adagrad) -> None:
        super().__init__()
        torch.manual_seed(0)
        tables = [
            EmbeddingBagConfig(name="p", embedding_dim=8, num_embeddings=SIZES["fp"], feature_names=["fp"],
                               weight_init_min=0.05, weight_init_max=0.05),
            EmbeddingBagConfig(name="r", embedding_dim=8, num_embeddings=SIZES["f1"], feature_names=["f1"]),
        ]
        self.ebc = CompressedEmbeddingBagCollection(tables, {"r": robe}, device)
        self.head = nn.Linear(16, 1, device=device)
        apply_optimizer_in_backward(optimizer, self.ebc.parameters(), {"lr": LR})

    def forward(self, kjt) -> torch.Tensor:
        return self.head(self.ebc(kjt).values()).squeeze(1)


def dense_optimizer(dmp: DistributedModelParallel) -> KeyedOptimizerWrapper:
    return KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(dmp.named_parameters())),
                                 lambda params: torch.optim.Adagrad(params, lr=LR))


def train_step(dmp: DistributedModelParallel, dense: KeyedOptimizerWrapper, rank: int) -> None:
    rng = random.Random(rank)
    kjt = make_kjt({f: random_bags(rng, n, batch=6, max_len=3) for f, n in SIZES.items()})
    dense.zero_grad()
    (dmp(kjt) - 1.0).pow(2).mean().backward()
    dense.step()


def snapshot(dmp: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """Copies of the rank's parameters, buffers (hash constants) and fused optimizer states."""
    out = {name: t.detach().clone() for name, t in [*dmp.named_parameters(), *dmp.named_buffers()]}
    for key, fields in dmp.fused_optimizer.state_dict()["state"].items():
        for field, value in fields.items():
            parts = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
            for index, part in enumerate(parts):
                out[f"fused.{key}.{field}.{index}"] = torch.as_tensor(part).clone()
    return out


def unchanged(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def refusal(load: Callable[[], Any]) -> str | None:
    """The ValueError ``load`` raised, or None when it loaded."""
    try:
        load()
    except ValueError as error:
        return str(error)
    return None


def _refusal_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    source = make_dmp(Net(BASE), WORLD)
    train_step(source, dense_optimizer(source), rank)  # the source's values differ from any fresh model's
    state = source.state_dict()
    path = save_training_state(os.path.join(out_dir, "ckpt"), 1, source, {"fused": source.fused_optimizer})
    results: dict[str, Any] = {}
    for name, (config, _) in OTHERS.items():
        target = make_dmp(Net(config), WORLD)
        before = snapshot(target)
        results[name] = {
            "load_state_dict": refusal(lambda: target.load_state_dict(dict(state))),
            "dcp": refusal(lambda: load_training_state(path, target, {"fused": target.fused_optimizer})),
            "unchanged": unchanged(before, snapshot(target)),
        }
    same = make_dmp(Net(BASE), WORLD)
    results["same_config"] = {
        "dcp": refusal(lambda: load_training_state(path, same, {"fused": same.fused_optimizer})),
        "restored": torch.equal(same.state_dict()[f"ebc.{MEMORY}"], state[f"ebc.{MEMORY}"]),
    }
    torch.save(results, os.path.join(out_dir, f"refusal{rank}.pt"))
    dist.destroy_process_group()


def test_dmp_refuses_another_hashing_setup_and_writes_nothing() -> None:
    ranks = spawn_ranks(_refusal_worker, WORLD, "refusal")
    for results in ranks:
        for name, (_, message) in OTHERS.items():
            got = results[name]
            for path in ("load_state_dict", "dcp"):
                assert got[path] is not None, f"{name}: {path} loaded a checkpoint of another hashing setup"
                assert f"table 'r' (robe): checkpoint recovers embeddings differently ({message})" in got[path]
            assert got["unchanged"], f"{name}: a refused load changed parameters, constants or optimizer states"
        assert results["same_config"] == {"dcp": None, "restored": True}


def _meta_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    for device in ("cpu", "meta"):
        dmp = make_dmp(Net(BASE, device), WORLD)
        dense = dense_optimizer(dmp)
        memory = dmp.module.ebc.pss_memories["robe_default"].weight
        update = dmp.module.ebc._fused.updates[MEMORY]
        train_step(dmp, dense, rank)
        path = save_training_state(os.path.join(out_dir, device), 1, dmp, {"fused": dmp.fused_optimizer, "dense": dense})
        results[device] = {
            "dense": sorted(dense.params),
            "in_backward": [type(o).__name__ for o in memory._in_backward_optimizers],
            "is_fused_update": memory._in_backward_optimizers == [update],
            "classes": [c.__name__ for c in memory._optimizer_classes],
            "saved": sorted(k for k in FileSystemReader(path).read_metadata().state_dict_metadata
                            if k.startswith("optimizers.")),
        }
    torch.save(results, os.path.join(out_dir, f"meta{rank}.pt"))
    dist.destroy_process_group()


def test_memories_built_on_meta_stay_out_of_the_dense_optimizer() -> None:
    ranks = spawn_ranks(_meta_worker, WORLD, "meta")
    for results in ranks:
        cpu, meta = results["cpu"], results["meta"]
        assert meta["dense"] == cpu["dense"] == ["head.bias", "head.weight"]
        assert meta["in_backward"] == cpu["in_backward"] == [FusedUpdate.__name__]
        assert meta["is_fused_update"] and cpu["is_fused_update"]
        assert meta["classes"] == cpu["classes"] == ["Adagrad"]
        assert meta["saved"] == cpu["saved"]
        dense_keys = [k for k in meta["saved"] if k.startswith("optimizers.dense.")]
        assert dense_keys and not any("pss_memories" in k for k in dense_keys), "duplicate Adagrad state of |M|"
        assert any(k.startswith(f"optimizers.fused.state.ebc.{MEMORY}.") for k in meta["saved"])


def build(tables: tuple[str, ...], robe: RobeConfig | None) -> CompressedEmbeddingBagCollection:
    """An unsharded module; table ``big`` compressed with ``robe`` (plain when None)."""
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=t, embedding_dim=8, num_embeddings=500, feature_names=[f"f_{t}"]) for t in tables]
    module = CompressedEmbeddingBagCollection(configs, {} if robe is None else {"big": robe})
    apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": LR})
    return module


def trained(module: CompressedEmbeddingBagCollection) -> CompressedEmbeddingBagCollection:
    rng = random.Random(0)
    kjt = make_kjt({f: random_bags(rng, 500, 6, 3) for t in module.embedding_bag_configs() for f in t.feature_names})
    module(kjt).values().pow(2).sum().backward()
    return module


def module_snapshot(module: CompressedEmbeddingBagCollection) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    for key, fields in module.fused_optimizer.state_dict()["state"].items():
        out.update({f"fused.{key}.{field}": torch.as_tensor(value).clone() for field, value in fields.items()})
    return out


@pytest.mark.parametrize("tables, robe, message", [
    (("big", "small"), RobeConfig(memory_size=256, chunk_size=4), "chunk_size: checkpoint 8 vs module 4"),
    (("big", "small"), RobeConfig(memory_size=256, chunk_size=8, seed=1), "seed: checkpoint 0 vs module 1"),
    (("big", "small"), None, "table 'big': checkpoint was saved with method 'robe', this module uses 'plain'"),
    (("big",), RobeConfig(memory_size=256, chunk_size=8), r"unexpected \['_extra_state.tables.small.method', "
                                                           r"'embedding_bags.small.weight'\]"),
])
def test_refused_checkpoint_leaves_an_unsharded_module_unchanged(tmp_path: Path, tables, robe, message: str) -> None:
    """DCP reads in place: the checks must run before it, not after (as they did, once the weights were read)."""
    source = trained(build(("big", "small"), BASE))
    path = save_training_state(str(tmp_path), 1, source, {"fused": source.fused_optimizer})
    target = build(tables, robe)
    before = module_snapshot(target)
    with pytest.raises(ValueError, match=message):
        load_training_state(path, target, {"fused": target.fused_optimizer})
    assert unchanged(before, module_snapshot(target))


def build_shared(order: tuple[str, ...], device: str = "cpu") -> CompressedEmbeddingBagCollection:
    """Plain table ``p`` and ROBE tables sharing one memory, listed in ``order`` (fused Adagrad)."""
    torch.manual_seed(0)
    configs = [EmbeddingBagConfig(name=t, embedding_dim=8, num_embeddings=500, feature_names=[f"f_{t}"])
               for t in ("p", *order)]
    module = CompressedEmbeddingBagCollection(configs, {t: BASE for t in order}, device)
    apply_optimizer_in_backward(torch.optim.Adagrad, module.parameters(), {"lr": LR})
    return module


def features_of(output: Any) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in output.to_dict().items()}


def test_dcp_resume_puts_a_robe_groups_tables_in_this_modules_order(tmp_path: Path) -> None:
    """A checkpoint listing a memory's tables in another order resumes: DCP reads the per-table constants into
    copies, the module's load puts them in its own order (DCP had read them into the buffer in the checkpoint's
    order, and the load was then refused, after the weights had been read)."""
    source = trained(build_shared(("big", "small")))
    path = save_training_state(str(tmp_path), 1, source, {"fused": source.fused_optimizer})
    target = build_shared(("small", "big"))
    own_keys = target.pss_memories["robe_default"].table_keys.clone()
    load_training_state(path, target, {"fused": target.fused_optimizer})
    assert torch.equal(target.pss_memories["robe_default"].table_keys, own_keys)
    kjt = make_kjt({f"f_{t}": random_bags(random.Random(1), 500, 6, 3) for t in ("p", "big", "small")})
    assert unchanged(features_of(source(kjt)), features_of(target(kjt)))
    source_state, target_state = module_snapshot(source), module_snapshot(target)
    assert source_state.keys() == target_state.keys()
    assert all(torch.equal(source_state[k], target_state[k]) for k in source_state if not k.endswith("table_keys"))


def _order_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    source = make_dmp(build_shared(("big", "small")), WORLD)
    kjt = make_kjt({f"f_{t}": random_bags(random.Random(rank), 500, 6, 3) for t in ("p", "big", "small")})
    source(kjt).values().pow(2).sum().backward()
    path = save_training_state(os.path.join(out_dir, "ckpt"), 1, source, {"fused": source.fused_optimizer})
    target = make_dmp(build_shared(("small", "big")), WORLD)
    keys = target.module.pss_memories["robe_default"].table_keys.clone()
    load_training_state(path, target, {"fused": target.fused_optimizer})
    torch.save({"keys_kept": torch.equal(target.module.pss_memories["robe_default"].table_keys, keys),
                "source": features_of(source(kjt)), "target": features_of(target(kjt)),
                "states": (snapshot(source), snapshot(target))}, os.path.join(out_dir, f"order{rank}.pt"))
    dist.destroy_process_group()


def test_dmp_dcp_resume_puts_a_robe_groups_tables_in_this_modules_order() -> None:
    """The same under DMP (the ROBE memory replicated, ``p`` sharded table-wise), on 2 ranks."""
    for results in spawn_ranks(_order_worker, WORLD, "order"):
        assert results["keys_kept"]
        assert unchanged(results["source"], results["target"])
        assert {k.replace("big", "*").replace("small", "*") for k in results["states"][0]} == {
            k.replace("big", "*").replace("small", "*") for k in results["states"][1]}
        source, target = results["states"]
        assert all(torch.equal(source[k], target[k]) for k in source.keys() & target.keys() if "table_keys" not in k)


def combined(dmp: DistributedModelParallel) -> CombinedOptimizer:
    """The fused and dense optimizers as one, saving their param groups (``save_param_groups(True)``)."""
    optimizer = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense_optimizer(dmp))])
    optimizer.save_param_groups(True)
    return optimizer


def _rates_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    source = make_dmp(Net(BASE), WORLD)
    optimizer = combined(source)
    train_step(source, optimizer, rank)
    for group in optimizer.param_groups:
        group["lr"] = LR / 7
    path = save_training_state(os.path.join(out_dir, "ckpt"), 1, source, {"all": optimizer})
    target = make_dmp(Net(BASE), WORLD)
    fresh = combined(target)
    load_training_state(path, target, {"all": fresh})
    mine, theirs = ({k: v for k, v in snapshot(dmp).items() if "_features_order" not in k} for dmp in (source, target))
    torch.save({"groups": [group["params"] for group in optimizer.state_dict()["param_groups"]],
                "rates": [group["lr"] for group in fresh.param_groups],
                "states": unchanged(mine, theirs)}, os.path.join(out_dir, f"rates{rank}.pt"))
    dist.destroy_process_group()


def test_dmp_resume_restores_saved_param_groups_of_every_rank() -> None:
    """``save_param_groups(True)`` under DMP: the ranks hold different groups (the plain table lives on one rank,
    so the dense group is the second on one rank and the third on the other), and each gets its own learning rates
    back (the groups were saved by position, so DCP kept one rank's group ``i``: a group of no rank, and the load
    failed). TorchRec's ``_features_order_tensor``, set at the first forward, is left out of the comparison."""
    ranks = spawn_ranks(_rates_worker, WORLD, "rates")
    assert ranks[0]["groups"][1] != ranks[1]["groups"][1]
    for results in ranks:
        assert results["rates"] == [LR / 7] * len(results["groups"]) and results["states"]


def test_dlrm_app_refuses_to_resume_with_another_chunk_size(tmp_path: Path) -> None:
    def app(steps: int, chunk_size: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torchrec_pss.app.dlrm_main", "--steps", str(steps), "--batch-size", "32",
             "--eval-batches", "1", "--checkpoint-dir", str(tmp_path),
             "--pss", f"robe:compression=100,chunk_size={chunk_size},min_rows=10000"],
            capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    first = app(2, 8)
    assert first.returncode == 0, first.stderr[-4000:]
    resumed = app(4, 4)
    assert resumed.returncode != 0, "resumed from a checkpoint made with another chunk size"
    assert "checkpoint recovers embeddings differently (chunk_size: checkpoint 8 vs module 4)" in resumed.stderr
    assert [step for step, _ in complete_checkpoints(str(tmp_path))] == [2]


def _stateless_worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    source = make_dmp(Net(BASE, optimizer=torch.optim.SGD), WORLD)
    train_step(source, dense_optimizer(source), rank)
    path = save_training_state(os.path.join(out_dir, "ckpt"), 1, source, {"fused": source.fused_optimizer})
    target = make_dmp(Net(BASE, optimizer=torch.optim.SGD), WORLD)
    load_training_state(path, target, {"fused": target.fused_optimizer})
    mine, theirs = ({k: v for k, v in snapshot(dmp).items() if "_features_order" not in k} for dmp in (source, target))
    torch.save({"states": unchanged(mine, theirs)}, os.path.join(out_dir, f"stateless{rank}.pt"))
    dist.destroy_process_group()


def test_dmp_resume_with_a_stateless_fused_optimizer() -> None:
    """In-backward SGD keeps an empty state per parameter, for which DCP writes no entry under a process group: the
    load asked for them anyway and failed (``Missing key ... optimizers.fused.state...``). Now every rank resumes."""
    for rank in spawn_ranks(_stateless_worker, WORLD, "stateless"):
        assert rank["states"]
