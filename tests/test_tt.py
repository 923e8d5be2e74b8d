"""TT specifics: shape suggestion, initialisation statistics, a 40M-row table in little memory."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss import CompressedEmbeddingBagCollection, TTConfig
from torchrec_pss_plugins.tt import suggest_tt_shapes


def tt_module(n: int, d: int, config: TTConfig) -> CompressedEmbeddingBagCollection:
    table = EmbeddingBagConfig(name="t", embedding_dim=d, num_embeddings=n, feature_names=["f"])
    return CompressedEmbeddingBagCollection([table], {"t": config})


@pytest.mark.parametrize("n, d, cores", [(40_000_000, 128, 3), (3_067_956, 128, 3), (39_060, 16, 2), (1000, 64, 4), (7, 6, 3)])
def test_suggested_shapes_cover_n_exactly_factor_d_and_are_balanced(n: int, d: int, cores: int) -> None:
    p, q = suggest_tt_shapes(n, d, cores)
    assert len(p) == len(q) == cores
    assert math.prod(p) >= n and math.prod(q) == d
    assert max(p) - min(p) <= 1, p
    smaller = list(p)
    smaller[-1] -= 1
    assert math.prod(smaller) < n, "no factor can shrink without truncating rows"


def test_suggestion_for_the_40m_table_is_reported(caplog: pytest.LogCaptureFixture) -> None:
    assert suggest_tt_shapes(40_000_000, 128, 3) == ((342, 342, 342), (4, 4, 8))
    with caplog.at_level(logging.INFO, logger="torchrec_pss_plugins.tt.tt"):
        module = tt_module(40_000_000, 128, TTConfig(ranks=4))
    assert "p=[342, 342, 342]" in caplog.text and "q=[4, 4, 8]" in caplog.text
    assert "342, 342, 342" in repr(module.memory_for("t"))


@pytest.mark.parametrize("init", ["sampled_gaussian", "normal", "uniform"])
def test_initial_rows_have_mean_zero_and_the_target_variance(init: str) -> None:
    n, d = 50_000, 16
    memory = tt_module(n, d, TTConfig(ranks=8, init=init, seed=1)).memory_for("t")
    rows = memory.recover("t", torch.randint(0, n, (20_000,), generator=torch.Generator().manual_seed(2))).detach()
    target = 1 / (3 * n)
    assert abs(rows.mean().item()) < 0.05 * math.sqrt(target)
    assert 0.8 * target < rows.var().item() < 1.2 * target, rows.var().item() / target


def test_sampled_gaussian_keeps_only_the_tails() -> None:
    memory = tt_module(1000, 8, TTConfig(ranks=4, seed=3)).memory_for("t")
    for core in memory.cores:
        scale = core.detach().abs().min()
        normalised = core.detach().abs() / (core.detach().pow(2).mean().sqrt())
        assert scale > 0 and normalised.min() > 0.5, "no draw may be near 0"


def test_40m_row_table_trains_in_a_few_hundred_mb() -> None:
    script = textwrap.dedent(
        """
        import resource, torch
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
        from torchrec_pss import CompressedEmbeddingBagCollection, TTConfig
        n = 40_000_000
        table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=n, feature_names=["f"])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        module = CompressedEmbeddingBagCollection([table], {"t": TTConfig(ranks=16)})
        ids = torch.cat([torch.randint(0, n, (4096 * 4,)), torch.tensor([n - 1, n - 2])])
        kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.tensor([4] * 4096 + [2]))
        out = module(kjt).values()
        out.sum().backward()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert out.shape == (4097, 128) and torch.isfinite(out).all()
        print((after - before) // 1024, module.num_bytes()["t"])
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    grown_mb, stored = map(int, result.stdout.split()[-2:])
    assert grown_mb < 300, f"peak RSS grew {grown_mb} MB"
    assert stored < 40_000_000 * 128 * 4 / 1000


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_cores": 5}, r"num_cores must be an int in \[2, 4\]"),
        ({"num_cores": 1}, r"num_cores must be an int in \[2, 4\]"),
        ({"ranks": 0}, "ranks must be an int >= 1 or a sequence of them"),
        ({"ranks": [4, 4, 4]}, "ranks needs num_cores - 1 = 2 values"),
        ({"p_shapes": [10, 10]}, "p_shapes must be 3 ints"),
        ({"init": "zeros"}, "init must be"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TTConfig(**kwargs)


def test_shapes_must_cover_the_table() -> None:
    with pytest.raises(ValueError, match=r"table 't': TTConfig.p_shapes=\[4, 4, 4\] multiply to 64 < num_embeddings=100"):
        tt_module(100, 8, TTConfig(p_shapes=[4, 4, 4]))
    with pytest.raises(ValueError, match=r"table 't': TTConfig.q_shapes=\[2, 2, 3\] multiply to 12 != embedding_dim=8"):
        tt_module(100, 8, TTConfig(q_shapes=[2, 2, 3]))
