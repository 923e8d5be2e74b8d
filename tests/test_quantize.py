"""``quantize_memories_``: inference-only int8 ROBE / QR / TT memories."""

from __future__ import annotations

import copy
import importlib
import json
import math
import random
from pathlib import Path

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from helpers import make_kjt, random_bags
from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    HashingConfig,
    QRConfig,
    RobeConfig,
    TTConfig,
    quantize_memories_,
)
from torchrec_pss.pooling import pool
from torchrec_pss_plugins.qr.int8 import Int8QRMemory
from torchrec_pss_plugins.robe.int8 import Int8RobeMemory
from torchrec_pss_plugins.tt.int8 import Int8TTMemory

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ROOT.parent / "shared" / "data" / "criteo"
BLOCK = 32
SIZES = {"r1": 3000, "r2": 1000, "qm": 2000, "qa": 500, "tt": 4000, "h": 800, "p": 100}


def _trained_module(is_weighted: bool = False) -> CompressedEmbeddingBagCollection:
    """Every method, one ROBE memory shared by two tables (one MEAN), memories with values spread over decades."""
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=name, embedding_dim=16, num_embeddings=n, feature_names=[f"f_{name}"],
                                 pooling=PoolingType.MEAN if name == "r2" else PoolingType.SUM)
              for name, n in SIZES.items()]
    robe = RobeConfig(compression=8, chunk_size=8, use_sign=True)
    module = CompressedEmbeddingBagCollection(tables, {
        "r1": robe, "r2": robe, "qm": QRConfig(collisions=50), "qa": QRConfig(collisions=30, operation="add"),
        "tt": TTConfig(ranks=8), "h": HashingConfig(num_buckets=64),
    }, is_weighted=is_weighted)
    with torch.no_grad():
        for param in module.pss_memories.parameters():
            param.mul_(torch.randn_like(param).exp())
    return module.eval()


def _batch(seed: int) -> tuple[dict[str, list[list[int]]], object]:
    rng = random.Random(seed)
    bags = {f"f_{name}": random_bags(rng, n, 64, 6) for name, n in SIZES.items()}
    return bags, make_kjt(bags)


def _with_values(memory: torch.nn.Module, values: list[torch.Tensor]) -> torch.nn.Module:
    """A float64 copy of ``memory`` whose parameters are ``values`` (in ``parameters()`` order)."""
    out = copy.deepcopy(memory).double()
    with torch.no_grad():
        for param, value in zip(out.parameters(), values):
            param.copy_(value)
    return out


def _half_steps(memory: torch.nn.Module) -> list[torch.Tensor]:
    """``s / 2`` broadcast to every quantized element: the largest rounding error of each value."""
    if isinstance(memory, Int8RobeMemory):
        return [memory.weight_qscale.double().repeat_interleave(BLOCK)[: memory.memory_size] / 2]
    if isinstance(memory, Int8QRMemory):
        return [s.double().unsqueeze(1).expand(q.shape) / 2 for q, s in zip(memory.parts, memory.parts_qscale)]
    return [s.double()[:, None, None, None].expand(q.shape) / 2 for q, s in zip(memory.cores, memory.cores_qscale)]


def test_outputs_are_within_the_bound_the_scales_give() -> None:
    """``|out_int8 - out_float| <= pool(|f(|θ| + s/2) - f(|θ|)|)`` per output element, where ``f`` recovers rows.

    Every recovery is multilinear in its memories (ROBE linear, QR mult bilinear, TT a product of cores),
    so an error of at most ``s/2`` per stored value moves a row by at most ``f(|θ| + s/2) - f(|θ|)``
    (evaluated in float64), and pooling adds the rows' bounds (divided by the length for MEAN).
    """
    module = _trained_module()
    quantized = quantize_memories_(copy.deepcopy(module), block_size=BLOCK)
    bags, kjt = _batch(0)
    out_f, out_q = module(kjt).to_dict(), quantized(kjt).to_dict()
    tightest = 0.0
    for name in ("r1", "r2", "qm", "qa", "tt"):
        float_memory, int8_memory = module.memory_for(name), quantized.memory_for(name)
        magnitudes = [p.detach().double().abs() for p in float_memory.parameters()]
        steps = _half_steps(int8_memory)
        high = _with_values(float_memory, [m + s for m, s in zip(magnitudes, steps)])
        low = _with_values(float_memory, magnitudes)
        ids = torch.tensor([x for bag in bags[f"f_{name}"] for x in bag])
        lengths = torch.tensor([len(bag) for bag in bags[f"f_{name}"]])
        with torch.no_grad():
            row_bound = (high.recover(name, ids) - low.recover(name, ids)).abs()
            scale = float_memory.recover(name, ids).double().abs()
        mean = name == "r2"
        bound = pool(row_bound, lengths, None, mean) + 1e-6 * pool(scale, lengths, None, mean)
        error = (out_q[f"f_{name}"] - out_f[f"f_{name}"]).double().abs()
        assert (error <= bound).all(), (name, (error - bound).max())
        assert error.max() > 0
        tightest = max(tightest, (error / bound.clamp(min=1e-30)).max().item())
    assert tightest > 0.2  # the bound is not vacuous
    for name in ("h", "p"):  # hashing trick and plain tables stay float32
        assert torch.equal(out_q[f"f_{name}"], out_f[f"f_{name}"])


