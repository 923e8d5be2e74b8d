"""Planner helpers: constraints that replicate compressed tables, and the memory-budget mode."""

from __future__ import annotations

import pytest
from torch import nn
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.distributed import compression_for_budget, parse_bytes, pss_constraints

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
    with pytest.raises(ValueError, match="'a' appears in more than one module"):
        pss_constraints(twice)


@pytest.mark.parametrize("text, expected", [("10 MB", 10_000_000), ("10MiB", 10 * 2**20), ("1.5 GB", 1_500_000_000),
                                            (4096, 4096)])
def test_parse_bytes(text, expected) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["ten MB", "10 parsecs", "0 MB", -5])
def test_parse_bytes_refuses(bad) -> None:
    with pytest.raises(ValueError):
        parse_bytes(bad)


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
