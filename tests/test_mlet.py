"""MLET specifics: collapse to a plain table for inference, initialisation, bad configs."""

from __future__ import annotations

import random

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, MLETConfig, RobeConfig, collapse


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=300, feature_names=["fa", "fb"]),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=200, feature_names=["fc"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=50, feature_names=["fd"]),
    ]


def batch(weighted: bool):
    rng = random.Random(0)
    bags = {f: random_bags(rng, 50, batch=16, max_len=5) for f in ["fa", "fb", "fc", "fd"]}
    return make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None)


def trained(module: CompressedEmbeddingBagCollection) -> CompressedEmbeddingBagCollection:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        module(batch(module.is_weighted())).values().pow(2).sum().backward()
        optimizer.step()
    return module


def test_collapse_gives_a_plain_ebc_with_equal_outputs() -> None:
    """Unweighted: TorchRec's EBC itself refuses weighted MEAN bags."""
    torch.manual_seed(0)
    mlet = MLETConfig(inner_dim=32)
    module = trained(CompressedEmbeddingBagCollection(tables(), {"a": mlet, "b": mlet}))
    served = collapse(module)
    assert type(served) is EmbeddingBagCollection
    for table in tables():
        assert served.embedding_bags[table.name].weight.numel() == table.num_embeddings * table.embedding_dim
    exact = module.memory_for("a").w1.double() @ module.memory_for("a").w2.double()
    assert torch.equal(served.embedding_bags["a"].weight, exact.float())
    torch.testing.assert_close(served(batch(False)).values(), module(batch(False)).values(), rtol=1e-5, atol=1e-6)


def test_collapse_keeps_other_compressed_tables() -> None:
    torch.manual_seed(1)
    compression = {"a": MLETConfig(inner_dim=16), "b": RobeConfig(compression=4, chunk_size=4)}
    module = trained(CompressedEmbeddingBagCollection(tables(), compression, is_weighted=True))
    served = collapse(module)
    assert type(served) is CompressedEmbeddingBagCollection
    assert set(served.compression) == {"b"} and "a" in served.embedding_bags
    torch.testing.assert_close(served(batch(True)).values(), module(batch(True)).values(), rtol=1e-5, atol=1e-6)


def test_factors_start_with_the_papers_variance() -> None:
    torch.manual_seed(2)
    memory = CompressedEmbeddingBagCollection(tables(), {"a": MLETConfig(inner_dim=64)}).memory_for("a")
    for factor in (memory.w1, memory.w2):
        assert abs(factor.std().item() - 0.25) < 0.02 and abs(factor.mean().item()) < 0.02


@pytest.mark.parametrize("inner_dim", [0, -3, 2.5])
def test_bad_inner_dim(inner_dim) -> None:
    with pytest.raises(ValueError, match="MLETConfig.inner_dim must be an int >= 1"):
        MLETConfig(inner_dim=inner_dim)
