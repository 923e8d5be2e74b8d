"""Planning the MLPerf DLRM-DCNv2 tables: compressed tables replicated at their true size, the rest sharded."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import RowWiseAdagrad, apply_optimizer_in_backward

from helpers import make_kjt
from test_planning_helpers import mlperf_tables
from torchrec_pss import CompressedEmbeddingBagCollection, QRConfig, RobeConfig
from torchrec_pss.distributed import CompressedEmbeddingBagCollectionSharder, get_pss_sharders, make_planner
from torchrec_pss.optim import BlockwiseAdagrad

GB = 1024**3
SHARDERS = get_pss_sharders() + get_default_sharders()


class Model(nn.Module):
    def __init__(self, compression: dict) -> None:
        super().__init__()
        self.sparse = CompressedEmbeddingBagCollection(mlperf_tables(), compression, device="meta")


def robe_on_large_tables(ratio: float = 1000) -> dict:
    robe = RobeConfig(compression=ratio)
    return {t.name: robe for t in mlperf_tables() if t.num_embeddings >= 1_000_000}


def topology(world: int) -> Topology:
    return Topology(world_size=world, compute_device="cuda", hbm_cap=80 * GB)


def test_stand_ins_charge_what_is_stored() -> None:
    model = Model(robe_on_large_tables())
    apply_optimizer_in_backward(BlockwiseAdagrad, model.sparse.parameters(), {"lr": 0.01})
    params = CompressedEmbeddingBagCollectionSharder().shardable_parameters(model.sparse)
    memory = model.sparse.pss_memories["robe_default"]
    compressed = robe_on_large_tables()
    # the memory, its hash constants, one float32 accumulator per Z = 32 elements and the step counter
    stored = memory.num_bytes() + memory.memory_size // 32 * 4 + 4
    stand_in_bytes = sum(params[t].numel() * 4 for t in compressed)
    assert stored <= stand_in_bytes < stored + 128 * 4 * len(compressed)
    assert not any(hasattr(params[t], "_optimizer_classes") for t in compressed), "optimizer state is in the rows"
    plain = [t for t in params if t not in compressed]
    assert all(params[t] is model.sparse.embedding_bags[t].weight for t in plain)


def _planned_bytes(model: nn.Module, tables: list[str]) -> dict[str, int]:
    """What a real planner run charges each table on a CPU rank, lookups' input / output buffers left out
    (no lookups: pooling factor 0), so only what the table stores and its optimizer state remain."""
    no_lookups = {t: ParameterConstraints(pooling_factors=[0.0], num_poolings=[0.0]) for t in tables}
    planner = make_planner(model, Topology(world_size=2, compute_device="cpu"), constraints=no_lookups)
    planner.plan(model, SHARDERS)
    options = {option.name: option for option in planner._best_plan}  # the plan's ShardingOptions with their storage
    assert all(options[t].sharding_type == ShardingType.DATA_PARALLEL.value for t in tables)
    return {t: options[t].shards[0].storage.ddr for t in tables}


def _trained_bytes(module: CompressedEmbeddingBagCollection, optimizer: type, kwargs: dict) -> int:
    """The bytes ``module`` and its in-backward optimizer's state hold after one training step."""
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    features = {f: [[1, 2], [3]] for t in module.embedding_bag_configs() for f in t.feature_names}
    module(make_kjt(features)).values().sum().backward()
    state = module.fused_optimizer.state_dict()["state"]
    state_bytes = sum(v.numel() * v.element_size() for s in state.values() for v in s.values() if isinstance(v, torch.Tensor))
    return sum(module.num_bytes().values()) + state_bytes


D = 128


