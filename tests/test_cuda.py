"""The same module on CUDA gives the CPU's outputs and gradients (skipped without a GPU)."""

from __future__ import annotations

import random

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.optim import apply_optimizer_in_backward
from torchrec_pss_plugins.robe import ops, robe

from helpers import make_kjt, random_bags, random_weights
from torchrec_pss import CompressedEmbeddingBagCollection, HashingConfig, MLETConfig, QRConfig, RobeConfig, TTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def build(device: str, z: int, use_sign: bool, gradient: str) -> CompressedEmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=2**40, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=1000, feature_names=["f3"],
                           pooling=PoolingType.MEAN),
        EmbeddingBagConfig(name="plain", embedding_dim=16, num_embeddings=100, feature_names=["f4"]),
    ]
    config = RobeConfig(memory_size=4099, chunk_size=z, use_sign=use_sign, gradient=gradient, seed=4)
    torch.manual_seed(0)
    return CompressedEmbeddingBagCollection(tables, {"t1": config, "t2": config}, device, is_weighted=True)


@pytest.mark.parametrize("z", [1, 4, 16, 32])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
def test_cuda_matches_cpu(z: int, use_sign: bool, gradient: str) -> None:
    rng = random.Random(z)
    bags = {f: random_bags(rng, n, batch=64, max_len=6)
            for f, n in {"f1": 2**40, "f2": 2**40, "f3": 1000, "f4": 100}.items()}
    kjt = make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})
    kjt_gpu = kjt.to(torch.device("cuda"))  # before the CPU forward: KJT.to() carries its to_dict() cache along
    cpu, gpu = build("cpu", z, use_sign, gradient), build("cuda", z, use_sign, gradient)
    gpu.load_state_dict(cpu.state_dict())
    out_cpu, out_gpu = cpu(kjt), gpu(kjt_gpu)
    torch.testing.assert_close(out_gpu.values().cpu(), out_cpu.values(), rtol=1e-5, atol=1e-6)
    probe = torch.randn_like(out_cpu.values())
    (out_cpu.values() * probe).sum().backward()
    (out_gpu.values() * probe.cuda()).sum().backward()
    for (name, p_cpu), (_, p_gpu) in zip(cpu.named_parameters(), gpu.named_parameters()):
        g_cpu, g_gpu = p_cpu.grad, p_gpu.grad.cpu()
        g_cpu = g_cpu.to_dense() if g_cpu.is_sparse else g_cpu
        g_gpu = g_gpu.to_dense() if g_gpu.is_sparse else g_gpu
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-4, atol=1e-5, msg=name)


METHOD_CONFIGS = {
    "qr": lambda: QRConfig(collisions=7, gradient="sparse"),
    "tt": lambda: TTConfig(ranks=4, seed=0),
    "mlet": lambda: MLETConfig(inner_dim=12),
    "hashing": lambda: HashingConfig(num_buckets=97, gradient="sparse"),
    "robe": lambda: RobeConfig(memory_size=4099, chunk_size=8, gradient="auto"),
}


def build_method(device: str, method: str, pooling: PoolingType = PoolingType.MEAN) -> CompressedEmbeddingBagCollection:
    tables = [
        EmbeddingBagConfig(name="t1", embedding_dim=16, num_embeddings=5000, feature_names=["f1", "f2"]),
        EmbeddingBagConfig(name="t2", embedding_dim=16, num_embeddings=1000, feature_names=["f3"], pooling=pooling),
    ]
    torch.manual_seed(0)
    config = METHOD_CONFIGS[method]()
    return CompressedEmbeddingBagCollection(tables, {"t1": config, "t2": config}, device, is_weighted=True)


def train_on_cpu_and_cuda(method: str, pooling: PoolingType, optimizer: type) -> None:
    """Three steps with ``optimizer`` in backward from one init on the CPU and on CUDA: the parameters agree."""
    modules = {d: build_method(d, method, pooling) for d in ("cpu", "cuda")}
    modules["cuda"].load_state_dict(modules["cpu"].state_dict())
    for module in modules.values():
        apply_optimizer_in_backward(optimizer, module.parameters(), {"lr": 0.05})
    for step in range(3):
        rng = random.Random(step)
        bags = {f: random_bags(rng, n, batch=32, max_len=5) for f, n in {"f1": 5000, "f2": 5000, "f3": 1000}.items()}
        kjt = make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})
        kjt_gpu = kjt.to(torch.device("cuda"))
        modules["cpu"](kjt).values().pow(2).sum().backward()
        modules["cuda"](kjt_gpu).values().pow(2).sum().backward()
    for (name, cpu_param), gpu_param in zip(modules["cpu"].named_parameters(), modules["cuda"].parameters()):
        torch.testing.assert_close(gpu_param.detach().cpu(), cpu_param.detach(), rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", METHOD_CONFIGS)
@pytest.mark.parametrize("pooling", [PoolingType.MEAN, PoolingType.SUM])
def test_fused_adagrad_steps_on_cuda_match_cpu(method: str, pooling: PoolingType) -> None:
    """With SUM everywhere a ROBE memory shared by both tables is read in one call (fused Adagrad)."""
    train_on_cpu_and_cuda(method, pooling, torch.optim.Adagrad)


@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_a_shared_memory_is_read_in_one_call_per_width_on_cuda(optimizer: type,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA every table of a ROBE memory with one width and pooling mode is pooled in one ``robe_pooled`` call
    (one kernel launch forward, one backward) whatever the batch size; the steps equal the CPU's, made here with
    one call per table (its limit of pooled floats set to 0)."""
    seen = []
    original = ops.robe_pooled
    monkeypatch.setattr(ops, "robe_pooled", lambda *args: seen.append(args[0].device.type) or original(*args))
    monkeypatch.setattr(robe, "ONE_CALL_MAX_FLOATS", 0)
    train_on_cpu_and_cuda("robe", PoolingType.SUM, optimizer)
    assert seen.count("cuda") == 3 and seen.count("cpu") == 6  # two tables: one call per step on CUDA


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_device_of_their_tensors_not_the_current_one() -> None:
    rng = random.Random(7)
    bags = {f: random_bags(rng, n, batch=32, max_len=6)
            for f, n in {"f1": 2**40, "f2": 2**40, "f3": 1000, "f4": 100}.items()}
    kjt = make_kjt(bags, {f: random_weights(rng, b) for f, b in bags.items()})
    cpu, second = build("cpu", 4, True, "dense"), build("cuda:1", 4, True, "dense")
    second.load_state_dict(cpu.state_dict())
    with torch.cuda.device(0):
        out = second(kjt.to(torch.device("cuda:1")))
        torch.cuda.synchronize(1)
    torch.testing.assert_close(out.values().cpu(), cpu(kjt).values(), rtol=1e-5, atol=1e-6)
