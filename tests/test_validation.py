"""Bad input and bad configs raise errors that name the table, feature, field and value."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt
from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    HashingConfig,
    MethodConfig,
    MLETConfig,
    QRConfig,
    RobeConfig,
    TTConfig,
)


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
    with pytest.raises(TypeError, match=r"features \['f1', 'f2'\]: ids must be int32 or int64, got torch.float32"):
        module(kjt)


def test_missing_feature_is_named() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    with pytest.raises(ValueError, match=r"lacks features \['f2'\]"):
        module(make_kjt({"f1": [[1]]}))


def test_a_feature_no_table_reads_is_ignored_as_by_torchrec() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    extra = module(make_kjt({"f9": [[3], [4, 5]], "f1": [[1], []], "f2": [[1], [2]]})).to_dict()
    torch.testing.assert_close(extra, module(make_kjt({"f1": [[1], []], "f2": [[1], [2]]})).to_dict())


@pytest.mark.parametrize("compressed", [True, False])
def test_a_negative_length_is_named_where_it_breaks_the_split_by_feature(compressed: bool) -> None:
    """Lengths ``[4, -1]`` add up to the 3 ids, but a feature's total is negative: ``KJT.to_dict`` cannot split."""
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)} if compressed else {})
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([4, -1]))
    with pytest.raises(ValueError, match="feature 'f2': bag 0 has negative length -1"):
        module(kjt)


@pytest.mark.parametrize("compressed", [True, False])
def test_lengths_that_do_not_match_the_ids(compressed: bool) -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)} if compressed else {})
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1]))
    with pytest.raises(ValueError, match="lengths sum to 2 but there are 3 ids"):
        module(kjt)


def test_lengths_not_a_multiple_of_the_keys() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([1, 1, 1]))
    with pytest.raises(ValueError, match="3 lengths, not a multiple of its 2 keys"):
        module(kjt)


def test_negative_length_is_named() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 0, -1, 2]))
    with pytest.raises(ValueError, match="table 't2', feature 'f2': bag 0 has negative length -1"):
        module(kjt)


def test_out_of_range_id_names_its_position() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    with pytest.raises(ValueError, match=r"table 't2', feature 'f2': id 12 is outside \[0, 10\) \(position 2"):
        module(make_kjt({"f1": [[1], [2]], "f2": [[1, 2], [12]]}))


def tensor_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the module's state_dict tensors (its parameters and buffers)."""
    return {k: v.clone() for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}


def assert_state_unchanged(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = tensor_state(module)
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert torch.equal(value, before[key]), key


def weighted_kjt(weights: list[float]) -> KeyedJaggedTensor:
    return KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]),
                             weights=torch.tensor(weights))


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_named(compressed: bool, bad: float) -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)} if compressed else {},
                                              is_weighted=True)
    with pytest.raises(ValueError, match=rf"table 't1', feature 'f1': weight {bad} at position 1 is not finite"):
        module(weighted_kjt([1.0, bad, 2.0]))


def test_weights_of_the_wrong_length() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)}, is_weighted=True)
    with pytest.raises(ValueError, match="2 weights for 3 ids"):
        module(weighted_kjt([1.0, 2.0]))


def test_integer_weights_are_a_type_error() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)}, is_weighted=True)
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3]), lengths=torch.tensor([2, 1]),
                            weights=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="weights must be floating point, got torch.int64"):
        module(kjt)


@pytest.mark.parametrize("compressed", [True, False])
def test_empty_batch_gives_no_rows(compressed: bool) -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)} if compressed else {})
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([], dtype=torch.int64),
                            lengths=torch.tensor([], dtype=torch.int64))
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": 0.1})
    before = tensor_state(module)
    out = module(kjt)
    assert out.values().shape == (0, 16) and out.keys() == ["f1", "f2"]
    out.values().sum().backward()  # a training step on an empty batch runs and changes nothing
    assert_state_unchanged(module, before)
    with torch.no_grad():
        assert not module(kjt).values().requires_grad


