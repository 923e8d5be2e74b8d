"""``compress_`` on TorchRec models and the textual compression flag."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_dmp, make_kjt, spawn_ranks
from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    QRConfig,
    RobeConfig,
    TTConfig,
    compress_,
    parse_compression_flag,
)
from torchrec_pss.compress import ConfigChoice, FilterFn


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=5000, feature_names=["a"]),
        EmbeddingBagConfig(name="small", embedding_dim=8, num_embeddings=50, feature_names=["b"]),
    ]


def dlrm() -> DLRM:
    torch.manual_seed(0)
    return DLRM(embedding_bag_collection=EmbeddingBagCollection(tables()), dense_in_features=4,
                dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def test_compress_swaps_the_ebc_of_a_dlrm_and_it_still_trains() -> None:
    model = dlrm()
    original = model.sparse_arch.embedding_bag_collection
    kjt = make_kjt({"a": [[1, 4999], [7]], "b": [[3], []]})
    dense = torch.randn(2, 4)
    before = model(dense, kjt)
    assert compress_(model, {"big": RobeConfig(compression=10, chunk_size=4)}) is model
    swapped = model.sparse_arch.embedding_bag_collection
    assert isinstance(swapped, CompressedEmbeddingBagCollection) and swapped.compression.keys() == {"big"}
    assert torch.equal(swapped.embedding_bags["small"].weight, original.embedding_bags["small"].weight)
    assert model(dense, kjt).shape == before.shape
    generator = torch.Generator().manual_seed(1)
    effect = 2 * torch.randn(50, generator=generator)
    optimizer = torch.optim.Adagrad(model.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        ids_a, ids_b = torch.randint(0, 5000, (128,), generator=generator), torch.randint(0, 50, (128,), generator=generator)
        dense = torch.randn(128, 4, generator=generator)
        labels = torch.bernoulli(torch.sigmoid(effect[ids_b] + dense[:, 0]), generator=generator)
        kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([ids_a, ids_b]),
                                lengths=torch.ones(256, dtype=torch.int64))
        loss = nn.functional.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])


def test_compress_config_forms() -> None:
    robe = RobeConfig(compression=10, chunk_size=4)
    everything = compress_(dlrm(), robe).sparse_arch.embedding_bag_collection
    assert everything.compression == {"big": robe, "small": robe}
    by_callable = compress_(dlrm(), lambda t: robe if t.num_embeddings > 1000 else None)
    assert by_callable.sparse_arch.embedding_bag_collection.compression == {"big": robe}
    with pytest.raises(ValueError, match=r"names tables \['nope'\]"):
        compress_(dlrm(), {"nope": robe})


def test_compress_respects_filter_fn_and_leaves_other_modules() -> None:
    model = nn.ModuleDict({"keep": EmbeddingBagCollection(tables()), "swap": EmbeddingBagCollection(tables())})
    compress_(model, RobeConfig(compression=10, chunk_size=4), filter_fn=lambda module, fqn: fqn == "swap")
    assert type(model["keep"]) is EmbeddingBagCollection
    assert isinstance(model["swap"], CompressedEmbeddingBagCollection)


def one_table_ebc(name: str, rows: int = 1000, device: str | None = None) -> EmbeddingBagCollection:
    """An EBC of one table ``name`` read by feature ``name``."""
    table = EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=rows, feature_names=[name])
    return EmbeddingBagCollection([table], device=None if device is None else torch.device(device))


def two_towers() -> nn.Module:
    """A model with two EBCs: ``user`` (table ``user``) and ``item`` (table ``item``)."""
    torch.manual_seed(0)
    model = nn.Module()
    model.user, model.item = one_table_ebc("user"), one_table_ebc("item", rows=2000)
    return model


def test_compress_mapping_applies_across_the_ebcs_of_a_model() -> None:
    model = two_towers()
    item = model.item
    kjt = make_kjt({"item": [[0, 1999], [5]]})
    expected = item(kjt).to_dict()["item"]
    robe = RobeConfig(compression=10, chunk_size=4)
    compress_(model, {"user": robe})
    assert model.user.compression == {"user": robe}
    assert isinstance(model.item, CompressedEmbeddingBagCollection) and model.item.compression == {}
    assert torch.equal(model.item.embedding_bags["item"].weight, item.embedding_bags["item"].weight)
    assert torch.equal(model.item(kjt).to_dict()["item"], expected)
    both = compress_(two_towers(), {"user": robe, "item": QRConfig(collisions=4)})
    assert both.user.compression == {"user": robe} and both.item.compression == {"item": QRConfig(collisions=4)}


@pytest.mark.parametrize(
    "config, filter_fn, unknown",
    [
        ({"user": RobeConfig(compression=10), "usr": RobeConfig(compression=10)}, None, "usr"),
        ({"item": RobeConfig(compression=10)}, lambda module, fqn: fqn == "user", "item"),
        (parse_compression_flag("robe:compression=10;T_1=plain"), None, "T_1"),
        (parse_compression_flag("robe:compression=10;item=plain;t_99=plain"), None, "t_99"),
    ],
)
def test_compress_refuses_unknown_tables_before_replacing_anything(config: ConfigChoice, filter_fn: FilterFn | None,
                                                                   unknown: str) -> None:
    model = two_towers()
    user, item = model.user, model.item
    with pytest.raises(ValueError, match=rf"names tables \['{unknown}'\].*tables: \[.*'user'"):
        compress_(model, config, filter_fn=filter_fn)
    assert model.user is user and model.item is item


def test_compress_builds_every_replacement_before_swapping() -> None:
    model = two_towers()
    user, item = model.user, model.item
    with pytest.raises(ValueError, match="table 'item'"):
        compress_(model, parse_compression_flag("tt:ranks=4,p_shapes=[10,10,10],q_shapes=[2,2,2]"))
    assert model.user is user and model.item is item


def test_compress_replaces_a_shared_ebc_under_every_name() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.query_tower = one_table_ebc("tok")
    model.doc_tower = model.query_tower
    model.heads = nn.ModuleDict({"tied": model.query_tower})
    weight = model.query_tower.embedding_bags["tok"].weight.clone()
    kjt = make_kjt({"tok": [[3, 999], [7]]})
    expected = model.query_tower(kjt).to_dict()["tok"]
    compress_(model, lambda table: None, filter_fn=lambda module, fqn: fqn == "doc_tower")
    swapped = model.query_tower
    assert isinstance(swapped, CompressedEmbeddingBagCollection)
    assert model.doc_tower is swapped and model.heads["tied"] is swapped
    assert torch.equal(swapped.embedding_bags["tok"].weight, weight)
    assert torch.equal(model.doc_tower(kjt).to_dict()["tok"], expected)
    assert len(list(model.parameters())) == 1
    compress_(model, RobeConfig(compression=10, chunk_size=4))
    assert type(model.query_tower) is CompressedEmbeddingBagCollection and model.query_tower is model.doc_tower
    shared = nn.Module()
    shared.a = nn.Sequential(one_table_ebc("tok"))
    shared.b = shared.a
    robe = RobeConfig(compression=10, chunk_size=4)
    compress_(shared, robe)
    assert shared.b is shared.a and shared.a[0].compression == {"tok": robe}


def test_filter_fn_sees_every_name_of_a_shared_ebc() -> None:
    """``named_modules`` drops repeated parents: an EBC under ``a.0`` and ``b.0`` is offered under both."""
    shared = nn.Module()
    shared.a = nn.Sequential(one_table_ebc("tok"))
    shared.b = shared.a
    seen = []
    compress_(shared, RobeConfig(compression=10, chunk_size=4), filter_fn=lambda m, fqn: seen.append(fqn) or fqn == "b.0")
    assert seen == ["a.0", "b.0"] and type(shared.a[0]) is CompressedEmbeddingBagCollection and shared.b is shared.a


def _compress_a_sharded_model(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=1)
    model = make_dmp(nn.Sequential(one_table_ebc("p")), world=1)
    errors = []
    for config in (RobeConfig(compression=10, chunk_size=4), {"p": RobeConfig(compression=10, chunk_size=4)}):
        try:
            compress_(model, config)
        except ValueError as error:
            errors.append(str(error))
    torch.save({"errors": errors, "module": type(model.module[0]).__name__}, os.path.join(out_dir, f"dmp{rank}.pt"))
    dist.destroy_process_group()


def test_a_sharded_model_is_refused_with_the_order_to_follow() -> None:
    """``compress_`` after ``DistributedModelParallel``: there is no EBC left to swap, so it says to compress first
    (it returned the model unchanged, or blamed the tables)."""
    (result,) = spawn_ranks(_compress_a_sharded_model, 1, "dmp")
    assert result["module"] == "ShardedEmbeddingBagCollection" and len(result["errors"]) == 2
    assert all("sharded already" in e and "before DistributedModelParallel" in e for e in result["errors"])


def test_compress_builds_on_the_device_of_the_weights() -> None:
    tables = [EmbeddingBagConfig(name="a", embedding_dim=4, num_embeddings=10, feature_names=["a"]),
              EmbeddingBagConfig(name="b", embedding_dim=4, num_embeddings=1000, feature_names=["b"])]
    ebc = EmbeddingBagCollection(tables, device=torch.device("meta"))
    ebc.to_empty(device="cpu")
    with torch.no_grad():
        ebc.embedding_bags["a"].weight.copy_(torch.arange(40, dtype=torch.float32).reshape(10, 4))
    kjt = make_kjt({"a": [[1, 9], [4]], "b": [[0], [999]]})
    expected = ebc(kjt).to_dict()["a"]
    compressed = compress_(ebc, {"b": RobeConfig(compression=10, chunk_size=4)})
    assert compressed.device == torch.device("cpu")
    assert all(not parameter.is_meta for parameter in compressed.parameters())
    assert torch.equal(compressed.embedding_bags["a"].weight, ebc.embedding_bags["a"].weight)
    assert torch.equal(compressed(kjt).to_dict()["a"], expected)
    on_meta = compress_(one_table_ebc("m", device="meta"), lambda table: None)
    assert on_meta.embedding_bags["m"].weight.is_meta


def test_flag_parses_defaults_overrides_and_min_rows() -> None:
    flag = parse_compression_flag("robe:compression=1000,chunk_size=32,min_rows=1000;small=qr:collisions=4;x=plain")
    assert flag(tables()[0]) == RobeConfig(compression=1000, chunk_size=32)
    assert flag(tables()[1]) == QRConfig(collisions=4)
    below = EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=10, feature_names=["t"])
    assert flag(below) is None
    assert flag(EmbeddingBagConfig(name="x", embedding_dim=8, num_embeddings=10**6, feature_names=["x"])) is None
    assert parse_compression_flag("robe:compression=10,min_rows=0").min_rows == 0
    assert parse_compression_flag("robe:compression=10,min_rows=100_000").min_rows == 100_000
    for text, sign in (("true", True), ("FALSE", False), ("True", True), ("False", False)):
        assert parse_compression_flag(f"robe:compression=10,use_sign={text}").default.use_sign is sign
    tt = parse_compression_flag("tt:ranks=[4,8],p_shapes=[10,10,10],q_shapes=[2,2,2]")
    assert tt(tables()[1]) == TTConfig(ranks=(4, 8), p_shapes=(10, 10, 10), q_shapes=(2, 2, 2))
    model = compress_(dlrm(), parse_compression_flag("robe:compression=10,chunk_size=4,min_rows=1000"))
    assert model.sparse_arch.embedding_bag_collection.compression.keys() == {"big"}


@pytest.mark.parametrize(
    "flag, message",
    [
        ("zip:ratio=3", "unknown compression method 'zip'"),
        ("robe:compresion=10", "RobeConfig has no field 'compresion'"),
        ("robe:compression", "expected <field>=<value>"),
        ("robe:compression=10;qr:collisions=4", "more than one default clause"),
        ("robe:compression=0.5", "compression must be"),
        ("plain:x=1", "'plain' takes no fields"),
        ("robe:compression=10;t_1=plain;t_1=qr:collisions=4", "table 't_1' is overridden twice"),
        ("robe:compression=10;t_1=plain; t_1 =plain", "table 't_1' is overridden twice"),
        ("robe:compression=10,compression=100", "field 'compression' given twice"),
        ("robe:compression=10,min_rows=5,min_rows=6", "field 'min_rows' given twice"),
        ("robe:compression=10;=plain", "names no table"),
        ("robe:compression=10,min_rows=1.5", "min_rows must be a non-negative int, got '1.5'"),
        ("robe:compression=10,min_rows=-5", "min_rows must be a non-negative int, got '-5'"),
        ("robe:compression=10,min_rows=1e3", "min_rows must be a non-negative int, got '1e3'"),
        ("robe:compression=10,min_rows=abc", "min_rows must be a non-negative int, got 'abc'"),
        ("robe:compression=10,min_rows=True", "min_rows must be a non-negative int, got 'True'"),
        ("robe:compression=10;t_1=qr:collisions=4,min_rows=5", "'min_rows' belongs in the default clause"),
        ("compression=100,chunk_size=8", r"unknown compression method '100,chunk_size=8' in '100,chunk_size=8' \(the "
                                         "clause reads as an override of table 'compression'"),
        ("robe:compression=10,use_sign=yes", "RobeConfig.use_sign must be True or False, got 'yes'"),
    ],
)
def test_flag_errors(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compression_flag(flag)


def test_compress_keeps_frozen_sparse_plain_tables_and_the_training_mode() -> None:
    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name=n, embedding_dim=8, num_embeddings=100, feature_names=[n])
                                  for n in ("big", "frozen")])
    ebc.embedding_bags["frozen"].weight.requires_grad_(False)
    ebc.embedding_bags["frozen"].sparse = True
    model = nn.Sequential(ebc).eval()
    compress_(model, {"big": RobeConfig(compression=10, chunk_size=4)})
    swapped = model[0]
    assert isinstance(swapped, CompressedEmbeddingBagCollection) and not swapped.training
    frozen = swapped.embedding_bags["frozen"]
    assert not frozen.weight.requires_grad and frozen.sparse
    assert swapped.memory_for("big").weight.requires_grad


def test_one_kjt_feeds_several_ebcs_after_compress() -> None:
    """A two-tower model passes one KJT with both towers' features to each EBC (TorchRec's EBC ignores keys it
    does not read); after compress_ it runs and the uncompressed tower's output is unchanged."""
    model = two_towers()
    kjt = make_kjt({"user": [[1, 2], [3]], "item": [[0, 1999], [5]]})
    expected = model.item(kjt).to_dict()["item"]
    compress_(model, {"user": RobeConfig(compression=10, chunk_size=4)})
    user = model.user(kjt).to_dict()
    assert list(user) == ["user"] and user["user"].shape == (2, 8)
    assert torch.equal(model.item(kjt).to_dict()["item"], expected)
