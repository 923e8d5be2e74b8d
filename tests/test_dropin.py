"""CompressedEmbeddingBagCollection as a drop-in EmbeddingBagCollection."""

from __future__ import annotations

import dataclasses
import random
import warnings

import pytest
import torch
import torchrec.fx
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig, MLETConfig, QRConfig, RobeConfig, TTConfig


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=40, feature_names=["f1", "shared"]),
        EmbeddingBagConfig(name="t2", embedding_dim=4, num_embeddings=30, feature_names=["f2", "shared"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="t3", embedding_dim=16, num_embeddings=20, feature_names=["f3"]),
    ]


def batch(weighted: bool = False) -> KeyedJaggedTensor:
    rng = random.Random(0)
    bags = {f: random_bags(rng, 20, batch=6, max_len=3) for f in ["f3", "shared", "f2", "f1"]}
    return make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None)


def test_keys_order_and_dims_equal_ebc() -> None:
    kjt = batch()
    expected = EmbeddingBagCollection(tables())(kjt)
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2, chunk_size=4),
                                                         "t2": RobeConfig(compression=2, chunk_size=2, share_group="b")})
    out = module(kjt)
    assert out.keys() == expected.keys() == ["f1", "shared@t1", "f2", "shared@t2", "f3"]
    assert out.length_per_key() == expected.length_per_key()
    assert out.values().shape == expected.values().shape
    assert module.embedding_bag_configs() == module._embedding_bag_configs and not module.is_weighted()
    assert module.device == torch.device("cpu")


def test_plain_tables_equal_ebc_outputs() -> None:
    """With no compression the module is numerically an EBC (same state_dict keys, same outputs), and an EBC's
    state_dict loads strictly, also nested in a model (the module's own table signatures stand in for the ones
    the EBC has none of)."""
    ebc = EmbeddingBagCollection(tables(), is_weighted=False)
    module = CompressedEmbeddingBagCollection(tables())
    module.load_state_dict(ebc.state_dict())
    assert set(module.state_dict()) - set(ebc.state_dict()) == {"_extra_state"}
    torch.testing.assert_close(module(batch()).values(), ebc(batch()).values())
    nested = torch.nn.Sequential(CompressedEmbeddingBagCollection(tables()))
    nested.load_state_dict(torch.nn.Sequential(ebc).state_dict())
    torch.testing.assert_close(nested[0](batch()).values(), ebc(batch()).values())
    compressed = CompressedEmbeddingBagCollection(tables(), {"t3": RobeConfig(compression=2, chunk_size=4)})
    with pytest.raises(ValueError, match=r"missing \['_extra_state', 'pss_memories.robe_default"):
        compressed.load_state_dict(ebc.state_dict())


