"""``decompress``: compressed tables served as plain tables give the compressed module's outputs; the
memory limit refuses before allocating; unknown tables; partial decompression keeps the rest compressed."""

from __future__ import annotations

import importlib
import random
import subprocess
import sys

import pytest
import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import (CompressedEmbeddingBagCollection, HashingConfig, MLETConfig, QRConfig, RobeConfig, TTConfig,
                          collapse, decompress, quantize_memories_)
from torchrec_pss.contract import PSSMemory
from torchrec_pss.decompress import DEFAULT_MAX_BYTES

METHODS = {
    "robe": RobeConfig(memory_size=300, chunk_size=4),  # a and b share one memory
    "qr": QRConfig(collisions=20),
    "tt": TTConfig(ranks=4),
    "hashing": HashingConfig(num_buckets=50),
    "mlet": MLETConfig(inner_dim=4),
}


def tables() -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(name="a", embedding_dim=8, num_embeddings=300, feature_names=["fa", "fb"]),
        EmbeddingBagConfig(name="b", embedding_dim=8, num_embeddings=200, feature_names=["fc"], pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="c", embedding_dim=8, num_embeddings=50, feature_names=["fd"]),
    ]


def batch(weighted: bool) -> KeyedJaggedTensor:
    rng = random.Random(0)
    bags = {f: random_bags(rng, 50, batch=16, max_len=5) for f in ["fa", "fb", "fc", "fd"]}
    return make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()} if weighted else None)


def assert_same_outputs(served: torch.nn.Module, module: CompressedEmbeddingBagCollection) -> None:
    features = batch(module.is_weighted())
    expected, actual = module(features), served(features)
    assert actual.keys() == expected.keys() and actual.length_per_key() == expected.length_per_key()
    torch.testing.assert_close(actual.values(), expected.values(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_decompressed_tables_give_equal_outputs(method: str, weighted: bool) -> None:
    torch.manual_seed(0)
    config = METHODS[method]
    module = CompressedEmbeddingBagCollection(tables(), {"a": config, "b": config}, is_weighted=weighted)
    served = decompress(module)
    # nn.EmbeddingBag refuses per-sample weights with MEAN (table b): that module stays a CEBC of plain tables
    assert type(served) is (CompressedEmbeddingBagCollection if weighted else EmbeddingBagCollection)
    assert not getattr(served, "compression", {})
    for name in ("a", "b"):
        exact = module.memory_for(name).materialize(name).float()
        assert torch.equal(served.embedding_bags[name].weight, exact)
    assert torch.equal(served.embedding_bags["c"].weight, module.embedding_bags["c"].weight)
    assert_same_outputs(served, module)


@pytest.mark.parametrize("robe", [METHODS["robe"], RobeConfig(compression=4, chunk_size=4)],
                         ids=["memory_size", "compression"])
def test_partial_decompression_keeps_the_rest_compressed(robe: RobeConfig) -> None:
    """a and b share one ROBE memory: b keeps reading all of it after a became plain; d (QR) stays too. The
    result's ``compression`` rebuilds it: its state_dict loads into that rebuild, which serves the same outputs."""
    torch.manual_seed(1)
    configs = tables() + [EmbeddingBagConfig(name="d", embedding_dim=8, num_embeddings=100, feature_names=["fe"])]
    module = CompressedEmbeddingBagCollection(configs, {"a": robe, "b": robe, "d": METHODS["qr"]}, is_weighted=True)
    served = decompress(module, ["a", "c"])  # c is plain already
    assert type(served) is CompressedEmbeddingBagCollection
    assert set(served.compression) == {"b", "d"} and set(served.embedding_bags) == {"a", "c"}
    assert torch.equal(served.memory_for("b").weight, module.memory_for("b").weight)
    assert served.memory_for("b").memory_size == module.memory_for("b").memory_size
    rng = random.Random(2)
    bags = {f: random_bags(rng, 50, batch=16, max_len=5) for f in ["fa", "fb", "fc", "fd", "fe"]}
    features = make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})
    torch.testing.assert_close(served(features).values(), module(features).values(), rtol=1e-5, atol=1e-6)
    rebuilt = CompressedEmbeddingBagCollection(configs, served.compression, is_weighted=True)
    rebuilt.load_state_dict(served.state_dict())
    assert torch.equal(rebuilt(features).values(), served(features).values())


