"""One ROBE memory read by several tables: per-bag table keys in one op call, one call per memory in the
module (``pooled_many``), and the fused Adagrad that this makes possible for shared memories.

Expected values: the same bags pooled table by table (one key each), the pure-PyTorch references
(``TORCHREC_PSS_KERNELS=reference``, which also turns the fused update off) and torch's own optimizers.
"""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import apply_optimizer_in_backward
from torchrec_pss_plugins.robe import ops, reference
from torchrec_pss_plugins.robe import robe
from torchrec_pss_plugins.robe.fused_step import FusedRobeStep

from helpers import graph_nodes, make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.hashing import hash_coefficients
from torchrec_pss.optim import BlockwiseAdagrad

D = 8
KEYS = torch.tensor([11, 2**40 + 3, 7])  # one key beyond P: reduced mod P like a table's crc32 key


def three_tables_of_bags(seed: int) -> tuple[torch.Tensor, torch.Tensor, list[int], torch.Tensor]:
    """``(ids, lengths, bags per table, weights)`` of 3 tables' bags, concatenated table after table."""
    rng = random.Random(seed)
    bags = [random_bags(rng, 10**6, batch=b, max_len=5) for b in (4, 3, 5)]
    flat = [bag for table in bags for bag in table]
    ids = torch.tensor([x for bag in flat for x in bag], dtype=torch.int64)
    lengths = torch.tensor([len(bag) for bag in flat])
    weights = torch.tensor([w for bag in random_weights(rng, flat) for w in bag], dtype=torch.float32)
    return ids, lengths, [len(t) for t in bags], weights


def per_table(fn, ids: torch.Tensor, lengths: torch.Tensor, bags: list[int], weights: torch.Tensor | None):
    """``fn(key [1], ids, offsets, weights)`` for each table's bags alone."""
    out, first_bag, first_id = [], 0, 0
    for key, count in zip(KEYS, bags):
        table_lengths = lengths[first_bag:first_bag + count]
        n = int(table_lengths.sum())
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), table_lengths.cumsum(0)])
        w = None if weights is None else weights[first_id:first_id + n]
        out.append(fn(key.view(1), ids[first_id:first_id + n], offsets, w))
        first_bag, first_id = first_bag + count, first_id + n
    return out


@pytest.mark.parametrize("kernels", ["reference", "fast"])
@pytest.mark.parametrize("z,use_sign", [(1, True), (4, False), (2 * D, True)])
@pytest.mark.parametrize("mean,weighted", [(False, False), (True, True)])
def test_per_bag_keys_equal_one_call_per_table(kernels: str, z: int, use_sign: bool, mean: bool, weighted: bool,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Every op with keys ``[B]`` equals the same ops called table by table with keys ``[1]``."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    m = 61
    ids, lengths, bags, weights = three_tables_of_bags(z)
    weights = weights if weighted else None
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    keys = KEYS.repeat_interleave(torch.tensor(bags))
    coefficients = hash_coefficients(5, 2)
    memory = torch.randn(m, generator=torch.Generator().manual_seed(0))
    grad = torch.randn(lengths.numel(), D, generator=torch.Generator().manual_seed(1))
    args = (z, use_sign, mean)

    out = ops.robe_pooled(memory, ids, offsets, weights, coefficients, keys, D, z, use_sign, mean, False)
    expected = torch.cat(per_table(lambda k, i, o, w: reference.pooled_forward(memory, i, o, w, coefficients, k, D, z,
                                                                               use_sign, mean), ids, lengths, bags,
                                   weights))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)

    grads = iter(grad.split(bags))
    memory_grad = ops.robe_pooled_backward(grad, ids, offsets, weights, coefficients, keys, m, z, use_sign, mean)
    expected_grad = sum(per_table(lambda k, i, o, w: reference.pooled_backward(next(grads), i, o, w, coefficients, k,
                                                                               m, z, use_sign, mean),
                                  ids, lengths, bags, weights))
    torch.testing.assert_close(memory_grad, expected_grad, rtol=1e-5, atol=1e-5)

    grads = iter(grad.split(bags))
    weights_grad = ops.robe_weights_grad(grad, memory, ids, offsets, coefficients, keys, z, use_sign, mean)
    expected_weights_grad = torch.cat(per_table(
        lambda k, i, o, w: reference.weights_grad(next(grads), memory, i, o, coefficients, k, z, use_sign, mean),
        ids, lengths, bags, None))
    torch.testing.assert_close(weights_grad, expected_weights_grad, rtol=1e-5, atol=1e-5)

    updated = memory.clone()
    ops.robe_sgd_update_(updated, grad, ids, offsets, weights, coefficients, keys, *args, 0.1)
    torch.testing.assert_close(updated, memory - 0.1 * expected_grad, rtol=1e-5, atol=1e-5)

    updated, sums = memory.clone(), torch.full((16,), 0.5)
    ops.robe_adagrad_update_(updated, sums, grad, ids, offsets, weights, coefficients, keys, *args, 0.1, 1e-8, 4)
    blocks = torch.cat([expected_grad, expected_grad.new_zeros(3)]).view(16, 4)
    expected_sums = 0.5 + blocks.pow(2).mean(1)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-6)
    step = (blocks / (expected_sums.sqrt() + 1e-8).unsqueeze(1)).reshape(-1)[:m]
    torch.testing.assert_close(updated, memory - 0.1 * step, rtol=1e-5, atol=1e-5)