def test_plain_tables_keep_the_configs_data_type() -> None:
    """An FP16 plain table is stored in float16, as torchrec's EBC stores it (it was float32: twice the bytes),
    and pools into float32 like the EBC; weighted (which torchrec's EBC fails on for FP16 tables) like an FP32
    EBC holding the same values, to half precision."""
    configs = [EmbeddingBagConfig(name="h", embedding_dim=8, num_embeddings=20, feature_names=["f1"],
                                  data_type=DataType.FP16),
               EmbeddingBagConfig(name="s", embedding_dim=8, num_embeddings=20, feature_names=["f2"])]
    ebc = EmbeddingBagCollection(configs)
    module = CompressedEmbeddingBagCollection(configs)
    module.load_state_dict(ebc.state_dict())
    assert module.embedding_bags["h"].weight.dtype == ebc.embedding_bags["h"].weight.dtype == torch.float16
    assert module.num_bytes()["h"] == 20 * 8 * 2
    rng = random.Random(1)
    bags = {f: random_bags(rng, 20, batch=5, max_len=3) for f in ("f1", "f2")}
    got, want = module(make_kjt(bags)).values(), ebc(make_kjt(bags)).values()
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want)

    weighted = CompressedEmbeddingBagCollection(configs, is_weighted=True)
    weighted.load_state_dict(ebc.state_dict())
    fp32 = EmbeddingBagCollection([dataclasses.replace(c, data_type=DataType.FP32) for c in configs], is_weighted=True)
    fp32.load_state_dict({k: v.float() for k, v in ebc.state_dict().items()})
    kjt = make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})
    torch.testing.assert_close(weighted(kjt).values(), fp32(kjt).values(), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("compressed", [None, RobeConfig(memory_size=64, chunk_size=4), QRConfig(collisions=4),
                                        TTConfig(ranks=2), MLETConfig(inner_dim=4), HashingConfig(num_buckets=8)])
def test_pooling_none_is_refused(compressed) -> None:
    """``PoolingType.NONE`` is refused as torchrec's EBC refuses it; compressed tables had pooled it as SUM."""
    configs = [EmbeddingBagConfig(name="n", embedding_dim=8, num_embeddings=40, feature_names=["f"],
                                  pooling=PoolingType.NONE)]
    with pytest.raises(ValueError, match="table 'n': pooling PoolingType.NONE is not supported"):
        CompressedEmbeddingBagCollection(configs, {} if compressed is None else {"n": compressed})


def test_mixed_module_keeps_plain_table_outputs() -> None:
    ebc = EmbeddingBagCollection(tables())
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=4, chunk_size=4)})
    module.load_state_dict({k: v for k, v in ebc.state_dict().items() if "t1" not in k}, strict=False)
    got, want = module(batch()).to_dict(), ebc(batch()).to_dict()
    for key in ["f2", "shared@t2", "f3"]:
        torch.testing.assert_close(got[key], want[key])


def test_weighted_sum_plain_table_matches_ebc() -> None:
    sum_tables = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=20, feature_names=["f1", "f3"])]
    ebc = EmbeddingBagCollection(sum_tables, is_weighted=True)
    module = CompressedEmbeddingBagCollection(sum_tables, is_weighted=True)
    module.load_state_dict(ebc.state_dict(), strict=False)
    full = batch(weighted=True)
    kjt = KeyedJaggedTensor.from_jt_dict({f: full[f] for f in ["f1", "f3"]})
    torch.testing.assert_close(module(kjt).values(), ebc(kjt).values())
    torch.testing.assert_close(module(full).values(), ebc(full).values())  # keys it does not read are ignored


def synthetic_click_batch(generator: torch.Generator, batch_size: int, num_embeddings: int,
                          planted: dict[str, torch.Tensor]) -> tuple[torch.Tensor, KeyedJaggedTensor, torch.Tensor]:
    """Dense features, two id features and labels from a planted logistic model."""
    dense = torch.randn(batch_size, 4, generator=generator)
    ids = {f: torch.randint(0, num_embeddings, (batch_size,), generator=generator) for f in planted}
    logit = 1.5 * dense[:, 0] + sum(planted[f][ids[f]] for f in planted)
    labels = torch.bernoulli(torch.sigmoid(logit), generator=generator)
    kjt = KeyedJaggedTensor(keys=list(planted), values=torch.cat([ids[f] for f in planted]),
                            lengths=torch.ones(batch_size * len(planted), dtype=torch.int64))
    return dense, kjt, labels


SMOKE_CONFIGS = {
    "robe": RobeConfig(compression=10, chunk_size=4, gradient="dense"),
    "qr": QRConfig(collisions=10),
    "tt": TTConfig(ranks=4),
    "mlet": MLETConfig(inner_dim=32),
    "hashing": HashingConfig(compression=2),
}


