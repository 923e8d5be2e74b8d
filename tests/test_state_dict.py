"""state_dict round trips, and refusals that leave the module untouched."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from helpers import make_kjt
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig, MethodConfig, MLETConfig, QRConfig, RobeConfig


def tables():
    return [
        EmbeddingBagConfig(name="t1", embedding_dim=8, num_embeddings=100, feature_names=["f1"]),
        EmbeddingBagConfig(name="t2", embedding_dim=8, num_embeddings=50, feature_names=["f2"]),
    ]


def module(seed: int = 0, compress_t2: bool = True, **kw) -> CompressedEmbeddingBagCollection:
    config = RobeConfig(compression=4, chunk_size=4, seed=seed, **kw)
    return CompressedEmbeddingBagCollection(tables(), {"t1": config, **({"t2": config} if compress_t2 else {})})


KJT = make_kjt({"f1": [[1, 2], [99], []], "f2": [[3], [], [49, 0]]})


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items() if isinstance(v, torch.Tensor)}


def test_round_trip_reproduces_outputs_exactly() -> None:
    source = module()
    with torch.no_grad():
        source.pss_memories["robe_default"].weight.mul_(3.0)
    target = module()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target(KJT).values(), source(KJT).values())


def test_training_only_fields_may_differ() -> None:
    target = module(gradient="sparse", init_scale=0.5)
    target.load_state_dict(module(gradient="dense").state_dict())


def test_mismatched_seed_is_refused_and_nothing_changes() -> None:
    target = module(seed=0)
    before = snapshot(target)
    with pytest.raises(ValueError, match=r"table 't1'.*seed: checkpoint 1 vs module 0"):
        target.load_state_dict(module(seed=1).state_dict())
    assert all(torch.equal(before[k], v) for k, v in snapshot(target).items())


def test_tampered_hash_constants_are_refused() -> None:
    state = module().state_dict()
    state["pss_memories.robe_default.hash_coefficients"] = state["pss_memories.robe_default.hash_coefficients"] + 1
    with pytest.raises(ValueError, match="hash coefficients"):
        module().load_state_dict(state)


def test_other_method_is_refused() -> None:
    plain_t2 = module(compress_t2=False)
    with pytest.raises(ValueError, match=r"table 't2': checkpoint was saved with method 'plain'.*'robe'"):
        module().load_state_dict(plain_t2.state_dict())


def test_missing_keys_are_refused_before_any_copy() -> None:
    target = module()
    before = snapshot(target)
    state = module(seed=0).state_dict()
    with torch.no_grad():
        state["pss_memories.robe_default.weight"] = state["pss_memories.robe_default.weight"] + 1
    del state["pss_memories.robe_default.table_keys"]
    with pytest.raises(ValueError, match="missing.*table_keys.*nothing was loaded"):
        target.load_state_dict(state)
    with pytest.raises(RuntimeError, match="missing.*table_keys.*nothing was loaded"):  # as torch raises it
        target.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in snapshot(target).items())


def test_nested_load_checks_signature() -> None:
    """Inside a bigger model (torch's recursive load) the check still runs."""
    outer, other = torch.nn.Sequential(module(seed=0)), torch.nn.Sequential(module(seed=2))
    with pytest.raises(ValueError, match="seed"):
        outer.load_state_dict(other.state_dict())


MATERIALISED_CASES = [RobeConfig(compression=4, chunk_size=4, seed=3), HashingConfig(num_buckets=13, seed=3),
                      QRConfig(collisions=7), MLETConfig(inner_dim=2)]


def trained(config: MethodConfig, order: tuple[str, ...] = ("t1", "t2")) -> CompressedEmbeddingBagCollection:
    """A module with both tables compressed by ``config`` (``order``: the tables' order), its memories moved off
    their initialisation."""
    by_name = {t.name: t for t in tables()}
    torch.manual_seed(0)
    source = CompressedEmbeddingBagCollection([by_name[n] for n in order], {"t1": config, "t2": config})
    with torch.no_grad():
        for param in source.parameters():
            param.add_(torch.rand_like(param))
    return source


def on_meta(config: MethodConfig, order: tuple[str, ...] = ("t1", "t2")) -> CompressedEmbeddingBagCollection:
    by_name = {t.name: t for t in tables()}
    return CompressedEmbeddingBagCollection([by_name[n] for n in order], {"t1": config, "t2": config}, device="meta")


def assert_same_features(got: CompressedEmbeddingBagCollection, want: CompressedEmbeddingBagCollection) -> None:
    """Equal pooled embeddings per feature (the modules may list their tables in different orders)."""
    a, b = got(KJT).to_dict(), want(KJT).to_dict()
    assert a.keys() == b.keys()
    for feature in a:
        assert torch.equal(a[feature], b[feature]), feature


@pytest.mark.parametrize("config", MATERIALISED_CASES, ids=lambda c: type(c).__name__)
def test_meta_to_empty_then_load_takes_the_checkpoint(config: MethodConfig) -> None:
    """PyTorch's idiom: build on meta, to_empty (uninitialised constants, not another seed), load a checkpoint."""
    source = trained(config)
    target = on_meta(config).to_empty(device="cpu")
    target.load_state_dict(source.state_dict())
    assert_same_features(target, source)


@pytest.mark.parametrize("config", MATERIALISED_CASES[:2], ids=lambda c: type(c).__name__)
def test_loaded_or_reset_constants_are_compared_again(config: MethodConfig) -> None:
    """Once loaded, reset (by the module or by the memory itself, as DMP's init does) or built on the CPU,
    constants that differ from the checkpoint's are refused."""
    state = trained(config).state_dict()
    key = next(k for k in state if k.endswith("hash_coefficients"))
    tampered = {**state, key: state[key] + 1}
    loaded = on_meta(config).to_empty(device="cpu")
    loaded.load_state_dict(state)
    reset = on_meta(config).to_empty(device="cpu")
    reset.reset_parameters()
    memory_reset = on_meta(config).to_empty(device="cpu")
    for memory in memory_reset.pss_memories.values():
        memory.reset_parameters()
    for target in (loaded, reset, memory_reset, CompressedEmbeddingBagCollection(tables(), {"t1": config, "t2": config})):
        with pytest.raises(ValueError, match="hash coefficients"):
            target.load_state_dict(tampered)


def test_meta_to_empty_keeps_unset_constants_through_a_move() -> None:
    """Constants materialised from meta stay unset through ``.to()`` (a copy of uninitialised memory)."""
    config = MATERIALISED_CASES[0]
    source = trained(config)
    target = on_meta(config).to_empty(device="cpu").to(torch.float32)
    target.load_state_dict(source.state_dict())
    assert_same_features(target, source)


def test_other_seed_is_refused_for_a_module_built_on_cpu() -> None:
    with pytest.raises(ValueError, match=r"seed: checkpoint 2 vs module 1"):
        trained(RobeConfig(compression=4, chunk_size=4, seed=1)).load_state_dict(
            trained(RobeConfig(compression=4, chunk_size=4, seed=2)).state_dict())


@pytest.mark.parametrize("config", MATERIALISED_CASES, ids=lambda c: type(c).__name__)
def test_assign_load_from_meta_reports_the_parameters_device(config: MethodConfig) -> None:
    source = trained(config)
    target = on_meta(config)
    assert target.device == torch.device("meta")
    target.load_state_dict(source.state_dict(), assign=True)
    assert target.device == torch.device("cpu")
    assert_same_features(target, source)
    assert on_meta(config).to_empty(device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("meta", [False, True], ids=["cpu", "meta_to_empty"])
def test_robe_group_tables_in_another_order_load(meta: bool) -> None:
    """The ROBE keys t = crc32(name) do not depend on table order: a checkpoint listing the tables of a group in
    another order loads, its table_keys put in this module's order, and recovers the same embeddings."""
    config = RobeConfig(memory_size=100, chunk_size=4)
    source = trained(config, ("t1", "t2"))
    target = on_meta(config, ("t2", "t1")).to_empty(device="cpu") if meta else trained(config, ("t2", "t1"))
    own_keys = trained(config, ("t2", "t1")).pss_memories["robe_default"].table_keys.clone()
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.pss_memories["robe_default"].table_keys, own_keys)
    assert_same_features(target, source)
    nested = torch.nn.Sequential(trained(config, ("t2", "t1")))
    nested.load_state_dict(torch.nn.Sequential(source).state_dict())
    assert_same_features(nested[0], source)


def test_wrong_table_keys_in_another_order_are_refused() -> None:
    config = RobeConfig(memory_size=100, chunk_size=4)
    state = trained(config, ("t1", "t2")).state_dict()
    state["pss_memories.robe_default.table_keys"] = state["pss_memories.robe_default.table_keys"] + 1
    target = trained(config, ("t2", "t1"))
    before = snapshot(target)
    with pytest.raises(ValueError, match="table_keys: recovery constants"):
        target.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in snapshot(target).items())