def test_rows_equal_the_dequantized_float_memory_exactly() -> None:
    module = _trained_module()
    quantized = quantize_memories_(copy.deepcopy(module), block_size=BLOCK)
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for group, memory in quantized.pss_memories.items():
            if isinstance(memory, (Int8RobeMemory, Int8QRMemory, Int8TTMemory)):
                values = memory.dequantized()
                for param, value in zip(reference.pss_memories[group].parameters(),
                                        values if isinstance(values, list) else [values]):
                    param.copy_(value)
    _, kjt = _batch(1)
    for name in ("r1", "r2", "qm", "qa", "tt"):
        ids = torch.arange(SIZES[name])
        assert torch.equal(quantized.memory_for(name).recover(name, ids), reference.memory_for(name).recover(name, ids))
    out_q, out_r = quantized(kjt).to_dict(), reference(kjt).to_dict()
    for key in out_q:
        if key in ("f_r1", "f_r2"):  # pooled from exact rows by pool(), the float module by the fused kernel
            torch.testing.assert_close(out_q[key], out_r[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(out_q[key], out_r[key]), key


def _dequantized_reference(module: CompressedEmbeddingBagCollection,
                           quantized: CompressedEmbeddingBagCollection) -> CompressedEmbeddingBagCollection:
    """A float copy of ``module`` holding the dequantized values of ``quantized``'s memories."""
    reference = copy.deepcopy(module)
    with torch.no_grad():
        for group, memory in quantized.pss_memories.items():
            if not isinstance(memory, (Int8RobeMemory, Int8QRMemory, Int8TTMemory)):
                continue  # kept float32
            values = memory.dequantized()
            for param, value in zip(reference.pss_memories[group].parameters(),
                                    values if isinstance(values, list) else [values]):
                param.copy_(value)
    return reference


@pytest.mark.parametrize("names", [["a", "b", "c"], ["a"]], ids=["three_tables", "one_table"])
def test_one_memory_holding_every_table_pools_dequantized_values(names: list[str]) -> None:
    """The DLRM layout (one ROBE memory, one feature per table): the stacked one-call path of the float module."""
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=n, embedding_dim=16, num_embeddings=500, feature_names=[f"f_{n}"]) for n in names]
    module = CompressedEmbeddingBagCollection(tables, {n: RobeConfig(compression=4, chunk_size=8, use_sign=True)
                                                       for n in names}).eval()
    quantized = quantize_memories_(copy.deepcopy(module), block_size=BLOCK)
    reference = _dequantized_reference(module, quantized)
    rng = random.Random(0)
    kjt = make_kjt({f"f_{n}": random_bags(rng, 500, 32, 5) for n in names})
    out_q, out_f = quantized(kjt).values(), reference(kjt).values()
    torch.testing.assert_close(out_q, out_f, rtol=1e-6, atol=1e-7)
    assert (out_q - module(kjt).values()).abs().max() < 0.01 * module(kjt).values().abs().max()


def test_weighted_features_pool_dequantized_values_of_every_method() -> None:
    module = _trained_module(is_weighted=True)
    quantized = quantize_memories_(copy.deepcopy(module), block_size=BLOCK)
    reference = _dequantized_reference(module, quantized)
    rng = random.Random(2)
    bags = {f"f_{name}": random_bags(rng, n, 16, 4) for name, n in SIZES.items()}
    weights = {key: [[rng.uniform(0.1, 1.9) for _ in bag] for bag in value] for key, value in bags.items()}
    kjt = make_kjt(bags, weights)
    out_q, out_r = quantized(kjt).to_dict(), reference(kjt).to_dict()
    for key in out_q:
        torch.testing.assert_close(out_q[key], out_r[key], rtol=1e-5, atol=1e-7)
        assert out_q[key].abs().max() > 0, key


