"""``compress_`` on TorchRec models and the textual compression flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt
from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    QRConfig,
    RobeConfig,
    TTConfig,
    compress_,
    parse_compression_flag,
)


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


def test_flag_parses_defaults_overrides_and_min_rows() -> None:
    flag = parse_compression_flag("robe:compression=1000,chunk_size=32,min_rows=1000;small=qr:collisions=4;x=plain")
    assert flag(tables()[0]) == RobeConfig(compression=1000, chunk_size=32)
    assert flag(tables()[1]) == QRConfig(collisions=4)
    below = EmbeddingBagConfig(name="tiny", embedding_dim=8, num_embeddings=10, feature_names=["t"])
    assert flag(below) is None
    assert flag(EmbeddingBagConfig(name="x", embedding_dim=8, num_embeddings=10**6, feature_names=["x"])) is None
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
    ],
)
def test_flag_errors(flag: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_compression_flag(flag)
