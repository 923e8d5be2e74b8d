"""``torch.compile(fullgraph=True)`` of a training step through the module, input checks on: no graph break,
the same values and gradients as eager, and bad inputs still refused (by asserts inside the graph)."""

from __future__ import annotations

import copy

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

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


SPARSE = {
    "robe": RobeConfig(compression=4, chunk_size=2, gradient="sparse"),
    "qr": QRConfig(collisions=4, gradient="sparse"),
    "hashing": HashingConfig(num_buckets=30, gradient="sparse"),
    "mlet": MLETConfig(inner_dim=4, gradient="sparse"),
}


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("method, backend", [(method, "aot_eager") for method in sorted(SPARSE)]
                         + [("hashing", "inductor"), ("mlet", "inductor")])
def test_sparse_gradients_of_sum_and_mean_tables_compile(method: str, backend: str, weighted: bool) -> None:
    """A SUM and a MEAN table of one memory with sparse gradients (ROBE: one call, the MEAN bags weighted by
    1 / length; the hashing trick and MLET: through the ``sparse_rows_bag`` op) compile with ``fullgraph=True``
    to eager's values and gradients."""
    eager = module(SPARSE[method])
    if not weighted:
        eager = CompressedEmbeddingBagCollection(eager.embedding_bag_configs(), {"a": SPARSE[method],
                                                                                "b": SPARSE[method]})
    compiled = copy.deepcopy(eager)
    bags = BAGS if weighted else {f: b for f, b in BAGS.items()}

    def step(model: CompressedEmbeddingBagCollection) -> torch.Tensor:
        if weighted:
            return loss(model, bags)
        return model(make_kjt(bags)).values().pow(2).sum()

    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(compiled)
    expected = step(eager)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert b.grad.is_sparse == a.grad.is_sparse, name
        torch.testing.assert_close(b.grad.to_dense(), a.grad.to_dense(), msg=name)


@pytest.mark.parametrize("gradient", ["sparse", "auto"])
def test_robe_read_in_several_calls_under_compile(gradient: str) -> None:
    """Per-table calls of one ROBE memory in a traced graph: PyTorch cannot add their sparse gradients, so
    ``"auto"`` traces a dense one (the same values) and ``"sparse"`` is refused with the way out."""
    eager = module(RobeConfig(compression=2, chunk_size=2, gradient=gradient, auto_dense_ratio=0.01))  # auto: sparse
    for memory in eager.pss_memories.values():
        memory.call_grouping = "per_table"
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    step = torch.compile(loss, fullgraph=True, backend="aot_eager")
    if gradient == "sparse":
        with pytest.raises(Exception, match="needs every table read in one call"):
            step(compiled, BAGS)
        return
    got, expected = step(compiled, BAGS), loss(eager, BAGS)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected)
    memory = dict(eager.named_parameters())
    for name, b in compiled.named_parameters():
        assert memory[name].grad.is_sparse == name.startswith("pss_memories") and not b.grad.is_sparse, name
        torch.testing.assert_close(b.grad, memory[name].grad.to_dense(), msg=name)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("config", [HashingConfig(compression=10), MLETConfig(inner_dim=4)], ids=["hashing", "mlet"])
def test_a_compiled_step_with_an_in_backward_sgd_trains_as_eager(config: MethodConfig, backend: str) -> None:
    """README's set-up under a plain ``torch.compile``: a large MEAN table whose in-backward SGD makes the layout
    ``"auto"`` (sparse rows here), batches of several sizes; the parameters follow eager's."""
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name="user", embedding_dim=8, num_embeddings=10_000, feature_names=["user"],
                                 pooling=PoolingType.MEAN)]
    eager = CompressedEmbeddingBagCollection(tables, {"user": config})
    compiled = copy.deepcopy(eager)
    for model in (eager, compiled):
        apply_optimizer_in_backward(torch.optim.SGD, model.parameters(), {"lr": 0.1})
    torch._dynamo.reset()
    step = torch.compile(lambda model, kjt: model(kjt).values().pow(2).sum(), backend=backend)
    generator = torch.Generator().manual_seed(1)
    for batch in (16, 16, 24, 5):
        lengths = torch.randint(0, 4, (batch,), generator=generator)
        kjt = KeyedJaggedTensor(keys=["user"], values=torch.randint(0, 10_000, (int(lengths.sum()),),
                                                                    generator=generator), lengths=lengths)
        step(compiled, kjt).backward()
        eager(kjt).values().pow(2).sum().backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(b, a, msg=name)