@pytest.mark.parametrize("plain", [["a"], ["d"], ["a", "c"]], ids=["half_a_robe_group", "qr", "with_a_plain_one"])
def test_partial_decompression_of_an_int8_module_keeps_int8_memories(plain: list[str]) -> None:
    """Kept memories stay int8 (the same codes and scales), so the served module equals the int8 one."""
    torch.manual_seed(4)
    configs = tables() + [EmbeddingBagConfig(name="d", embedding_dim=8, num_embeddings=100, feature_names=["fe"])]
    robe = RobeConfig(memory_size=300, chunk_size=4, use_sign=True)
    module = quantize_memories_(CompressedEmbeddingBagCollection(configs, {"a": robe, "b": robe, "d": METHODS["qr"]}),
                                block_size=16).eval()
    served = decompress(module, plain)
    kept = set(module.compression) - set(plain)
    assert set(served.compression) == kept
    for name in kept:
        assert type(served.memory_for(name)) is type(module.memory_for(name))
        for key, value in module.memory_for(name).state_dict().items():
            assert torch.equal(served.memory_for(name).state_dict()[key], value), (name, key)
    rng = random.Random(5)
    features = make_kjt({f: random_bags(rng, 50, batch=16, max_len=5) for f in ["fa", "fb", "fc", "fd", "fe"]})
    with torch.no_grad():
        torch.testing.assert_close(served(features).values(), module(features).values(), rtol=1e-5, atol=1e-6)


def test_collapsing_mlet_keeps_an_int8_robe_memory() -> None:
    torch.manual_seed(6)
    robe = RobeConfig(memory_size=300, chunk_size=4, use_sign=True)
    module = CompressedEmbeddingBagCollection(tables(), {"a": robe, "b": robe, "c": MLETConfig(inner_dim=4)})
    module = quantize_memories_(module, block_size=16).eval()
    served = collapse(module)
    assert set(served.compression) == {"a", "b"} and type(served.memory_for("a")) is type(module.memory_for("a"))
    with torch.no_grad():
        assert_same_outputs(served, module)


def test_one_table_by_name() -> None:
    torch.manual_seed(3)
    module = CompressedEmbeddingBagCollection(tables(), {"a": METHODS["tt"], "b": METHODS["hashing"]})
    served = decompress(module, "b")
    assert set(served.compression) == {"a"} and "b" in served.embedding_bags
    assert_same_outputs(served, module)


def test_memory_limit_refuses_before_allocating(monkeypatch: pytest.MonkeyPatch) -> None:
    huge = EmbeddingBagConfig(name="huge", embedding_dim=16, num_embeddings=2**40, feature_names=["fh"])
    module = CompressedEmbeddingBagCollection(tables() + [huge], {"huge": RobeConfig(memory_size=64, chunk_size=4),
                                                                  "a": METHODS["qr"]})

    def no_allocation(*args: object) -> None:
        raise AssertionError("decompress allocated after all")

    # the package attribute `decompress` is the function; the module is in sys.modules
    monkeypatch.setattr(importlib.import_module("torchrec_pss.decompress"), "with_plain_tables", no_allocation)
    monkeypatch.setattr(PSSMemory, "materialize", no_allocation)
    with pytest.raises(ValueError) as error:
        decompress(module)
    message = str(error.value)
    assert "'huge' [1,099,511,627,776 x 16]: 70,368,744,177,664 bytes" in message
    assert "'a' [300 x 8]: 9,600 bytes" in message
    assert f"max_bytes={DEFAULT_MAX_BYTES:,}" in message and DEFAULT_MAX_BYTES == 2**30


def test_caller_given_limit_is_inclusive() -> None:
    torch.manual_seed(4)
    module = CompressedEmbeddingBagCollection(tables(), {"a": METHODS["qr"], "b": METHODS["mlet"]})
    needed = (300 + 200) * 8 * 4
    with pytest.raises(ValueError, match=f"need {needed:,} bytes .* more than max_bytes={needed - 1:,}"):
        decompress(module, max_bytes=needed - 1)
    assert_same_outputs(decompress(module, max_bytes=needed), module)


def test_unknown_tables_are_named() -> None:
    module = CompressedEmbeddingBagCollection(tables(), {"a": METHODS["qr"]})
    with pytest.raises(ValueError, match=r"no tables \['nope', 'zz'\]; it has \['a', 'b', 'c'\]"):
        decompress(module, ["a", "zz", "nope"])


PEAK_SCRIPT = """
import resource, sys, torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec_pss import CompressedEmbeddingBagCollection, QRConfig, RobeConfig, decompress
n, d = 2_000_000, 16
config = {"robe": RobeConfig(compression=100, chunk_size=16), "qr": QRConfig(compression=100)}[sys.argv[1]]
module = CompressedEmbeddingBagCollection(
    [EmbeddingBagConfig(name="a", embedding_dim=d, num_embeddings=n, feature_names=["fa"])], {"a": config}).eval()
before = int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024
plain = decompress(module)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print((peak - before) / (n * d * 4))
"""


@pytest.mark.parametrize("method", ["robe", "qr"])
def test_decompress_needs_the_table_and_its_float64_copy_only(method: str) -> None:
    """Peak memory of decompressing a 2M x 16 table (122 MiB of float32), in a fresh process: the plain table plus
    the float64 one being cast (3x; 5.6-6.1x when the float64 blocks were concatenated and cast through a copy)."""
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, method], check=True, capture_output=True, text=True,
                         timeout=300)
    assert float(out.stdout.split()[-1]) < 4.2
