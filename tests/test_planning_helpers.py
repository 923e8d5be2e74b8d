"""Planner helpers: constraints that replicate compressed tables, and the memory-budget mode."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection
from torchrec.distributed.planner import Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, EmbeddingConfig

from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.distributed import (
    compression_for_budget,
    get_pss_sharders,
    make_planner,
    parse_bytes,
    pss_constraints,
)

# The MLPerf DLRM-DCNv2 Criteo-TB row counts (40M caps), d = 128.
MLPERF_ROWS = [40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209,
               11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36]


def mlperf_tables(d: int = 128) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{i}", embedding_dim=d, num_embeddings=n, feature_names=[f"cat_{i}"])
            for i, n in enumerate(MLPERF_ROWS)]


def test_constraints_replicate_compressed_tables_only() -> None:
    tables = [EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=100, feature_names=[n]) for n in "abc"]
    ebc = CompressedEmbeddingBagCollection(tables, {"a": RobeConfig(compression=10), "b": RobeConfig(compression=10)})
    constraints = pss_constraints(nn.Sequential(nn.Linear(2, 2), ebc))
    assert set(constraints) == {"a", "b"}
    for c in constraints.values():
        assert c.sharding_types == [ShardingType.DATA_PARALLEL.value] and c.compute_kernels == ["dense"]


def test_constraints_refuse_a_compressed_name_used_twice() -> None:
    tables = [EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=100, feature_names=["a"])]
    twice = nn.ModuleList([CompressedEmbeddingBagCollection(tables, {"a": RobeConfig(compression=10)}) for _ in range(2)])
    with pytest.raises(ValueError, match="compressed table 'a' in module '0' shares its name with a compressed table "
                                         "in module '1'"):
        pss_constraints(twice)


def _towers(item_tower: nn.Module, name: str = "t") -> nn.Module:
    """A compressed tower with table ``name`` (2M x 64) beside ``item_tower``."""
    towers = nn.Module()
    tables = [EmbeddingBagConfig(name=name, embedding_dim=64, num_embeddings=2_000_000, feature_names=["f"])]
    towers.user_tower = CompressedEmbeddingBagCollection(tables, {name: RobeConfig(compression=1000)}, device="meta")
    towers.item_tower = item_tower
    return towers


def _plain_tables(cls: type = EmbeddingBagConfig, name: str = "t") -> list:
    return [cls(name=name, embedding_dim=64, num_embeddings=2_000_000, feature_names=["g"])]


@pytest.mark.parametrize("item_tower, where", [
    (EmbeddingBagCollection(_plain_tables(), device=torch.device("meta")), "item_tower"),
    (EmbeddingCollection(_plain_tables(EmbeddingConfig), device=torch.device("meta")), "item_tower"),
    (nn.Sequential(CompressedEmbeddingBagCollection(_plain_tables(), {}, device="meta")), "item_tower.0"),
])
def test_constraints_refuse_a_compressed_name_shared_with_a_plain_table(item_tower: nn.Module, where: str) -> None:
    """A plain table of another module under the compressed table's name would be replicated by its constraint."""
    model = _towers(item_tower)
    message = f"compressed table 't' in module 'user_tower' shares its name with a plain table in module {where!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        pss_constraints(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_planner(model, Topology(world_size=2, compute_device="cpu"))


def test_constraints_name_the_model_itself_when_it_holds_the_clashing_table() -> None:
    model = CompressedEmbeddingBagCollection(_plain_tables(), {}, device="meta")
    model.inner = _towers(nn.Identity()).user_tower
    with pytest.raises(ValueError, match=re.escape("with a plain table in module '' (the model itself)")):
        pss_constraints(model)


def test_distinct_names_plan_the_plain_table_sharded_and_the_compressed_one_replicated() -> None:
    model = _towers(EmbeddingBagCollection(_plain_tables(name="u"), device=torch.device("meta")))
    assert set(pss_constraints(model)) == {"t"}
    plan = make_planner(model, Topology(world_size=2, compute_device="cpu")).plan(
        model, get_pss_sharders() + get_default_sharders())
    assert plan.get_plan_for_module("user_tower")["t"].sharding_type == ShardingType.DATA_PARALLEL.value
    assert plan.get_plan_for_module("item_tower")["u"].sharding_type != ShardingType.DATA_PARALLEL.value, "not replicated"


@pytest.mark.parametrize("text, expected", [("10 MB", 10_000_000), ("10MiB", 10 * 2**20), ("1.5 GB", 1_500_000_000),
                                            (4096, 4096)])
def test_parse_bytes(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["ten MB", "10 parsecs", "0 MB", -5])
def test_parse_bytes_refuses(bad) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_parse_bytes_takes_a_whole_float() -> None:
    assert parse_bytes(2e6) == 2_000_000 and isinstance(parse_bytes(2e6), int)