def test_keys_of_the_wrong_length_are_refused() -> None:
    ids, offsets = torch.tensor([1, 2, 3]), torch.tensor([0, 1, 3])
    coefficients, memory = hash_coefficients(5, 2), torch.randn(13)
    with pytest.raises(RuntimeError, match=r"keys must be \[1\].*or \[B\]"):
        ops.robe_pooled(memory, ids, offsets, None, coefficients, torch.tensor([1, 2, 3]), D, 4, False, False, False)


def shared_module(pooling: PoolingType = PoolingType.SUM, dim_of_t3: int = D) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=D, num_embeddings=50, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=D, num_embeddings=40, feature_names=["f3"]),
        EmbeddingBagConfig(name="t3", embedding_dim=dim_of_t3, num_embeddings=30, feature_names=["f4"],
                           pooling=pooling),
        EmbeddingBagConfig(name="plain", embedding_dim=D, num_embeddings=10, feature_names=["f5"]),
    ]
    config = RobeConfig(memory_size=101, chunk_size=4, gradient="dense")
    return CompressedEmbeddingBagCollection(tables, {"t1": config, "t2": config, "t3": config}, is_weighted=True)


def step_batch(step: int):
    rng = random.Random(step)
    sizes = {"f1": 50, "f2": 50, "f3": 40, "f4": 30, "f5": 10}
    bags = {f: random_bags(rng, n, batch=5, max_len=4) for f, n in sizes.items()}
    return make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})


def train(module: CompressedEmbeddingBagCollection, optimizer: type, kwargs: dict, steps: int) -> set[str]:
    """``steps`` in-backward-optimizer steps; the autograd node names of the last step."""
    apply_optimizer_in_backward(optimizer, module.parameters(), kwargs)
    for step in range(steps):
        out = module(step_batch(step)).values()
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + out.pow(2).sum()
        nodes = graph_nodes(loss)
        loss.backward()
    return nodes