def test_a_memory_that_cannot_be_built_names_its_tables() -> None:
    """MLET's [n, k] first layer at n = 2^62 overflows torch's storage size: the error names the table."""
    table = EmbeddingBagConfig(name="huge", embedding_dim=4, num_embeddings=2**62, feature_names=["f"])
    with pytest.raises(RuntimeError, match=r"tables \['huge'\]: cannot build their memory for MLETConfig\(.*overflow"):
        CompressedEmbeddingBagCollection([table], {"huge": MLETConfig(inner_dim=2)})


def test_bad_input_changes_nothing() -> None:
    """A refused batch leaves parameters and optimizer state as they were (nothing half-applied)."""
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    before = tensor_state(module)
    with pytest.raises(ValueError):
        module(make_kjt({"f1": [[1]], "f2": [[10]]})).values().sum().backward()
    assert_state_unchanged(module, before)


def test_validation_can_be_switched_off() -> None:
    """With ``validate_inputs=False`` the checks are skipped: good batches give the same outputs."""
    checked = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    unchecked = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)}, validate_inputs=False)
    unchecked.load_state_dict(checked.state_dict())
    kjt = make_kjt({"f1": [[1, 2], [3]], "f2": [[4], []]})
    torch.testing.assert_close(unchecked(kjt).values(), checked(kjt).values(), rtol=0, atol=0)
    unchecked(make_kjt({"f1": [[1]], "f2": [[2]], "f9": [[3]]}))  # an unknown feature is not looked at


def test_weighted_module_needs_weights() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)}, is_weighted=True)
    with pytest.raises(ValueError, match="weighted"):
        module(make_kjt({"f1": [[1]], "f2": [[1]]}))


@pytest.mark.parametrize("config", [RobeConfig(compression=2), QRConfig(collisions=3), TTConfig(ranks=2),
                                    MLETConfig(inner_dim=4), HashingConfig(num_buckets=3)], ids=lambda c: type(c).__name__)
