"""One memory holding every table of a module, one feature per table: the module pools the KJT's ids as they lie
in one ``PSSMemory.pooled_stacked`` pass (no per-feature split, one ``robe_pooled`` call with a key per bag).

Expected values: the same module pooling table by table (``call_grouping="per_table"``, the general path), which
the rest of the suite checks against the references and TorchRec's EBC.
"""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec_pss_plugins.robe import ops

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.contract import BagRequest

SIZES = {"f1": 50, "f2": 40, "f3": 30}


def stacked_module(grouping: str, pooling: PoolingType, weighted: bool, chunk: int = 4
                   ) -> CompressedEmbeddingBagCollection:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=n, feature_names=[f], pooling=pooling)
              for i, (f, n) in enumerate(SIZES.items())]
    config = RobeConfig(memory_size=97, chunk_size=chunk, use_sign=True)
    module = CompressedEmbeddingBagCollection(tables, {t.name: config for t in tables}, is_weighted=weighted)
    module.memory_for("t0").call_grouping = grouping
    return module


def batch(step: int, weighted: bool, trainable_weights: bool = False) -> KeyedJaggedTensor:
    rng = random.Random(step)
    bags = {f: random_bags(rng, n, batch=6, max_len=4) for f, n in SIZES.items()}
    kjt = make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None)
    if trainable_weights:
        kjt.weights().requires_grad_(True)
    return kjt


def loss_of(values: torch.Tensor) -> torch.Tensor:
    return (values * torch.linspace(-1, 1, values.numel()).view_as(values)).sum() + values.pow(2).sum()


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_stacked_forward_and_gradients_equal_table_by_table(pooling: PoolingType, weighted: bool, chunk: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = ops.robe_pooled
    monkeypatch.setattr(ops, "robe_pooled", lambda *args: calls.append(args[5].numel()) or original(*args))
    stacked, per_table = (stacked_module(g, pooling, weighted, chunk) for g in ("auto", "per_table"))
    kjt, again = batch(0, weighted, weighted), batch(0, weighted, weighted)
    out, expected = stacked(kjt), per_table(again)
    assert calls == [18, 1, 1, 1]  # one call, a key per bag (3 features x 6 bags); then one per table
    assert out.keys() == expected.keys() and out.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(out.values(), expected.values(), rtol=1e-6, atol=1e-6)
    loss_of(out.values()).backward()
    loss_of(expected.values()).backward()
    grad, want = (m.memory_for("t0").weight.grad for m in (stacked, per_table))
    torch.testing.assert_close(grad.to_dense() if grad.is_sparse else grad,
                               want.to_dense() if want.is_sparse else want, rtol=1e-5, atol=1e-6)
    if weighted:
        torch.testing.assert_close(kjt.weights().grad, again.weights().grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adagrad, torch.optim.Adam])
def test_stacked_training_steps_equal_table_by_table(optimizer: type) -> None:
    """Fused SGD / Adagrad (the stacked call reads every table: the fused update sees the whole step) and Adam."""
    modules = [stacked_module(g, PoolingType.SUM, weighted=True) for g in ("auto", "per_table")]
    for module in modules:
        apply_optimizer_in_backward(optimizer, module.parameters(), {"lr": 0.05})
        for step in range(4):
            loss_of(module(batch(step, weighted=True)).values()).backward()
    got, want = (m.memory_for("t0").weight.detach() for m in modules)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_kjt_in_another_order_or_a_mixed_module_takes_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = ops.robe_pooled
    monkeypatch.setattr(ops, "robe_pooled", lambda *args: calls.append(args[5].numel()) or original(*args))
    module = stacked_module("auto", PoolingType.SUM, weighted=False)
    kjt = batch(0, weighted=False)
    reordered = KeyedJaggedTensor.from_jt_dict({f: kjt.to_dict()[f] for f in reversed(SIZES)})
    torch.testing.assert_close(module(reordered).values(), module(kjt).values())
    assert calls == [18, 18]  # the reordered KJT: one call over the three requests (small batch), then stacked
    assert module._stacked_plan is not None
    tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f1", "f2"])]
    assert CompressedEmbeddingBagCollection(tables, {"t": RobeConfig(memory_size=97)})._stacked_plan is None


def test_inputs_are_still_checked_before_a_stacked_pass() -> None:
    module = stacked_module("auto", PoolingType.SUM, weighted=False)
    bags = {f: [[1], [2]] for f in SIZES}
    bags["f3"] = [[1], [30]]
    with pytest.raises(ValueError, match=r"t2.*f3.*30"):
        module(make_kjt(bags))


def test_tables_in_another_order_than_the_memory_s_are_hashed_with_their_own_keys() -> None:
    """``pooled_stacked`` over tables listed in another order than the memory holds them equals ``pooled_many``."""
    memory = stacked_module("auto", PoolingType.SUM, weighted=False).memory_for("t0")
    jagged = batch(0, weighted=False).to_dict()
    order = [("t2", "f3"), ("t0", "f1"), ("t1", "f2")]
    ids = torch.cat([jagged[f].values() for _, f in order])
    lengths = torch.cat([jagged[f].lengths() for _, f in order])
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    with torch.no_grad():
        stacked = memory.pooled_stacked([t for t, _ in order], ids, offsets, None, False, 6)
        expected = memory.pooled_many([BagRequest(t, jagged[f].values(), jagged[f].lengths(), None, False)
                                       for t, f in order])
    torch.testing.assert_close(stacked, torch.cat(expected), rtol=1e-6, atol=1e-6)
