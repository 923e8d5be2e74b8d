"""The ROBE hash: int64-safe for ids near 2^62, deterministic per seed, distinct per table."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from helpers import make_kjt
from reference import reference_pooled
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig

HUGE = 2**62


def huge_module(seed: int = 0, chunk_size: int = 4) -> CompressedEmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name="big", embedding_dim=8, num_embeddings=HUGE, feature_names=["x"]),
        EmbeddingBagConfig(name="other", embedding_dim=8, num_embeddings=HUGE, feature_names=["y"]),
    ]
    config = RobeConfig(memory_size=1009, chunk_size=chunk_size, seed=seed)
    return CompressedEmbeddingBagCollection(tables, {"big": config, "other": config})


IDS = torch.tensor([HUGE - 1, HUGE - 2, HUGE - 2**31, 2**31 - 1, 2**31, 0, 12345678901234567])


def test_positions_in_range_and_match_python_integers() -> None:
    for z in (1, 4, 16):
        memory = huge_module(chunk_size=z).pss_memories["robe_default"]
        positions = memory.positions("big", IDS)
        assert positions.min() >= 0 and positions.max() < 1009
        recovered = memory.recover("big", IDS).double()
        expected = reference_pooled(memory.weight.detach(), memory.hash_coefficients, "big", 8, z, False,
                                    [[int(x)] for x in IDS])
        torch.testing.assert_close(recovered, expected)


def test_forward_accepts_ids_near_2_62() -> None:
    module = huge_module()
    out = module(make_kjt({"x": [[HUGE - 1, HUGE - 3]], "y": [[HUGE - 1]]})).values()
    assert torch.isfinite(out).all()


def test_same_seed_same_positions_on_fresh_modules() -> None:
    a, b = huge_module(seed=5), huge_module(seed=5)
    pa, pb = (m.pss_memories["robe_default"].positions("big", IDS) for m in (a, b))
    assert torch.equal(pa, pb)
    pc = huge_module(seed=6).pss_memories["robe_default"].positions("big", IDS)
    assert not torch.equal(pa, pc)


def test_different_tables_read_different_positions() -> None:
    memory = huge_module().pss_memories["robe_default"]
    ids = torch.arange(200)
    assert (memory.positions("big", ids) != memory.positions("other", ids)).float().mean() > 0.9


def test_chunks_are_spread_over_memory() -> None:
    """Block starts of many ids cover the memory like uniform draws (Poisson counts: std ~ sqrt(mean))."""
    memory = huge_module(chunk_size=8).pss_memories["robe_default"]
    starts, _ = memory.chunk_starts("big", torch.arange(20000))
    counts = torch.bincount(starts.reshape(-1), minlength=1009).double()
    assert counts.min() > 0 and counts.std() < 1.3 * counts.mean().sqrt()


def test_int32_ids_and_keys_hash_as_int64_on_every_kernel(monkeypatch) -> None:
    """The reference once hashed int32 ids / keys in int32 (a 0-dim int64 coefficient times an int32 tensor stays
    int32) and overflowed; every kernel now gives the int64 result."""
    from torchrec_pss.hashing import hash_coefficients
    from torchrec_pss_plugins.robe import ops

    coefficients, memory = hash_coefficients(3, 2), torch.randn(501)
    ids, offsets, keys = torch.tensor([1, 1000, 123456, 2**31 - 2]), torch.tensor([0, 2, 4]), torch.tensor([7])
    for kernels in ("reference", "fast"):
        monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
        expected = ops.robe_pooled(memory, ids, offsets, None, coefficients, keys, 8, 4, True, False, False)
        for got_ids, got_keys in ((ids.int(), keys), (ids, keys.int())):
            got = ops.robe_pooled(memory, got_ids, offsets, None, coefficients, got_keys, 8, 4, True, False, False)
            assert torch.equal(got, expected), kernels
