"""state_dict round trips, and refusals that leave the module untouched."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from helpers import make_kjt
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig


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
    assert all(torch.equal(before[k], v) for k, v in snapshot(target).items())


def test_nested_load_checks_signature() -> None:
    """Inside a bigger model (torch's recursive load) the check still runs."""
    outer, other = torch.nn.Sequential(module(seed=0)), torch.nn.Sequential(module(seed=2))
    with pytest.raises(ValueError, match="seed"):
        outer.load_state_dict(other.state_dict())
