"""QR specifics: exact integer digits for 40M-row tables, compression -> collisions, init, bad configs."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from helpers import assert_coalesced_rows_of, make_kjt
import reference
from torchrec_pss import CompressedEmbeddingBagCollection, QRConfig
from torchrec_pss_plugins.qr.qr import stored_elements

BIG = 40_000_000


def qr_module(n: int, config: QRConfig, d: int = 8) -> CompressedEmbeddingBagCollection:
    table = EmbeddingBagConfig(name="t", embedding_dim=d, num_embeddings=n, feature_names=["f"])
    return CompressedEmbeddingBagCollection([table], {"t": config})


def test_integer_division_is_exact_above_2_24() -> None:
    config = QRConfig(collisions=7)
    module = qr_module(BIG, config)
    memory = module.memory_for("t")
    ids = [BIG - 1, BIG - 2, 2**24 + 1, 33_554_435, 16_777_217]
    float_quotients = (torch.tensor(ids, dtype=torch.float32) / 7).floor().long().tolist()
    assert float_quotients != [x // 7 for x in ids], "these ids must expose float division"
    remainder, quotient = memory.digits(torch.tensor(ids))
    assert quotient.tolist() == [x // 7 for x in ids] and remainder.tolist() == [x % 7 for x in ids]
    out = module(make_kjt({"f": [[x] for x in ids]})).values()
    expected = reference.pooled(reference.qr_embedding([p.detach() for p in memory.parts], 7, "mult"), 8,
                                [[x] for x in ids])
    torch.testing.assert_close(out.double(), expected)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_compression_picks_the_smallest_collisions_reaching_it(operation: str) -> None:
    n, d = 10_000, 16
    config = QRConfig(compression=8, operation=operation)
    memory = qr_module(n, config, d).memory_for("t")
    c = memory.collisions
    assert stored_elements(n, d, c, config) <= n * d / 8 < stored_elements(n, d, c - 1, config)
    assert memory.num_bytes() == 4 * stored_elements(n, d, c, config)


def test_unreachable_compression_names_table_and_field() -> None:
    with pytest.raises(ValueError, match=r"table 't': QRConfig.compression=1000 is out of reach with 2 partitions "
                                         r"\(at most 50.0x for n=10000\); lower it or add partitions"):
        qr_module(10_000, QRConfig(compression=1000))


@pytest.mark.parametrize("n, config, message", [
    (3, QRConfig(compression=1), r"is out of reach with 2 partitions \(at most 0.8x for n=3\); keep this table plain"),
    (2, QRConfig(compression=1), r"QR needs num_embeddings >= 3 \(collisions from 2 to num_embeddings - 1\), got 2"),
    (2, QRConfig(collisions=2), r"QR needs num_embeddings >= 3"),
])
def test_tables_qr_cannot_compress_are_told_to_stay_plain(n: int, config: QRConfig, message: str) -> None:
    """No QR setting stores fewer elements than such a table: the error no longer advises a lower compression
    (which is refused below 1) or more partitions (which store more)."""
    with pytest.raises(ValueError, match=rf"table 't': .*{message}"):
        qr_module(n, config)


def test_concat_parts_have_half_width() -> None:
    memory = qr_module(100, QRConfig(collisions=10, operation="concat"), d=8).memory_for("t")
    assert [tuple(p.shape) for p in memory.parts] == [(10, 4), (10, 4)]
    with pytest.raises(ValueError, match=r"table 't'.*embedding_dim=7 divisible by num_partitions=2"):
        qr_module(100, QRConfig(collisions=10, operation="concat"), d=7)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_default_init_is_symmetric_with_the_tables_variance(operation: str) -> None:
    n = 20_000
    torch.manual_seed(0)
    memory = qr_module(n, QRConfig(collisions=50, operation=operation), d=64).memory_for("t")
    rows = memory.recover("t", torch.randint(0, n, (20_000,))).detach()
    target = 1 / (3 * n)
    assert abs(rows.mean().item()) < 0.05 * target**0.5
    assert 0.8 * target < rows.var().item() < 1.2 * target
    assert all((p < 0).any() for p in memory.parts), "parts must be symmetric around 0, not all positive"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"collisions": 1}, "collisions must be an int >= 2"),
        ({"compression": 0.5}, "compression must be"),
        ({}, "exactly one of collisions and compression"),
        ({"collisions": 4, "operation": "max"}, "operation must be"),
        ({"collisions": 4, "num_partitions": 1}, "num_partitions must be"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QRConfig(**kwargs)


def test_collisions_not_below_table_size() -> None:
    with pytest.raises(ValueError, match=r"table 't': QRConfig.collisions=10 must be < num_embeddings=10"):
        qr_module(10, QRConfig(collisions=10))


@pytest.mark.parametrize("kernels", ["fast", "reference"])
@pytest.mark.parametrize("operation, num_partitions", [("mult", 2), ("add", 3), ("concat", 2)])
def test_sparse_part_gradients_are_coalesced_and_equal_the_dense_ones(kernels: str, operation: str,
                                                                      num_partitions: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 (the C++ kernels, or the reference): each part's ``.grad`` keeps the coalesced flag that
    ``qr_pooled``'s backward set (torch's AccumulateGrad drops it) and holds the dense gradient's rows."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    kjt = make_kjt({"f": [[3, 3, 17, 250], [], [17, 999, 4], [3]]})
    grads = {}
    for gradient in ("dense", "sparse"):
        torch.manual_seed(0)
        config = QRConfig(collisions=7, operation=operation, num_partitions=num_partitions, gradient=gradient)
        module = qr_module(1000, config)
        module(kjt).values().pow(2).sum().backward()
        grads[gradient] = [part.grad for part in module.memory_for("t").parts]
    for sparse, dense in zip(grads["sparse"], grads["dense"], strict=True):
        assert_coalesced_rows_of(sparse, dense)