def assert_same_parameters(got: torch.nn.Module, want: torch.nn.Module) -> None:
    expected = dict(want.named_parameters())
    for name, param in got.named_parameters():
        torch.testing.assert_close(param, expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("optimizer,kwargs", [(torch.optim.Adagrad, {"lr": 0.1}), (BlockwiseAdagrad, {"lr": 0.1}),
                                              (torch.optim.SGD, {"lr": 0.1})])
def test_a_shared_memory_takes_the_fused_update_and_matches_the_reference(
        optimizer: type, kwargs: dict, pooling: PoolingType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three tables (four features) share one memory: one fused call per step, same steps as the reference —
    also with t3 MEAN beside SUM tables (its bags pooled as sums weighted by 1 / length in the same call)."""
    seen = []
    original = ops.robe_pooled
    monkeypatch.setattr(ops, "robe_pooled", lambda *args: seen.append(args[2].numel() - 1) or original(*args))
    fused = shared_module(pooling)
    nodes = train(fused, optimizer, kwargs, steps=4)
    assert FusedRobeStep.__name__ + "Backward" in nodes and seen == [20] * 4  # one call: 4 features x 5 bags
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", "reference")
    expected = shared_module(pooling)
    assert FusedRobeStep.__name__ + "Backward" not in train(expected, optimizer, kwargs, steps=4)
    assert_same_parameters(fused, expected)


@pytest.mark.parametrize("pooling,dim_of_t3", [(PoolingType.SUM, 2 * D), (PoolingType.MEAN, 2 * D)])
def test_a_memory_read_by_two_calls_keeps_adagrad_unfused(pooling: PoolingType, dim_of_t3: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of another width needs a second call: Adagrad then waits for the whole gradient (unfused) and the
    steps still equal the reference."""
    module = shared_module(pooling, dim_of_t3)
    assert FusedRobeStep.__name__ + "Backward" not in train(module, torch.optim.Adagrad, {"lr": 0.1}, steps=3)
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", "reference")
    expected = shared_module(pooling, dim_of_t3)
    train(expected, torch.optim.Adagrad, {"lr": 0.1}, steps=3)
    assert_same_parameters(module, expected)


@pytest.mark.parametrize("optimizer", [torch.optim.Adagrad, torch.optim.SGD, None])
@pytest.mark.parametrize("grouping,max_floats,calls", [("auto", robe.ONE_CALL_MAX_FLOATS, [20]),
                                                       ("auto", 20 * D - 1, [10, 5, 5]), ("per_width", 0, [20]),
                                                       ("per_table", 10**6, [10, 5, 5])])
def test_op_calls_per_step_follow_the_call_grouping(optimizer: type | None, grouping: str, max_floats: int,
                                                    calls: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The module pools every feature of a shared memory's tables in one ``robe_pooled`` call (keys ``[20]``: 4
    features x 5 bags) or in one call per table (keys ``[1]`` of 10, 5, 5 bags), as ``call_grouping`` says:
    ``"auto"`` on the CPU groups up to ``ONE_CALL_MAX_FLOATS`` pooled floats (20 bags x 8 here), and always for a
    fused Adagrad."""
    seen = []
    original = ops.robe_pooled
    monkeypatch.setattr(ops, "robe_pooled", lambda *args: seen.append(args[2].numel() - 1) or original(*args))
    monkeypatch.setattr(robe, "ONE_CALL_MAX_FLOATS", max_floats)
    module = shared_module()
    module.memory_for("t1").call_grouping = grouping
    if optimizer is not None:
        apply_optimizer_in_backward(optimizer, module.parameters(), {"lr": 0.1})
    module(step_batch(0))
    adagrad_groups = optimizer is torch.optim.Adagrad and grouping == "auto"
    assert seen == ([20] if adagrad_groups else calls)


def test_an_unknown_call_grouping_is_refused() -> None:
    module = shared_module()
    module.memory_for("t1").call_grouping = "per_feature"
    with pytest.raises(ValueError, match=r"tables \['t1', 't2', 't3'\]: call_grouping must be one of .*'per_feature'"):
        module(step_batch(0))


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_one_call_per_width_trains_as_one_call_per_table(optimizer: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """One ``robe_pooled`` call for every table's bags of one width and pooling mode gives the steps of one call
    per table: fused SGD, and Adam (not fused: autograd's gradient, then torch's step)."""
    per_table = shared_module()
    per_table.memory_for("t1").call_grouping = "per_table"
    train(per_table, optimizer, {"lr": 0.1}, steps=4)
    seen = []
    original = ops.robe_pooled
    monkeypatch.setattr(ops, "robe_pooled", lambda *args: seen.append(args[2].numel() - 1) or original(*args))
    grouped = shared_module()
    grouped.memory_for("t1").call_grouping = "per_width"
    nodes = train(grouped, optimizer, {"lr": 0.1}, steps=4)
    assert seen == [20] * 4  # 4 features x 5 bags, one call per step
    assert (FusedRobeStep.__name__ + "Backward" in nodes) == (optimizer is torch.optim.SGD)
    assert_same_parameters(grouped, per_table)
