"""ROBE-Z forward against the slow reference (tests/robe_reference.py)."""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from helpers import make_kjt, random_bags, random_weights
from reference import reference_pooled
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.hashing import hash_coefficients

D = 8


def build(z: int, use_sign: bool, pooling: PoolingType, weighted: bool, memory_size: int = 97):
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=D, num_embeddings=50, feature_names=["f1", "f2"], pooling=pooling),
        EmbeddingBagConfig(name="t2", embedding_dim=D, num_embeddings=30, feature_names=["f3"], pooling=pooling),
    ]
    config = RobeConfig(memory_size=memory_size, chunk_size=z, use_sign=use_sign, seed=3)
    module = CompressedEmbeddingBagCollection(tables, {"t1": config, "t2": config}, is_weighted=weighted)
    return module, module.pss_memories["robe_default"]


@pytest.mark.parametrize("z", [1, 4, D, 2 * D])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
def test_forward_matches_reference(z: int, use_sign: bool, pooling: PoolingType, weighted: bool) -> None:
    module, memory = build(z, use_sign, pooling, weighted)
    rng = random.Random(z * 7 + use_sign)
    sizes = {"f1": 50, "f2": 50, "f3": 30}
    bags = {f: random_bags(rng, n, batch=5, max_len=4) for f, n in sizes.items()}
    weights = {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None
    out = module(make_kjt(bags, weights)).to_dict()
    tables = {"f1": "t1", "f2": "t1", "f3": "t2"}
    for feature, table in tables.items():
        expected = reference_pooled(
            memory.weight.detach(), memory.hash_coefficients, table, D, z, use_sign, bags[feature],
            None if weights is None else weights[feature], mean=pooling == PoolingType.MEAN,
        )
        torch.testing.assert_close(out[feature].double(), expected, rtol=1e-5, atol=1e-6)
        assert torch.all(out[feature][0] == 0), "empty bag must pool to zeros"


def test_small_memory_wraps_circularly() -> None:
    """|M| smaller than a chunk: every run wraps around the memory several times."""
    module, memory = build(2 * D, False, PoolingType.SUM, False, memory_size=5)
    bags = {"f1": [[0, 49], [7]], "f2": [[], [3]], "f3": [[29], [1, 1]]}
    out = module(make_kjt(bags)).to_dict()
    expected = reference_pooled(memory.weight.detach(), memory.hash_coefficients, "t1", D, 2 * D, False, bags["f1"])
    torch.testing.assert_close(out["f1"].double(), expected, rtol=1e-5, atol=1e-6)


def test_recover_matches_reference_for_every_id() -> None:
    module, memory = build(4, False, PoolingType.SUM, False)
    ids = torch.arange(50)
    expected = reference_pooled(memory.weight.detach(), memory.hash_coefficients, "t1", D, 4, False,
                                [[i] for i in range(50)])
    torch.testing.assert_close(memory.recover("t1", ids).double(), expected, rtol=1e-6, atol=1e-7)


def test_hash_coefficients_come_from_the_seed() -> None:
    _, memory = build(4, True, PoolingType.SUM, False)
    assert torch.equal(memory.hash_coefficients, hash_coefficients(3, 2))


def test_group_memory_size_from_compression() -> None:
    tables = [
        EmbeddingBagConfig(name="a", embedding_dim=16, num_embeddings=1000, feature_names=["a"]),
        EmbeddingBagConfig(name="b", embedding_dim=16, num_embeddings=3000, feature_names=["b"]),
    ]
    config = RobeConfig(compression=100, chunk_size=8)
    module = CompressedEmbeddingBagCollection(tables, {"a": config, "b": config})
    memory = module.pss_memories["robe_default"]
    assert memory.weight.numel() == 640  # ceil(4000 * 16 / 100)
    assert module.num_bytes() == {"robe_default": 640 * 4 + 2 * 4 * 8 + 2 * 8}