def test_all_empty_bags_give_zeros(config: MethodConfig) -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": config, "t2": RobeConfig(compression=3, share_group="b")})
    out = module(make_kjt({"f1": [[], []], "f2": [[], []]})).values()
    assert out.shape == (2, 16) and torch.equal(out, torch.zeros(2, 16))
    out.sum().backward()


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


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: QRConfig(collisions=1), r"QRConfig.collisions must be an int >= 2, got 1"),
        (lambda: QRConfig(compression=2, operation="xor"), r"QRConfig.operation must be one of .*'xor'"),
        (lambda: QRConfig(compression=2, num_partitions=1), r"QRConfig.num_partitions must be an int >= 2"),
        (lambda: TTConfig(ranks=0), r"TTConfig.ranks must be an int >= 1 or a sequence of them, got 0"),
        (lambda: TTConfig(ranks=(8, True)), r"TTConfig.ranks must be an int >= 1 or a sequence of them"),
        (lambda: TTConfig(p_shapes=(10, 10.0, 10)), r"TTConfig.p_shapes must be 3 ints >= 1, got \(10, 10.0, 10\)"),
        (lambda: RobeConfig(compression=2, use_sign="false"), r"RobeConfig.use_sign must be True or False, got 'false'"),
        (lambda: RobeConfig(compression=2, use_sign=1), r"RobeConfig.use_sign must be True or False, got 1"),
        (lambda: RobeConfig(compression=True), r"RobeConfig.compression must be a finite number >= 1, got True"),
        (lambda: RobeConfig(compression=torch.tensor(10.0)), r"RobeConfig.compression must be a finite number >= 1"),
        (lambda: RobeConfig(compression=2, share_group=1), r"RobeConfig.share_group must be a non-empty string, got 1"),
        (lambda: TTConfig(num_cores=5), r"TTConfig.num_cores must be an int in \[2, 4\], got 5"),
        (lambda: MLETConfig(inner_dim=0), r"MLETConfig.inner_dim must be an int >= 1, got 0"),
        (lambda: MLETConfig(inner_dim=4, init_std=float("inf")), r"MLETConfig.init_std must be a finite number > 0"),
        (lambda: HashingConfig(num_buckets=0), r"HashingConfig.num_buckets must be an int >= 1, got 0"),
        (lambda: HashingConfig(compression=0.1), r"HashingConfig.compression must be a finite number >= 1"),
    ],
)
def test_impossible_configs_of_every_method(make, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_numbers_are_taken_as_python_numbers() -> None:
    """Sizes computed with NumPy configure a method like Python numbers, and are stored as them."""
    robe = RobeConfig(memory_size=np.int64(1000), chunk_size=np.int32(8), use_sign=np.bool_(True), seed=np.uint8(3),
                      init_scale=np.float32(0.5))
    assert robe == RobeConfig(memory_size=1000, chunk_size=8, use_sign=True, seed=3, init_scale=0.5)
    assert [type(v) for v in (robe.memory_size, robe.chunk_size, robe.use_sign, robe.seed, robe.init_scale)] == [
        int, int, bool, int, float]
    assert RobeConfig(compression=np.float64(10)).compression == 10.0
    tt = TTConfig(ranks=np.int64(8), p_shapes=[np.int64(10)] * 3, q_shapes=np.array([2, 2, 2]).tolist())
    assert tt == TTConfig(ranks=8, p_shapes=(10, 10, 10), q_shapes=(2, 2, 2)) and type(tt.ranks) is int
    assert TTConfig(ranks=[np.int64(4), 8]).ranks == (4, 8)
    assert QRConfig(collisions=np.int16(4)) == QRConfig(collisions=4)
    assert HashingConfig(num_buckets=np.int64(64)) == HashingConfig(num_buckets=64)
    assert MLETConfig(inner_dim=np.int64(4), init_std=np.float32(0.25)) == MLETConfig(inner_dim=4, init_std=0.25)


def test_environment_switch_sets_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHREC_PSS_VALIDATE", "0")
    assert not CompressedEmbeddingBagCollection(tables()).validate_inputs
    assert CompressedEmbeddingBagCollection(tables(), validate_inputs=True).validate_inputs
    monkeypatch.setenv("TORCHREC_PSS_VALIDATE", "1")
    assert CompressedEmbeddingBagCollection(tables()).validate_inputs


def ebc_like(module: CompressedEmbeddingBagCollection, dtype: torch.dtype = torch.float32) -> EmbeddingBagCollection:
    """A torchrec EBC (in ``dtype``) holding ``module``'s tables: plain weights as they are, compressed tables
    materialised."""
    ebc = EmbeddingBagCollection(tables(), is_weighted=module.is_weighted())
    with torch.no_grad():
        for name, bag in ebc.embedding_bags.items():
            memory = module.memory_for(name)
            bag.weight.copy_(module.embedding_bags[name].weight if memory is None else memory.materialize(name))
    return ebc.to(dtype)


def vbe_kjt(stride_per_key_per_rank: list[list[int]]) -> KeyedJaggedTensor:
    """f1 with 1 bag and f2 with 2 (3 lengths for 2 keys), output batch 2 through the inverse indices."""
    return KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([2, 1, 1]),
                             stride_per_key_per_rank=stride_per_key_per_rank,
                             inverse_indices=(["f1", "f2"], torch.tensor([[0, 0], [0, 1]])))


@pytest.mark.parametrize("compression", [{}, {"t1": HashingConfig(num_buckets=7)}, {"t2": RobeConfig(compression=2)}],
                         ids=["plain", "hashing", "robe"])