@pytest.mark.parametrize("bad, message", [
    (1.5, "must be a whole number of bytes, got 1.5"),
    (2e6 + 0.25, "must be a whole number of bytes, got 2000000.25"),
    (float("inf"), "must be a whole number of bytes, got inf"),
    (float("nan"), "must be a whole number of bytes, got nan"),
    (0.0, "must be positive, got 0.0"),
    (-2e6, "must be positive, got -2000000.0"),
])
def test_parse_bytes_refuses_a_float_that_is_not_a_positive_whole_number(bad: float, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_bytes(bad)


@pytest.mark.parametrize("dim, chunk_size", [(8, 8), (32, 32), (37, 1), (48, 24), (64, 32), (80, 20), (100, 25),
                                             (112, 28), (128, 32)])
def test_robe_for_memory_takes_the_largest_chunk_size_dividing_d(dim: int, chunk_size: int) -> None:
    table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=1000, feature_names=["f"])
    config = RobeConfig.for_memory(table, 5000)
    assert (config.chunk_size, config.memory_size, config.share_group) == (chunk_size, 5000, "t")
    assert CompressedEmbeddingBagCollection([table], {"t": config}).memory_for("t").memory_size == 5000


def test_budget_mode_builds_tables_of_width_48_from_a_float_budget() -> None:
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=48, num_embeddings=n, feature_names=[f"f{i}"])
              for i, n in enumerate([200_000, 50_000, 1_000])]
    compression = compression_for_budget(tables, 2e6, RobeConfig.for_memory)
    assert compression == compression_for_budget(tables, 2_000_000, RobeConfig.for_memory)
    assert {name: (c.memory_size, c.chunk_size) for name, c in compression.items()} == {
        "t0": (300_992, 24), "t1": (150_496, 24)}
    module = CompressedEmbeddingBagCollection(tables, compression, device="meta")
    assert sum(module.num_bytes().values()) == 1_998_096 <= 2_000_000


@pytest.mark.parametrize("budget", ["10 MB", "100 MB", "1 GB"])
def test_budget_mode_fits_mlperf_tables_and_compresses_larger_tables_more(budget: str) -> None:
    tables = mlperf_tables()
    compression = compression_for_budget(tables, budget, RobeConfig.for_memory)
    module = CompressedEmbeddingBagCollection(mlperf_tables(), compression, device="meta")
    stored = sum(m.numel() * m.element_size() for m in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())
    assert stored <= parse_bytes(budget)
    sizes = {t.name: t.num_embeddings * t.embedding_dim * 4 for t in tables}
    ratios = {name: sizes[name] / (config.memory_size * 4) for name, config in compression.items()}
    plain = [n for n in sizes if n not in compression]
    assert plain, "small tables stay plain"
    assert max(sizes[n] for n in plain) <= min(sizes[n] for n in compression), "only the largest are compressed"
    by_size = sorted(ratios, key=lambda n: sizes[n])
    assert all(ratios[a] <= ratios[b] + 1e-9 for a, b in zip(by_size, by_size[1:])), "larger tables compressed more"
    assert sum(sizes[n] for n in plain) <= 0.5 * parse_bytes(budget)


def test_budget_that_fits_everything_compresses_nothing() -> None:
    tables = mlperf_tables(d=4)[:5]
    assert compression_for_budget(tables, "1 GB", RobeConfig.for_memory) == {}


def test_budget_too_small_is_refused() -> None:
    with pytest.raises(ValueError, match="too small"):
        compression_for_budget(mlperf_tables(), 1000, RobeConfig.for_memory)
    one = [EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=1000, feature_names=["a"])]
    with pytest.raises(ValueError, match="each of the 1 compressed ones 1024 more for its hash constants"):
        compression_for_budget(one, 100, RobeConfig.for_memory)


def stored_bytes(tables: list[EmbeddingBagConfig], compression: dict) -> int:
    module = CompressedEmbeddingBagCollection(tables, compression, device="meta")
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_a_budget_met_only_by_capping_some_shares_is_met() -> None:
    """90 GB for the MLPerf tables (104.5 GB plain): the smaller compressed tables' shares would compress them
    less than min_ratio (they were all put back to plain, and the budget refused) and the largest' exceed ROBE's
    2^31 - 1 elements; capped, the budget is met."""
    tables = mlperf_tables()
    compression = compression_for_budget(tables, "90 GB", RobeConfig.for_memory)
    assert compression and stored_bytes(tables, compression) <= 90 * 10**9
    sizes = {t.name: t.num_embeddings * t.embedding_dim for t in tables}
    for name, config in compression.items():
        assert config.memory_size <= 2**31 - 2 and sizes[name] / config.memory_size >= 2.0, name


@pytest.mark.parametrize("min_ratio, elements", [(2.0, 80_000), (1.0, 95_744)])
def test_one_table_over_its_budget_is_compressed_at_min_ratio(min_ratio: float, elements: int) -> None:
    """A budget of 0.6x the table: its share (0.6x) would compress it 1.67x, so it is compressed at min_ratio
    (it was refused); with min_ratio 1 it takes the whole share less the hash constants' allowance."""
    table = EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=10_000, feature_names=["a"])
    compression = compression_for_budget([table], 384_000, RobeConfig.for_memory, min_ratio=min_ratio)
    assert compression["a"].memory_size == elements and stored_bytes([table], compression) <= 384_000


def test_tables_of_another_data_type_stay_plain_at_their_size() -> None:
    """Compressed memories are float32: an FP16 table stays plain and counts 2 bytes per element."""
    half = EmbeddingBagConfig(name="h16", embedding_dim=16, num_embeddings=1_000_000, feature_names=["h"],
                              data_type=DataType.FP16)
    full = EmbeddingBagConfig(name="f32", embedding_dim=16, num_embeddings=1_000_000, feature_names=["f"])
    compression = compression_for_budget([half, full], 60_000_000, RobeConfig.for_memory)
    assert set(compression) == {"f32"} and stored_bytes([half, full], compression) <= 60_000_000