def test_quantized_memories_store_int8_and_scales() -> None:
    module = _trained_module()
    before = module.num_bytes()
    quantized = quantize_memories_(copy.deepcopy(module), block_size=BLOCK)
    after = quantized.num_bytes()
    robe = quantized.memory_for("r1")
    m = robe.memory_size
    assert robe.weight.dtype == torch.int8 and robe.weight_qscale.shape == (math.ceil(m / BLOCK),)
    assert after["robe_default"] == m + 4 * math.ceil(m / BLOCK) + 8 * 8 + 8 * 2
    assert before["robe_default"] == 4 * m + 8 * 8 + 8 * 2
    qr = quantized.memory_for("qm")
    assert after["qm"] == sum(p.numel() + 4 * p.shape[0] for p in qr.parts)
    tt = quantized.memory_for("tt")
    assert after["tt"] == sum(c.numel() + 4 * c.shape[0] for c in tt.cores)
    assert after["h"] == before["h"] and after["p"] == before["p"]
    for group in ("robe_default", "qm", "qa", "tt"):
        assert after[group] < before[group] / 3


def test_state_dict_round_trips_and_refuses_float_checkpoints() -> None:
    module = _trained_module()
    quantized = quantize_memories_(copy.deepcopy(module), block_size=BLOCK)
    state = quantized.state_dict()
    assert state["pss_memories.robe_default.weight"].dtype == torch.int8
    assert {"pss_memories.robe_default.weight_qscale", "pss_memories.qm.parts_qscale.1",
            "pss_memories.tt.cores_qscale.2"} <= set(state)
    torch.manual_seed(1)
    fresh = CompressedEmbeddingBagCollection(module.embedding_bag_configs(), module.compression)
    quantize_memories_(fresh.eval(), block_size=BLOCK)
    _, kjt = _batch(2)
    assert not torch.equal(fresh(kjt).values(), quantized(kjt).values())
    fresh.load_state_dict(state)
    assert torch.equal(fresh(kjt).values(), quantized(kjt).values())
    with pytest.raises(ValueError, match="missing .*weight_qscale"):
        fresh.load_state_dict(module.state_dict())


def test_training_through_int8_memories_raises() -> None:
    quantized = quantize_memories_(_trained_module(), block_size=BLOCK)
    _, kjt = _batch(3)
    quantized.train()
    with pytest.raises(RuntimeError, match="Int8RobeMemory is inference-only"):
        quantized(kjt)
    with torch.no_grad():
        quantized(kjt)
    quantized.eval()
    assert not quantized.memory_for("r1").recover("r1", torch.arange(5)).requires_grad
    assert not any(p.requires_grad for p in quantized.pss_memories.parameters() if p.dtype == torch.int8)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="block_size must be an int >= 1"):
        quantize_memories_(_trained_module(), block_size=0)
    with pytest.raises(ValueError, match="holds no CompressedEmbeddingBagCollection"):
        quantize_memories_(torch.nn.Linear(2, 2))


@pytest.mark.skipif(not (CRITEO / "kaggle_8k_train.tsv").is_file(), reason="needs ../shared/data/criteo beside the checkout")
def test_int8_criteo_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/int8_criteo.py on a few steps: int8 memories are ~4x smaller and barely move the test AUC."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    benchmark = importlib.import_module("int8_criteo")
    out = tmp_path / "int8.json"
    benchmark.main(["--methods", "robe", "tt", "--ratios", "10", "--seeds", "0", "--steps", "8",
                    "--json", str(out), "--report", str(tmp_path / "int8.md")])
    cells = {c["label"]: c for c in json.loads(out.read_text())["cells"]}
    assert set(cells) == {"robe 10x", "tt 10x"}
    for cell in cells.values():
        (run,) = cell["runs"]
        assert abs(run["auc_int8"] - run["auc_float"]) < 0.005
        assert 0 < run["max_logit_change"] < 0.05
        assert run["memory_bytes_int8"] < run["memory_bytes_float"] / 3.5
    assert "| robe 10x | 1 |" in (tmp_path / "int8.md").read_text()