def test_variable_batch_kjt_is_accepted_like_torchrec(compression: dict) -> None:
    """A VBE KJT has as many lengths as its per-key batch sizes add up to, not a multiple of its keys."""
    module = CompressedEmbeddingBagCollection(tables(), compression)
    out, expected = module(vbe_kjt([[1], [2]])), ebc_like(module)(vbe_kjt([[1], [2]]))
    assert out.keys() == expected.keys() and out.values().shape == (2, 16)
    torch.testing.assert_close(out.values(), expected.values())


@pytest.mark.parametrize("strides, message", [
    ([[1], [1]], r"has 3 lengths but its per-key batch sizes \[1, 1\] \(keys \['f1', 'f2'\]\) add up to 2"),
    ([[1], [3]], r"has 3 lengths but its per-key batch sizes \[1, 3\] \(keys \['f1', 'f2'\]\) add up to 4"),
    ([[3]], r"has 1 per-key batch sizes \[3\] for its 2 keys \['f1', 'f2'\]"),
])
def test_inconsistent_variable_batch_kjt_is_refused(strides: list[list[int]], message: str) -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"t1": RobeConfig(compression=2)})
    with pytest.raises(ValueError, match=rf"variable-batch KJT {message}"):
        module(vbe_kjt(strides))


@pytest.mark.parametrize("compression", [{}, {"t1": RobeConfig(compression=2)}], ids=["plain", "robe"])
def test_meta_forward_with_validation_on(compression: dict) -> None:
    """Meta tensors have no values to check: the forward gives the shapes torchrec's EBC gives on meta."""
    module = CompressedEmbeddingBagCollection(tables(), compression, device="meta")
    assert module.validate_inputs
    kjt = KeyedJaggedTensor(keys=["f1", "f2"], values=torch.tensor([1, 2, 3], device="meta"),
                            lengths=torch.tensor([1, 1, 0, 1], device="meta"))
    out, expected = module(kjt), EmbeddingBagCollection(tables(), device=torch.device("meta"))(kjt)
    assert out.values().is_meta and out.values().shape == expected.values().shape == (2, 16)
    with pytest.raises(ValueError, match="lacks features"):
        module(KeyedJaggedTensor(keys=["f1"], values=kjt.values()[:1], lengths=kjt.lengths()[:2]))


DTYPE_CASES = {
    "plain": {},
    "robe_t1": {"t1": RobeConfig(compression=2)},
    "robe_both": {"t1": RobeConfig(compression=2), "t2": RobeConfig(compression=2)},
    "qr_t1": {"t1": QRConfig(collisions=3)},
    "qr_both": {"t1": QRConfig(collisions=3), "t2": QRConfig(collisions=3)},
    "mlet_both": {"t1": MLETConfig(inner_dim=2), "t2": MLETConfig(inner_dim=2)},
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", DTYPE_CASES)
def test_half_precision_modules_pool_into_float32_like_torchrec(case: str, dtype: torch.dtype) -> None:
    """torchrec's EBC casts every pooled block to float32; so does the CEBC, whatever its mix of tables."""
    module = CompressedEmbeddingBagCollection(tables(), DTYPE_CASES[case])
    reference = ebc_like(module, dtype)
    module = module.to(dtype)
    kjt = make_kjt({"f1": [[1, 2], [3]], "f2": [[4], []]})
    out, expected = module(kjt).values(), reference(kjt).values()
    assert expected.dtype == torch.float32 and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert module(make_kjt({"f1": [], "f2": []})).values().dtype == torch.float32  # no bags: torchrec's EBC fails


@pytest.mark.parametrize("case", DTYPE_CASES)
def test_float64_modules_pool_into_float64(case: str) -> None:
    """A float64 module keeps float64 (references, gradcheck) for every table, plain ones included."""
    module = CompressedEmbeddingBagCollection(tables(), DTYPE_CASES[case]).double()
    for kjt in (make_kjt({"f1": [[1, 2], [3]], "f2": [[4], []]}), make_kjt({"f1": [], "f2": []})):
        assert module(kjt).values().dtype == torch.float64