@pytest.mark.parametrize("method", SMOKE_CONFIGS)
def test_dlrm_with_compressed_tables_learns_planted_signal(method: str) -> None:
    torch.manual_seed(0)
    n = 500
    configs = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=n, feature_names=[f]) for f in ("a", "b")]
    config = SMOKE_CONFIGS[method]
    ebc = CompressedEmbeddingBagCollection(configs, {"t_a": config, "t_b": config})
    model = DLRM(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[16, 8],
                 over_arch_layer_sizes=[16, 1])
    generator = torch.Generator().manual_seed(1)
    planted = {f: 2.0 * torch.randn(n, generator=generator) for f in ("a", "b")}
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.1)
    losses = []
    for _ in range(200):
        dense, kjt, labels = synthetic_click_batch(generator, 512, n, planted)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.85 * first, (first, last)


def test_dlrm_dcn_accepts_the_module() -> None:
    configs = [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100, feature_names=["a", "b"])]
    ebc = CompressedEmbeddingBagCollection(configs, {"t": RobeConfig(compression=10, chunk_size=8)})
    model = DLRM_DCN(embedding_bag_collection=ebc, dense_in_features=4, dense_arch_layer_sizes=[8],
                     over_arch_layer_sizes=[8, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
    kjt = make_kjt({"a": [[1], [2, 3]], "b": [[], [4]]})
    out = model(torch.randn(2, 4), kjt)
    assert out.shape == (2, 1) and torch.isfinite(out).all()


def test_meta_device_materialises_like_dmp_does() -> None:
    """Built on meta, moved with to_empty and reset (what DistributedModelParallel does), it works."""
    robe = RobeConfig(compression=4, chunk_size=4, seed=9)
    on_meta = CompressedEmbeddingBagCollection(tables(), {"t1": robe}, device="meta")
    assert on_meta.pss_memories["robe_default"].weight.is_meta
    materialised = on_meta.to_empty(device="cpu")
    materialised.reset_parameters()
    reference = CompressedEmbeddingBagCollection(tables(), {"t1": robe})
    memory, expected = materialised.pss_memories["robe_default"], reference.pss_memories["robe_default"]
    assert torch.equal(memory.hash_coefficients, expected.hash_coefficients)
    assert torch.equal(memory.table_keys, expected.table_keys)
    with torch.no_grad():
        memory.weight.copy_(expected.weight)
        for name, bag in materialised.embedding_bags.items():
            bag.weight.copy_(reference.embedding_bags[name].weight)
    torch.testing.assert_close(materialised(batch()).values(), reference(batch()).values())


def test_an_init_fn_of_a_compressed_table_is_named_as_ignored() -> None:
    constant = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=40, feature_names=["f"],
                                   init_fn=lambda weight: torch.nn.init.constant_(weight, 0.5))]
    with pytest.warns(UserWarning, match="table 't': init_fn .* its robe memory is initialised by its method config"):
        CompressedEmbeddingBagCollection(constant, {"t": RobeConfig(compression=4)})
    plain = CompressedEmbeddingBagCollection(constant)
    assert torch.equal(plain.embedding_bags["t"].weight, torch.full((40, 4), 0.5))
    bounded = [EmbeddingBagConfig(name="t", embedding_dim=4, num_embeddings=40, feature_names=["f"],
                                  weight_init_min=-0.1, weight_init_max=0.1)]
    with pytest.warns(UserWarning, match="table 't': init_fn / weight_init_min / weight_init_max"):
        CompressedEmbeddingBagCollection(bounded, {"t": RobeConfig(compression=4)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=4, chunk_size=4)})


def test_torchrec_fx_traces_the_module_as_a_leaf_and_explains_how() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=4, chunk_size=4)})
    model = nn.Sequential()
    model.ebc = module
    with pytest.raises(TypeError, match=r"leaf_modules=\['CompressedEmbeddingBagCollection'\]"):
        torchrec.fx.symbolic_trace(model)
    traced = torchrec.fx.symbolic_trace(model, leaf_modules=["CompressedEmbeddingBagCollection"])
    torch.testing.assert_close(traced(batch()).values(), module(batch()).values())
