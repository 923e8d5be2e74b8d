"""``sketch_from_pretrained``: the signed ROBE sketch ``M = S·E`` of trained tables (PSS paper §2.4)."""

from __future__ import annotations

import importlib
import json
import math
import zlib
from pathlib import Path

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from helpers import make_kjt
from torchrec_pss import (CompressedEmbeddingBagCollection, QRConfig, RobeConfig, parse_compression_flag,
                          quantize_memories_, sketch_from_pretrained)
from torchrec_pss.hashing import PRIME

ROOT = Path(__file__).resolve().parents[1]
CRITEO = ROOT.parent / "shared" / "data" / "criteo"


def _ebc(weights: dict[str, torch.Tensor]) -> EmbeddingBagCollection:
    tables = [EmbeddingBagConfig(name=name, embedding_dim=w.shape[1], num_embeddings=w.shape[0],
                                 feature_names=[f"f_{name}"]) for name, w in weights.items()]
    ebc = EmbeddingBagCollection(tables)
    with torch.no_grad():
        for name, w in weights.items():
            ebc.embedding_bags[name].weight.copy_(w)
    return ebc


def _low_rank(n: int, d: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(n, rank, generator=generator) @ torch.randn(rank, d, generator=generator) / math.sqrt(rank)


@pytest.mark.parametrize("seed", [0, 1])
def test_inner_product_error_is_the_count_sketch_error_of_theorem_5(seed: int) -> None:
    """``<Ẽ[x], v> - <E[x], v>`` against the variance of ``sketch.py``'s docstring, for |M| = N/78, N/20, N/5.

    The per-pair prediction is ``(‖E‖_F² + <E[x], v>² - 2 Σ_i v_i² E[x, i]²) / |M|``: the empirical MSE over
    all 20,000 rows must lie within [0.7, 1.3] of it (measured 0.80-1.04 over 12 hash seeds with Z >= 4: ROBE's
    linear hash spreads consecutive ids a little more evenly than a random one as |M| nears N), must shrink
    about 4x per 4x memory, and the largest error must stay under the union bound ``‖E‖_F·sqrt(2 ln(2n/δ)/|M|)``
    (δ = 0.01) that corollary 6 gives for Gaussian-like errors.
    """
    n, d = 20_000, 16
    generator = torch.Generator().manual_seed(seed)
    table = _low_rank(n, d, 4, generator)
    v = torch.randn(n, d, generator=generator, dtype=torch.float64)
    v /= v.norm(dim=1, keepdim=True)
    ebc = _ebc({"t": table})
    exact = table.double()
    frobenius2 = exact.pow(2).sum()
    predicted = (frobenius2 + (exact * v).sum(1) ** 2 - 2 * (v.pow(2) * exact.pow(2)).sum(1)).mean()
    mse = {}
    for memory_size in (4096, 16384, 65536):
        module = sketch_from_pretrained(ebc, RobeConfig(memory_size=memory_size, use_sign=True, seed=seed))
        recovered = module.memory_for("t").recover("t", torch.arange(n)).double()
        error = ((recovered - exact) * v).sum(1)
        mse[memory_size] = error.pow(2).mean().item()
        ratio = mse[memory_size] / (predicted.item() / memory_size)
        assert 0.7 <= ratio <= 1.3, (memory_size, ratio)
        union_bound = math.sqrt(frobenius2.item() * 2 * math.log(2 * n / 0.01) / memory_size)
        assert error.abs().max().item() <= union_bound
        assert abs(error.mean().item()) <= 4 * math.sqrt(mse[memory_size] / n)  # unbiased
    assert mse[16384] < mse[4096] / 2.5 and mse[65536] < mse[16384] / 2.5


def _explicit_sketch_matrix(module: CompressedEmbeddingBagCollection, tables: list[str]) -> torch.Tensor:
    """``S`` ``[|M|, Σ n_t d_t]`` (float64) from the formulas of the ROBE docstring, in Python integers."""
    memory = module.memory_for(tables[0])
    m, z = memory.memory_size, memory.config.chunk_size
    (a, b, c, dd), (sa, sb, sc, sd) = memory.hash_coefficients.tolist()
    columns = []
    for name in tables:
        n, d = memory.tables[name].num_embeddings, memory.tables[name].embedding_dim
        t = zlib.crc32(name.encode()) % PRIME
        for x in range(n):
            for i in range(d):
                k, block, offset = (x, i // z, i % z) if z <= d else (x // (z // d), 0, (x % (z // d)) * d + i)
                position = (((a * t + b * (k % PRIME) + c * block + dd) % PRIME) % m + offset) % m
                sign = 1 - 2 * (((sa * t + sb * (x % PRIME) + sc * i + sd) % PRIME) % 2)
                column = torch.zeros(m, dtype=torch.float64)
                column[position] = sign
                columns.append(column)
    return torch.stack(columns, dim=1)


@pytest.mark.parametrize("chunk_size", [1, 2, 8])
def test_sketch_is_s_times_e_and_recovery_is_s_transposed_m(chunk_size: int) -> None:
    """Integer tables, so every sum is exact: M == S·vec(E) and recovered rows == Sᵀ·M, bit for bit."""
    generator = torch.Generator().manual_seed(chunk_size)
    weights = {name: torch.randint(-8, 9, (n, 4), generator=generator).float()
               for name, n in (("a", 7), ("b", 5), ("plain", 3))}
    robe = RobeConfig(memory_size=11, chunk_size=chunk_size, use_sign=True, seed=3)
    module = sketch_from_pretrained(_ebc(weights), {"a": robe, "b": robe}, rows_per_chunk=2)
    s = _explicit_sketch_matrix(module, ["a", "b"])
    stacked = torch.cat([weights["a"], weights["b"]]).double().reshape(-1)
    memory = module.memory_for("a")
    assert memory is module.memory_for("b")
    assert torch.equal(memory.weight, (s @ stacked).float())
    recovered = (s.t() @ memory.weight.double()).float().view(12, 4)
    assert torch.equal(memory.recover("a", torch.arange(7)), recovered[:7])
    assert torch.equal(memory.recover("b", torch.arange(5)), recovered[7:])
    assert torch.equal(module.embedding_bags["plain"].weight, weights["plain"])
    out = module(make_kjt({"f_a": [[0, 6], []], "f_b": [[4], [1, 2]], "f_plain": [[2], [0]]})).to_dict()
    assert torch.equal(out["f_a"], torch.stack([recovered[0] + recovered[6], torch.zeros(4)]))
    assert torch.equal(out["f_b"], torch.stack([recovered[7 + 4], recovered[7 + 1] + recovered[7 + 2]]))
    assert torch.equal(out["f_plain"], weights["plain"][[2, 0]])


def test_refuses_unsigned_and_non_robe_configs() -> None:
    ebc = _ebc({"t": torch.randn(100, 8)})
    with pytest.raises(ValueError, match=r"tables \['t'\]: RobeConfig.use_sign=False"):
        sketch_from_pretrained(ebc, RobeConfig(compression=10))
    with pytest.raises(ValueError, match=r"method 'qr' \(tables \['t'\]\) cannot be sketched"):
        sketch_from_pretrained(ebc, QRConfig(collisions=4))
    with pytest.raises(ValueError, match="rows_per_chunk"):
        sketch_from_pretrained(ebc, RobeConfig(compression=10, use_sign=True), rows_per_chunk=0)


@pytest.mark.parametrize("config", [{"T": RobeConfig(compression=10, use_sign=True)},
                                    parse_compression_flag("robe:compression=10,use_sign=True;t_1=plain")])
def test_refuses_tables_the_ebc_does_not_have(config) -> None:
    with pytest.raises(ValueError, match=r"names tables \['(T|t_1)'\] that no EmbeddingBagCollection .* tables: \['t'\]"):
        sketch_from_pretrained(_ebc({"t": torch.randn(100, 8)}), config)


def test_compressed_tables_of_a_cebc_keep_their_memory() -> None:
    tables = [EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=200, feature_names=[name])
              for name in ("q", "r", "p")]
    torch.manual_seed(0)
    source = CompressedEmbeddingBagCollection(tables, {"q": QRConfig(collisions=20)})
    robe = RobeConfig(compression=4, use_sign=True, share_group="warm")
    module = sketch_from_pretrained(source, robe)
    assert module.compression == {"q": QRConfig(collisions=20), "r": robe, "p": robe}
    for key, value in source.pss_memories.state_dict().items():
        assert torch.equal(module.pss_memories.state_dict()[key], value)
    with pytest.raises(ValueError, match=r"tables \['q'\] are already compressed"):
        sketch_from_pretrained(source, {"q": robe})
    shared = RobeConfig(compression=4, use_sign=True)
    with pytest.raises(ValueError, match="would hold sketched tables"):
        sketch_from_pretrained(CompressedEmbeddingBagCollection(tables, {"q": shared}), {"r": shared})


def test_int8_memories_of_a_cebc_are_kept_as_they_are() -> None:
    """Sketching a plain table of a module served in int8 keeps its int8 memories (their state could not load
    into the float memories built for them)."""
    tables = [EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=200, feature_names=[name])
              for name in ("q", "r", "p")]
    torch.manual_seed(0)
    source = CompressedEmbeddingBagCollection(tables, {"q": QRConfig(collisions=20), "r": RobeConfig(compression=4)})
    quantize_memories_(source)
    module = sketch_from_pretrained(source, {"p": RobeConfig(compression=4, use_sign=True, share_group="warm")})
    kjt = make_kjt({"q": [[1, 2], [199]], "r": [[3], [4, 5]], "p": [[6], []]})
    with torch.no_grad():
        expected, got = source(kjt).to_dict(), module(kjt).to_dict()
    for name in ("q", "r"):
        assert type(module.memory_for(name)) is type(source.memory_for(name))
        assert torch.equal(got[name], expected[name])


