"""Bad input and bad configs raise errors that name the table, feature, field and value."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt
from torchrec_pss import CompressedEmbeddingBagCollection, MethodConfig, RobeConfig


def tables():
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=10, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=10, feature_names=["f2"]),
    ]


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("bad_id", [-1, 10, 2**40])
def test_out_of_range_ids_name_table_and_feature(compressed: bool, bad_id: int) -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)} if compressed else {})
    with pytest.raises(ValueError, match=rf"table 't1', feature 'f1': id {bad_id} is outside \[0, 10\)"):
        module(make_kjt({"f1": [[1, bad_id]], "f2": [[2]]}))


def test_float_ids_are_a_type_error() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1.0, 2.0]), lengths=torch.tensor([1, 1]))
    with pytest.raises(TypeError, match="table 't1', feature 'f1': ids must be int32 or int64"):
        module(kjt)


def test_missing_feature_is_named() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    with pytest.raises(ValueError, match=r"lacks features \['f2'\]"):
        module(make_kjt({"f1": [[1]]}))


def test_weighted_module_needs_weights() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)}, is_weighted=True)
    with pytest.raises(ValueError, match="weighted"):
        module(make_kjt({"f1": [[1]], "f2": [[1]]}))


def test_all_empty_bags_give_zeros() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2), "t2": RobeConfig(compression=3, share_group="b")})
    out = module(make_kjt({"f1": [[], []], "f2": [[], []]})).values()
    assert out.shape == (2, 16) and torch.equal(out, torch.zeros(2, 16))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({}, "exactly one of compression and memory_size"),
        ({"compression": 2, "memory_size": 10}, "exactly one"),
        ({"compression": 0.5}, "compression must be"),
        ({"compression": float("nan")}, "compression must be"),
        ({"memory_size": 0}, "memory_size must be"),
        ({"memory_size": 2**31}, "memory_size must be"),
        ({"compression": 2, "chunk_size": 0}, "chunk_size must be"),
        ({"compression": 2, "seed": -1}, "seed must be"),
        ({"compression": 2, "init_scale": 0.0}, "init_scale must be"),
        ({"compression": 2, "gradient": "fast"}, "gradient must be"),
        ({"compression": 2, "share_group": ""}, "share_group"),
    ],
)
def test_bad_robe_configs(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RobeConfig(**kwargs)


def test_chunk_size_must_fit_embedding_dim() -> None:
    with pytest.raises(ValueError, match=r"table 't2': RobeConfig.chunk_size=3 must divide embedding_dim=8"):
        CompressedEmbeddingBagCollection(tables(), {"t2": RobeConfig(compression=2, chunk_size=3)})


def test_group_members_need_one_config() -> None:
    with pytest.raises(ValueError, match="share memory group 'robe_default' but have different configs"):
        CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2), "t2": RobeConfig(compression=3)})


def test_compression_for_unknown_table() -> None:
    with pytest.raises(ValueError, match=r"not in `tables`: \['t9'\]"):
        CompressedEmbeddingBagCollection(tables(), {"t9": RobeConfig(compression=2)})


def test_duplicate_table_names() -> None:
    with pytest.raises(ValueError, match="duplicate table name 't1'"):
        CompressedEmbeddingBagCollection(tables() + tables()[:1])


def test_unregistered_config_class() -> None:
    @dataclasses.dataclass(frozen=True)
    class Unknown(MethodConfig):
        pass

    with pytest.raises(TypeError, match="Unknown is not a registered compression config"):
        CompressedEmbeddingBagCollection(tables(), {"t1": Unknown()})


def test_half_precision_tables_are_refused_for_compression() -> None:
    from torchrec.modules.embedding_configs import DataType

    fp16 = [EmbeddingBagConfig(name="h", embedding_dim=8, num_embeddings=10, feature_names=["f"], data_type=DataType.FP16)]
    with pytest.raises(ValueError, match=r"table 'h': robe memories are float32"):
        CompressedEmbeddingBagCollection(fp16, {"h": RobeConfig(compression=2)})


def test_required_fields_may_not_be_none() -> None:
    with pytest.raises(ValueError, match="RobeConfig.chunk_size is required, got None"):
        RobeConfig(compression=2, chunk_size=None)