@pytest.mark.parametrize("config, optimizer, kwargs, stored", [
    # ROBE |M| = 128,000 float32 + 72 B hash constants; optimizer state + 4 B step counter
    (RobeConfig(compression=100, chunk_size=1), BlockwiseAdagrad, {"lr": 0.01}, 512_072 + 512_000 + 4),
    (RobeConfig(compression=100, chunk_size=1), torch.optim.Adagrad, {"lr": 0.01}, 512_072 + 512_000 + 4),
    (RobeConfig(compression=100, chunk_size=32), BlockwiseAdagrad, {"lr": 0.01}, 512_072 + 16_000 + 4),
    (RobeConfig(compression=100, chunk_size=32), torch.optim.Adagrad, {"lr": 0.01}, 512_072 + 512_000 + 4),
    (RobeConfig(compression=100, chunk_size=32), torch.optim.SGD, {"lr": 0.01}, 512_072),
    (RobeConfig(compression=100, chunk_size=32), torch.optim.Adam, {"lr": 0.01}, 3 * 512_000 + 72 + 4),
    # QR concat: parts [1000, 64] and [100, 64]; one accumulator per part row (d / k = 64 elements), one step each
    (QRConfig(collisions=100, operation="concat"), BlockwiseAdagrad, {"lr": 0.01}, 281_600 + 4_400 + 8),
    (QRConfig(collisions=100, operation="concat"), RowWiseAdagrad, {"lr": 0.01}, 281_600 + 4_400 + 8),
    (QRConfig(collisions=100, operation="concat"), torch.optim.Adagrad, {"lr": 0.01}, 2 * 281_600 + 8),
])
def test_planner_charges_what_the_module_and_its_optimizer_hold(config, optimizer, kwargs, stored: int) -> None:
    table = EmbeddingBagConfig(name="t", embedding_dim=D, num_embeddings=100_000, feature_names=["f"])
    module = CompressedEmbeddingBagCollection([table], {"t": config})
    assert _trained_bytes(module, optimizer, kwargs) == stored
    charged = _planned_bytes(nn.Sequential(module), ["t"])["t"]
    assert charged == math.ceil(stored / (4 * D)) * 4 * D, "the stored bytes rounded up to a whole stand-in row"


def test_planner_splits_a_shared_memory_and_its_optimizer_state_over_its_tables() -> None:
    tables = [EmbeddingBagConfig(name=n, embedding_dim=D, num_embeddings=rows, feature_names=[n])
              for n, rows in [("big", 300_000), ("small", 100_000)]]
    robe = RobeConfig(compression=100, chunk_size=16)
    module = CompressedEmbeddingBagCollection(tables, {"big": robe, "small": robe})
    stored = _trained_bytes(module, BlockwiseAdagrad, {"lr": 0.01})
    assert stored == 2_048_080 + 128_000 + 4  # |M| = 512,000 (+ 80 B constants), one accumulator per Z = 16
    charged = _planned_bytes(nn.Sequential(module), ["big", "small"])
    assert charged == {"big": math.ceil(stored * 3 / 4 / (4 * D)) * 4 * D, "small": math.ceil(stored / 4 / (4 * D)) * 4 * D}


def test_mlperf_plan_replicates_compressed_tables_and_fits_8_gpus() -> None:
    model = Model(robe_on_large_tables())
    big_plain = {"t_11": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])}
    planner = make_planner(model, topology(8), constraints=big_plain)
    plan = planner.plan(model, SHARDERS).get_plan_for_module("sparse")
    compressed = robe_on_large_tables()
    assert set(plan) == {t.name for t in mlperf_tables()}
    for table, sharding in plan.items():
        if table in compressed:
            assert sharding.sharding_type == ShardingType.DATA_PARALLEL.value and sharding.compute_kernel == "dense"
            assert sharding.ranks == list(range(8)), "replicated on every rank"
    assert plan["t_11"].sharding_type == ShardingType.TABLE_WISE.value, "plain tables keep TorchRec's sharding"


def in_hbm() -> dict[str, ParameterConstraints]:
    """Every table in GPU memory (no UVM offload to the host), as the 1-GPU question means."""
    return {t.name: ParameterConstraints(compute_kernels=["fused"]) for t in mlperf_tables()}


def test_uncompressed_mlperf_tables_do_not_fit_one_gpu() -> None:
    with pytest.raises(PlannerError):
        make_planner(Model({}), topology(1), constraints=in_hbm()).plan(Model({}), SHARDERS)


def test_compressed_mlperf_tables_fit_one_gpu() -> None:
    model = Model(robe_on_large_tables())
    plan = make_planner(model, topology(1), constraints=in_hbm()).plan(model, SHARDERS).get_plan_for_module("sparse")
    assert all(plan[t].sharding_type == ShardingType.DATA_PARALLEL.value for t in robe_on_large_tables())


def test_planner_refuses_a_non_replicated_constraint_for_a_compressed_table() -> None:
    model = Model(robe_on_large_tables())
    bad = {"t_0": ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value])}
    with pytest.raises(ValueError, match="'t_0' is compressed and must stay data_parallel"):
        make_planner(model, topology(8), constraints=bad)



def test_planner_is_exposed_as_an_entry_point() -> None:
    from importlib.metadata import entry_points

    (entry,) = [e for e in entry_points(group="torchrec_pss.planners") if e.name == "default"]
    assert entry.load() is make_planner


def test_sharder_exposes_fused_params_like_torchrecs_sharders() -> None:
    """TorchRec's shard estimators read ``sharder.fused_params`` (torchrec 1.6 fails without it)."""
    params = {"learning_rate": 0.1}
    assert CompressedEmbeddingBagCollectionSharder(params).fused_params == params
    assert CompressedEmbeddingBagCollectionSharder().fused_params is None
