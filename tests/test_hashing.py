"""The hashing trick: bucket count, the hash formula, bad configs."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

import reference
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig


def memory_of(config: HashingConfig, n: int = 2**62):
    table = EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=n, feature_names=["f"])
    return CompressedEmbeddingBagCollection([table], {"t": config}).memory_for("t")


def test_buckets_follow_the_universal_hash_for_huge_ids() -> None:
    memory = memory_of(HashingConfig(num_buckets=1013, seed=3))
    ids = [2**62 - 1, 2**40 + 7, 0, 123456789]
    coef, t = memory.hash_coefficients[0].tolist(), reference.table_key("t")
    assert memory.buckets(torch.tensor(ids)).tolist() == [reference.universal_hash(coef, t, x, 0, 1013) for x in ids]


def test_compression_sets_the_bucket_count() -> None:
    memory = memory_of(HashingConfig(compression=16), n=1000)
    assert memory.weight.shape == (63, 4) and memory.num_bytes() == 63 * 4 * 4 + 4 * 8


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of compression and num_buckets"),
        ({"compression": 0.9}, "compression must be"),
        ({"num_buckets": 0}, "num_buckets must be"),
        ({"num_buckets": 4, "gradient": "fast"}, "gradient must be"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HashingConfig(**kwargs)
