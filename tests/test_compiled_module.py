"""``torch.compile(fullgraph=True)`` of a training step through the module, input checks on: no graph break,
the same values and gradients as eager, and bad inputs still refused (by asserts inside the graph)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from helpers import make_kjt
from torchrec_pss import (CompressedEmbeddingBagCollection, HashingConfig, MethodConfig, MLETConfig, QRConfig,
                          RobeConfig, TTConfig)

CONFIGS = {
    "robe": RobeConfig(compression=4, chunk_size=2, gradient="dense"),
    "qr": QRConfig(collisions=4),
    "tt": TTConfig(ranks=4),
    "hashing": HashingConfig(num_buckets=30),
    "mlet": MLETConfig(inner_dim=4),
}
BAGS = {"fa": [[1, 2], [3], []], "fb": [[4], [5, 6, 7], [99]], "fc": [[0], [], [8, 9]]}


def module(config: MethodConfig) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=100, feature_names=["fa"]),
              EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=100, feature_names=["fb"],
                                 pooling=PoolingType.MEAN),
              EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=10, feature_names=["fc"])]
    return CompressedEmbeddingBagCollection(tables, {"a": config, "b": config}, is_weighted=True)


def loss(model: CompressedEmbeddingBagCollection, bags: dict[str, list[list[int]]]) -> torch.Tensor:
    weights = {f: [[0.5 + 0.25 * i for i in range(len(bag))] for bag in b] for f, b in bags.items()}
    return model(make_kjt(bags, weights)).values().pow(2).sum()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_a_compiled_step_equals_eager_and_still_refuses_bad_ids(method: str) -> None:
    eager = module(CONFIGS[method])
    compiled = copy.deepcopy(eager)
    assert eager.validate_inputs
    torch._dynamo.reset()
    step = torch.compile(loss, fullgraph=True, backend="aot_eager")
    expected, got = loss(eager, BAGS), step(compiled, BAGS)
    expected.backward()
    got.backward()
    torch.testing.assert_close(got, expected)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b.grad.to_dense(), a.grad.to_dense(), msg=name)
    bad = copy.deepcopy(BAGS)
    bad["fb"][1][2] = 100
    with pytest.raises(ValueError, match=r"table 'b', feature 'fb': id 100 is outside \[0, 100\)"):
        loss(eager, bad)
    with pytest.raises(RuntimeError, match=r"table 'b', feature 'fb': an id is outside \[0, 100\)"):
        step(compiled, bad)
    bad = copy.deepcopy(BAGS)
    bad["fc"][2][0] = -1
    with pytest.raises(RuntimeError, match=r"table 'c', feature 'fc': an id is outside \[0, 10\)"):
        step(compiled, bad)
