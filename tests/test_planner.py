"""Planning the MLPerf DLRM-DCNv2 tables: compressed tables replicated at their true size, the rest sharded."""

from __future__ import annotations

import pytest
from torch import nn
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingType
from torchrec.optim import apply_optimizer_in_backward

from test_planning_helpers import mlperf_tables
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
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
    memory = model.sparse.pss_memories["robe_default"].weight
    compressed = robe_on_large_tables()
    stand_in_elements = sum(params[t].numel() for t in compressed)
    assert memory.numel() <= stand_in_elements <= memory.numel() + 128 * len(compressed)
    assert all(params[t]._optimizer_classes[0].__name__ == "RowWiseAdagrad" for t in compressed)
    plain = [t for t in params if t not in compressed]
    assert all(params[t] is model.sparse.embedding_bags[t].weight for t in plain)


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