@pytest.mark.skipif(not (CRITEO / "kaggle_8k_train.tsv").is_file(), reason="needs ../shared/data/criteo beside the checkout")
def test_sketch_criteo_benchmark_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """benchmarks/sketch_criteo.py end to end on a few steps: the sketch error on real trained tables is as predicted."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    benchmark = importlib.import_module("sketch_criteo")
    out = tmp_path / "sketch.json"
    benchmark.main(["--seeds", "0", "--ratios", "100", "--steps", "8", "--finetune-steps", "8", "--finetune-lrs",
                    "0.005", "--eval-every", "4", "--json", str(out), "--report", str(tmp_path / "sketch.md")])
    (run,) = json.loads(out.read_text())["runs"]
    cell = run["ratios"]["100"]
    assert "use_sign=True" in cell["flag"]
    assert 0.8 < cell["relative_error"] / cell["predicted_relative_error"] < 1.25
    sketched = cell["sketched"]["0.005"]
    assert [row[0] for row in sketched["curve"]] == [0, 4, 8]
    assert sketched["embedding_bytes"] < run["uncompressed"]["embedding_bytes"] / 50
    assert all(0.5 < r["auc"] < 1 for r in (run["uncompressed"], sketched, cell["scratch"]))
    assert "| sketched 100x, no training |" in (tmp_path / "sketch.md").read_text()
