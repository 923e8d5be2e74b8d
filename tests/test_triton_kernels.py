"""Triton kernels (ROBE, QR, TT, Adagrad) against the reference modules.

Without CUDA the kernels run in the Triton interpreter on CPU tensors; with CUDA they are compiled and
run on CUDA tensors (the references always run on the CPU).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec_pss_plugins.qr import reference as qr_reference
from torchrec_pss_plugins.qr.triton_kernels import (
    qr_grad_rows,
    qr_pooled_backward,
    qr_pooled_forward,
    qr_weights_grad,
)
from torchrec_pss_plugins.robe import reference
from torchrec_pss_plugins.tt import ops as tt_ops
from torchrec_pss_plugins.tt import reference as tt_reference
from torchrec_pss_plugins.tt import triton_kernels as tt_triton
from torchrec_pss_plugins.robe import triton_kernels as robe_triton
from torchrec_pss_plugins.robe.triton_kernels import (
    blockwise_adagrad_update_,
    robe_pooled_backward,
    robe_pooled_forward,
    robe_sgd_update_,
    robe_sparse_grad,
    robe_weights_grad,
)
from torchrec_pss_plugins.tt.triton_kernels import tt_rows, tt_rows_backward

from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    QRConfig,
    RobeConfig,
    TTConfig,
)
from torchrec_pss.optim import BlockwiseAdagrad
from torchrec_pss.optim.fused_update import FusedUpdate

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
D = 8
BIG = 2**62
LENGTHS = [0, 3, 1, 12, 0, 5, 2]
"""Bag lengths: empty bags first and in the middle, one bag longer than a tile (BLOCK_N = 8)."""
TOL = {"rtol": 1e-5, "atol": 1e-6}


def bags(num_embeddings: int, seed: int, lengths: list[int] = LENGTHS) -> tuple[torch.Tensor, ...]:
    """``(ids [N], lengths [B], offsets [B + 1], weights [N])`` on the CPU; ids reach ``num_embeddings - 1``."""
    generator = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths, dtype=torch.int64)
    n = int(lengths_t.sum())
    low = max(0, num_embeddings - 10**6)
    ids = torch.randint(low, num_embeddings, (n,), generator=generator, dtype=torch.int64)
    if n:
        ids[0] = num_embeddings - 1
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_t.cumsum(0)])
    return ids, lengths_t, offsets, torch.randn(n, generator=generator) * 2


def robe(z: int, use_sign: bool, memory_size: int = 97, dim: int = D):
    tables = [EmbeddingBagConfig(name="t1", embedding_dim=dim, num_embeddings=BIG, feature_names=["f1"])]
    config = RobeConfig(memory_size=memory_size, chunk_size=z, use_sign=use_sign, seed=3, gradient="dense")
    torch.manual_seed(0)
    return CompressedEmbeddingBagCollection(tables, {"t1": config}).pss_memories["robe_default"]


def robe_args(memory, z: int, use_sign: bool, mean: bool, dim: int = D) -> dict:
    return {
        "coefficients": memory.hash_coefficients.to(DEVICE),
        "keys": memory.table_keys[:1].to(DEVICE), "dim": dim, "chunk_size": z, "use_sign": use_sign, "mean": mean,
    }


def on_device(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().to(DEVICE) for t in tensors]


def assert_sparse_grad_matches(grad_out: torch.Tensor, ids: torch.Tensor, offsets: torch.Tensor,
                               weights: torch.Tensor | None, args: dict, memory_size: int) -> None:
    """``robe_sparse_grad`` gives the reference's touched positions exactly and their values."""
    cpu_args = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    expected = reference.sparse_grad(grad_out, ids, offsets, weights, cpu_args["coefficients"], cpu_args["keys"],
                                     memory_size, args["chunk_size"], args["use_sign"], args["mean"])
    positions, values = robe_sparse_grad(*on_device(grad_out, ids, offsets, weights), memory_size=memory_size,
                                         **args)
    assert torch.equal(positions.cpu(), expected[0])
    assert bool((positions[1:] > positions[:-1]).all()), "robe_pooled flags the sparse gradient coalesced"
    torch.testing.assert_close(values.cpu(), expected[1], **TOL)


@pytest.mark.parametrize("z", [1, 4, D, 2 * D])
@pytest.mark.parametrize("use_sign", [False, True])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("wide", [False, True])
def test_robe_matches_reference(z: int, use_sign: bool, weighted: bool, mean: bool, wide: bool,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward, dense memory gradient, weights gradient and fused SGD, for ids up to 2^62; ``wide``: the
    64-bit position path that memories of 2^31 elements or more take."""
    if wide:
        monkeypatch.setattr(robe_triton, "NARROW_LIMIT", 0)
    memory = robe(z, use_sign)
    ids, lengths, offsets, weights = bags(BIG, seed=z + 10 * use_sign)
    weights = weights.requires_grad_() if weighted else None
    expected = memory.pooled("t1", ids, lengths, weights, mean)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    inputs = [memory.weight] + ([weights] if weighted else [])
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), inputs)

    args = robe_args(memory, z, use_sign, mean)
    m, ids_d, offsets_d, weights_d, grad_d = on_device(memory.weight, ids, offsets, weights, grad_out)
    out = robe_pooled_forward(m, ids_d, offsets_d, weights_d, **args)
    torch.testing.assert_close(out.cpu(), expected.detach(), **TOL)
    assert torch.all(out[0] == 0) and torch.all(out[4] == 0), "empty bags pool to zeros"
    grad = robe_pooled_backward(grad_d, ids_d, offsets_d, weights_d, memory_size=m.numel(), **args)
    torch.testing.assert_close(grad.cpu(), expected_grads[0].to_dense(), **TOL)
    updated = robe_sgd_update_(m.clone(), grad_d, ids_d, offsets_d, weights_d, lr=0.1, **args)
    torch.testing.assert_close(updated.cpu(), memory.weight.detach() - 0.1 * expected_grads[0].to_dense(), **TOL)
    assert_sparse_grad_matches(grad_out, ids, offsets, None if weights is None else weights.detach(), args, m.numel())
    if weighted:
        weights_grad = robe_weights_grad(grad_d, m, ids_d, offsets_d, **args)
        torch.testing.assert_close(weights_grad.cpu(), expected_grads[1], **TOL)


@pytest.mark.parametrize("layout", ["expanded", "column_slice", "transposed"])
def test_robe_backward_reads_strided_gradients(layout: str) -> None:
    """The scatter reads ``grad_out`` through its strides (the expanded gradient of a ``sum`` is not copied)."""
    z = 4
    memory = robe(z, use_sign=True)
    ids, lengths, offsets, _ = bags(BIG, seed=7)
    expected = memory.pooled("t1", ids, lengths, None, False)
    wide = torch.randn(expected.shape[0], 2 * D, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grad_d = {"expanded": torch.full((1, 1), 0.5, device=DEVICE).expand(expected.shape),
              "column_slice": wide[:, D:], "transposed": wide[:, :D].t().contiguous().t()}[layout]
    assert not grad_d.is_contiguous()
    expected_grad = torch.autograd.grad((expected * grad_d.cpu()).sum(), [memory.weight])[0].to_dense()
    args = robe_args(memory, z, True, False)
    m, ids_d, offsets_d = on_device(memory.weight, ids, offsets)
    grad = robe_pooled_backward(grad_d, ids_d, offsets_d, None, memory_size=m.numel(), **args)
    torch.testing.assert_close(grad.cpu(), expected_grad, **TOL)
    updated = robe_sgd_update_(m.clone(), grad_d, ids_d, offsets_d, None, lr=0.1, **args)
    torch.testing.assert_close(updated.cpu(), memory.weight.detach() - 0.1 * expected_grad, **TOL)


@pytest.mark.parametrize("dim, z", [(12, 3), (12, 24), (256, 32)])
def test_robe_odd_and_wide_dims(dim: int, z: int) -> None:
    """Column blocks with masked columns (d = 12) and several column blocks per bag (d = 256)."""
    memory = robe(z, use_sign=True, memory_size=1009, dim=dim)
    ids, lengths, offsets, weights = bags(BIG, seed=dim)
    weights.requires_grad_()
    expected = memory.pooled("t1", ids, lengths, weights, True)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(4))
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), [memory.weight, weights])
    args = robe_args(memory, z, True, True, dim)
    m, ids_d, offsets_d, weights_d, grad_d = on_device(memory.weight, ids, offsets, weights, grad_out)
    out = robe_pooled_forward(m, ids_d, offsets_d, weights_d, **args)
    torch.testing.assert_close(out.cpu(), expected.detach(), **TOL)
    grad = robe_pooled_backward(grad_d, ids_d, offsets_d, weights_d, memory_size=m.numel(), **args)
    torch.testing.assert_close(grad.cpu(), expected_grads[0].to_dense(), **TOL)
    weights_grad = robe_weights_grad(grad_d, m, ids_d, offsets_d, **args)
    torch.testing.assert_close(weights_grad.cpu(), expected_grads[1], **TOL)


@pytest.mark.parametrize("z", [4, 3 * D])
def test_robe_hashes_ids_at_both_ends_of_int64(z: int) -> None:
    """The ops take any int64 id: at Z = 3d the block of ``-2^63`` is a floor quotient that ``x - r`` would
    overflow (it gave ``-2^63`` and ``-2^63 + 1`` another block than the reference)."""
    memory = robe(z, use_sign=True, memory_size=1009)
    ids = torch.tensor([-2**63, -2**63 + 1, -2**63 + 2, 2**63 - 1, 2**63 - 2, -1, 0, 5])
    offsets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 8])
    args = robe_args(memory, z, True, False)
    cpu_args = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in args.items()}
    expected = reference.pooled_forward(memory.weight.detach(), ids, offsets, None, **cpu_args)
    m, ids_d, offsets_d = on_device(memory.weight, ids, offsets)
    torch.testing.assert_close(robe_pooled_forward(m, ids_d, offsets_d, None, **args).cpu(), expected, **TOL)
    assert_sparse_grad_matches(torch.randn(expected.shape), ids, offsets, None, args, 1009)


@pytest.mark.parametrize("z", [4, 2 * D, 4 * D])
def test_robe_runs_wrap_around_a_small_memory(z: int) -> None:
    """|M| = 5 is smaller than a chunk: every run wraps around the end of M, some several times."""
    memory = robe(z, use_sign=False, memory_size=5)
    ids, lengths, offsets, _ = bags(BIG, seed=z)
    expected = memory.pooled("t1", ids, lengths, None, False)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2))
    (expected_grad,) = torch.autograd.grad((expected * grad_out).sum(), [memory.weight])
    args = robe_args(memory, z, False, False)
    m, ids_d, offsets_d, grad_d = on_device(memory.weight, ids, offsets, grad_out)
    torch.testing.assert_close(robe_pooled_forward(m, ids_d, offsets_d, None, **args).cpu(), expected.detach(), **TOL)
    grad = robe_pooled_backward(grad_d, ids_d, offsets_d, None, memory_size=5, **args)
    torch.testing.assert_close(grad.cpu(), expected_grad.to_dense(), **TOL)
    assert_sparse_grad_matches(grad_out, ids, offsets, None, args, 5)


@pytest.mark.parametrize("z,use_sign", [(1, True), (4, False), (2 * D, True)])
def test_robe_per_bag_keys(z: int, use_sign: bool) -> None:
    """Keys ``[B]`` (bags of three tables, one key beyond P) against the reference ops (themselves checked
    against one call per table in ``test_robe_shared_memory.py``): forward, gradients and fused SGD."""
    memory = robe(z, use_sign)
    ids, _, offsets, weights = bags(BIG, seed=z)
    keys = torch.tensor([3, 3, 2**40 + 5, 9, 9, 3, 2**40 + 5])
    coefficients = memory.hash_coefficients
    expected = reference.pooled_forward(memory.weight.detach(), ids, offsets, weights, coefficients, keys, D, z,
                                        use_sign, True)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    expected_grad = reference.pooled_backward(grad_out, ids, offsets, weights, coefficients, keys, 97, z, use_sign,
                                              True)
    expected_weights_grad = reference.weights_grad(grad_out, memory.weight.detach(), ids, offsets, coefficients, keys,
                                                   z, use_sign, True)
    args = {**robe_args(memory, z, use_sign, True), "keys": keys.to(DEVICE)}
    m, ids_d, offsets_d, weights_d, grad_d = on_device(memory.weight, ids, offsets, weights, grad_out)
    torch.testing.assert_close(robe_pooled_forward(m, ids_d, offsets_d, weights_d, **args).cpu(), expected, **TOL)
    grad = robe_pooled_backward(grad_d, ids_d, offsets_d, weights_d, memory_size=97, **args)
    torch.testing.assert_close(grad.cpu(), expected_grad, **TOL)
    updated = robe_sgd_update_(m.clone(), grad_d, ids_d, offsets_d, weights_d, lr=0.1, **args)
    torch.testing.assert_close(updated.cpu(), memory.weight.detach() - 0.1 * expected_grad, **TOL)
    torch.testing.assert_close(robe_weights_grad(grad_d, m, ids_d, offsets_d, **args).cpu(), expected_weights_grad,
                               **TOL)
    assert_sparse_grad_matches(grad_out, ids, offsets, weights, args, 97)


@pytest.mark.parametrize("z,use_sign,dim", [(1, True, D), (4, False, 12), (2 * D, True, D)])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [False, True])
@pytest.mark.parametrize("per_bag_keys", [False, True])
def test_robe_sorted_segments_match_reference(z: int, use_sign: bool, dim: int, weighted: bool, mean: bool,
                                              per_bag_keys: bool) -> None:
    """The sorted-segments backward and SGD (``segments=True``) on repeated ids: one id occurs 40 times (longer
    than a segment tile), ids repeat across bags and across tables (per-bag keys split their segments)."""
    memory = robe(z, use_sign, memory_size=97, dim=dim)
    lengths = [0, 30, 3, 1, 0, 17, 5]
    generator = torch.Generator().manual_seed(z + dim)
    values = torch.tensor([BIG - 1, 5, 7, 2**40, 0])
    ids = values[torch.randint(0, values.numel(), (sum(lengths),), generator=generator)]
    ids[torch.randperm(ids.numel(), generator=generator)[:40]] = 7
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    weights = torch.randn(ids.numel(), generator=generator) if weighted else None
    keys = torch.tensor([3, 3, 2**40 + 5, 9, 9, 3, 2**40 + 5]) if per_bag_keys else memory.table_keys[:1]
    coefficients = memory.hash_coefficients
    grad_out = torch.randn(len(lengths), dim, generator=generator)
    expected = reference.pooled_backward(grad_out, ids, offsets, weights, coefficients, keys, 97, z, use_sign, mean)
    args = {**robe_args(memory, z, use_sign, mean, dim), "keys": keys.to(DEVICE)}
    m, ids_d, offsets_d, weights_d, grad_d = on_device(memory.weight, ids, offsets, weights, grad_out)
    tol = {"rtol": 1e-5, "atol": 1e-5}  # sums of up to ~90 terms of size ~1, in another order than the reference
    grad = robe_pooled_backward(grad_d, ids_d, offsets_d, weights_d, memory_size=97, segments=True, **args)
    torch.testing.assert_close(grad.cpu(), expected, **tol)
    updated = robe_sgd_update_(m.clone(), grad_d, ids_d, offsets_d, weights_d, lr=0.1, segments=True, **args)
    torch.testing.assert_close(updated.cpu(), memory.weight.detach() - 0.1 * expected, **tol)


def test_robe_without_ids_or_bags() -> None:
    memory = robe(4, use_sign=True)
    args = robe_args(memory, 4, True, True)
    m, ids, offsets = on_device(memory.weight, torch.zeros(0, dtype=torch.int64), torch.zeros(4, dtype=torch.int64))
    assert torch.equal(robe_pooled_forward(m, ids, offsets, None, **args).cpu(), torch.zeros(3, D))
    for segments in (False, True):
        grad = robe_pooled_backward(torch.ones(3, D, device=DEVICE), ids, offsets, None, memory_size=97,
                                    segments=segments, **args)
        assert torch.equal(grad.cpu(), torch.zeros(97))
    positions, values = robe_sparse_grad(torch.ones(3, D, device=DEVICE), ids, offsets, None, memory_size=97, **args)
    assert positions.numel() == 0 and values.numel() == 0
    no_bags = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    assert robe_pooled_forward(m, ids, no_bags, None, **args).shape == (0, D)


@pytest.mark.parametrize(
    "optimizer, block_size, size",
    [(torch.optim.Adagrad, 1, 97), (BlockwiseAdagrad, 4, 97), (BlockwiseAdagrad, 5, 97), (BlockwiseAdagrad, 2500, 6000),
     (BlockwiseAdagrad, 2**20 + 1, 2**20 + 50)]
)
def test_adagrad_matches_fused_update(optimizer: type, block_size: int, size: int) -> None:
    """Two steps with lr_decay; the last block is partial (2500 and more: blocks wider than a tile row of the
    kernel; more than 2^20 did not compile before)."""
    param = torch.nn.Parameter(torch.randn(size, generator=torch.Generator().manual_seed(0)))
    kwargs = {"lr": 0.05, "lr_decay": 0.1, "eps": 1e-8, "initial_accumulator_value": 0.1}
    reference = FusedUpdate("p", param, optimizer, kwargs, block_size)
    p, accumulator = on_device(param, reference.state["sum"])
    for step in (1, 2):
        grad = torch.randn(size, generator=torch.Generator().manual_seed(step))
        reference.apply(grad)
        blockwise_adagrad_update_(p, accumulator, grad.to(DEVICE), 0.05, 1e-8, block_size, lr_decay=0.1, step=step)
        torch.testing.assert_close(accumulator.cpu(), reference.state["sum"], **TOL)
        torch.testing.assert_close(p.cpu(), param.detach(), **TOL)


@pytest.mark.parametrize("num_partitions", [2, 3])
@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("weighted, mean", [(False, False), (True, False), (False, True), (True, True)])
def test_qr_matches_reference(num_partitions: int, operation: str, weighted: bool, mean: bool) -> None:
    n, d = 1000, 12
    table = EmbeddingBagConfig(name="t", embedding_dim=d, num_embeddings=n, feature_names=["f"])
    config = QRConfig(collisions=7, operation=operation, num_partitions=num_partitions)
    memory = CompressedEmbeddingBagCollection([table], {"t": config}).memory_for("t")
    ids, lengths, offsets, weights = bags(n, seed=num_partitions)
    weights = weights if weighted else None
    expected = memory.pooled("t", ids, lengths, weights, mean)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), list(memory.parts))

    parts = on_device(*memory.parts)
    ids_d, offsets_d, weights_d, grad_d = on_device(ids, offsets, weights, grad_out)
    out = qr_pooled_forward(parts, ids_d, offsets_d, weights_d, memory.collisions, operation, mean)
    torch.testing.assert_close(out.cpu(), expected.detach(), **TOL)
    grads = qr_pooled_backward(grad_d, parts, ids_d, offsets_d, weights_d, memory.collisions, operation, mean)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad.cpu(), expected_grad.to_dense(), **TOL)
    rows, values = qr_grad_rows(grad_d, parts, ids_d, offsets_d, weights_d, memory.collisions, operation, mean)
    cpu_parts = [part.detach() for part in memory.parts]
    args = (ids, offsets, weights, memory.collisions, operation, mean)
    for part_rows, part_values, ref_rows, ref_values in zip(rows, values, *qr_reference.grad_rows(grad_out, cpu_parts,
                                                                                                   *args), strict=True):
        assert torch.equal(part_rows.cpu(), ref_rows)
        assert bool((part_rows[1:] > part_rows[:-1]).all()), "qr_pooled flags the sparse gradients coalesced"
        torch.testing.assert_close(part_values.cpu(), ref_values, **TOL)


@pytest.mark.parametrize("operation, width", [("mult", 12), ("add", 160), ("concat", 80)])
@pytest.mark.parametrize("mean", [False, True])
def test_qr_weights_grad_matches_autograd(operation: str, width: int, mean: bool) -> None:
    """Per-sample weights' gradient, over one and over two blocks of columns (d = 160)."""
    parts = [torch.randn(rows, width, generator=torch.Generator().manual_seed(rows)) for rows in (7, 150)]
    ids, _, offsets, weights = bags(1000, seed=4)
    weights = weights.clone().requires_grad_(True)
    out = qr_reference.pooled_forward(parts, ids, offsets, weights, 7, operation, mean)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    out.backward(grad_out)
    got = qr_weights_grad(on_device(grad_out)[0], on_device(*parts), *on_device(ids, offsets), 7, operation, mean)
    torch.testing.assert_close(got.cpu(), weights.grad, **TOL)


@pytest.mark.parametrize("n, d, config", [
    (1000, 12, TTConfig(ranks=3, num_cores=2, seed=0)),
    (1000, 16, TTConfig(ranks=(3, 5), num_cores=3, seed=0)),
    (5000, 24, TTConfig(ranks=4, num_cores=4, seed=0)),
    (40_000_000, 128, TTConfig(ranks=16, seed=0)),
    (1000, 128, TTConfig(ranks=32, seed=0)),
])
def test_tt_rows_match_reference(n: int, d: int, config: TTConfig) -> None:
    table = EmbeddingBagConfig(name="t", embedding_dim=d, num_embeddings=n, feature_names=["f"])
    memory = CompressedEmbeddingBagCollection([table], {"t": config}).memory_for("t")
    ids = bags(n, seed=d, lengths=[5])[0]
    ids[1] = 0
    expected = memory.rows(ids).detach()
    out = tt_rows(on_device(*memory.cores), ids.to(DEVICE))
    torch.testing.assert_close(out.cpu(), expected, **TOL)
    assert tt_rows(on_device(*memory.cores), ids[:0].to(DEVICE)).shape == (0, d)


@pytest.mark.parametrize("n, d, config", [
    (1000, 12, TTConfig(ranks=3, num_cores=2, seed=0)),
    (1000, 16, TTConfig(ranks=(3, 5), num_cores=3, seed=0)),
    (5000, 24, TTConfig(ranks=4, num_cores=4, seed=0)),
    (40_000, 128, TTConfig(ranks=16, seed=0)),
    (1000, 64, TTConfig(ranks=32, seed=0)),
])
def test_tt_rows_backward_matches_autograd(n: int, d: int, config: TTConfig) -> None:
    """Core gradients against autograd of the reference chain of products, with a repeated id (its slices'
    gradients add up) and the last id; rank 32 sums a slice's columns over several tiles."""
    table = EmbeddingBagConfig(name="t", embedding_dim=d, num_embeddings=n, feature_names=["f"])
    memory = CompressedEmbeddingBagCollection([table], {"t": config}).memory_for("t")
    ids = bags(n, seed=d, lengths=[6])[0]
    ids[2] = ids[4]
    cores = [core.detach().clone().requires_grad_(True) for core in memory.cores]
    grad_out = torch.randn(ids.numel(), d, generator=torch.Generator().manual_seed(d))
    tt_reference.rows(cores, ids).backward(grad_out)
    grads = tt_rows_backward(on_device(grad_out)[0], on_device(*memory.cores), ids.to(DEVICE))
    for grad, core in zip(grads, cores, strict=True):
        torch.testing.assert_close(grad.cpu(), core.grad, **TOL)
    empty = tt_rows_backward(on_device(grad_out[:0])[0], on_device(*memory.cores), ids[:0].to(DEVICE))
    assert all(bool((grad == 0).all()) and grad.shape == core.shape for grad, core in zip(empty, cores, strict=True))


ON_CPU = pytest.mark.skipif(DEVICE != "cpu", reason="a failed device assert would end the CUDA context")


@ON_CPU
@pytest.mark.parametrize("bad, message", [
    (-1, r"qr_pooled: an id is outside \[0, 1050\)"),
    (1050, r"qr_pooled: an id is outside \[0, 1050\)"),
])
def test_qr_kernels_refuse_ids_outside_the_parts(bad: int, message: str) -> None:
    """Direct calls (the module checks first): an id past the parts would read and write past them."""
    parts = [torch.randn(rows, 4) for rows in (7, 150)]
    ids, _, offsets, _ = bags(1050, seed=1)
    out = qr_pooled_forward(parts, ids, offsets, None, 7, "mult", False)
    torch.testing.assert_close(out, qr_reference.pooled_forward(parts, ids, offsets, None, 7, "mult", False), **TOL)
    ids[3] = bad
    grad_out = torch.ones(out.shape)
    with pytest.raises(RuntimeError, match=message):
        qr_pooled_forward(parts, ids, offsets, None, 7, "mult", False)
    with pytest.raises(RuntimeError, match=message.replace("qr_pooled", "qr_pooled_backward")):
        qr_pooled_backward(grad_out, parts, ids, offsets, None, 7, "mult", False)
    with pytest.raises(RuntimeError, match=message.replace("qr_pooled", "qr_weights_grad")):
        qr_weights_grad(grad_out, parts, ids, offsets, 7, "mult", False)


@ON_CPU
def test_qr_kernels_check_each_digit_of_parts_shorter_than_the_collisions() -> None:
    """A middle part with fewer rows than the collisions: ids are checked digit by digit, not by one bound."""
    parts = [torch.randn(rows, 4) for rows in (5, 3, 2)]
    offsets = torch.tensor([0, 1])
    good = torch.tensor([1 * 36 + 2 * 6 + 4])
    expected = qr_reference.pooled_forward(parts, good, offsets, None, 6, "add", False)
    torch.testing.assert_close(qr_pooled_forward(parts, good, offsets, None, 6, "add", False), expected, **TOL)
    with pytest.raises(RuntimeError, match=r"qr_pooled: an id has a row outside its part \(rows \[5, 3, 2\]"):
        qr_pooled_forward(parts, torch.tensor([1 * 36 + 3 * 6 + 4]), offsets, None, 6, "add", False)


@ON_CPU
@pytest.mark.parametrize("offsets", [[1, 3, 5], [0, 3, 4], [0, 4, 3, 5], [0, 3, 6]])
def test_qr_kernels_refuse_offsets_that_do_not_cover_the_ids(offsets: list[int]) -> None:
    parts = [torch.randn(rows, 4) for rows in (7, 150)]
    ids = torch.arange(5)
    with pytest.raises(RuntimeError, match=r"qr_pooled: offsets must run from 0 to the number of ids \(5\)"):
        qr_pooled_forward(parts, ids, torch.tensor(offsets), None, 7, "add", True)


@ON_CPU
@pytest.mark.parametrize("offsets", [[1, 3, 5], [0, 3, 4], [0, 4, 3, 5], [0, 3, 1000]])
def test_robe_kernels_refuse_offsets_that_do_not_cover_the_ids(offsets: list[int]) -> None:
    """Offsets past the ids would read beyond them and add the hashed garbage into ``M``: refused, ``M`` unchanged."""
    memory = robe(4, use_sign=True)
    args = robe_args(memory, 4, True, False)
    ids, offsets, grad = torch.arange(5), torch.tensor(offsets), torch.ones(len(offsets) - 1, D)
    before = memory.weight.detach().clone()
    message = r"offsets must run from 0 to the number of ids \(5\)"
    with pytest.raises(RuntimeError, match="robe_pooled: " + message):
        robe_pooled_forward(memory.weight.detach(), ids, offsets, None, **args)
    with pytest.raises(RuntimeError, match="robe backward: " + message):
        robe_pooled_backward(grad, ids, offsets, None, memory_size=97, **args)
    with pytest.raises(RuntimeError, match="robe backward: " + message):
        robe_sgd_update_(memory.weight.detach(), grad, ids, offsets, None, lr=0.1, **args)
    with pytest.raises(RuntimeError, match="robe_weights_grad: " + message):
        robe_weights_grad(grad, memory.weight.detach(), ids, offsets, **args)
    assert torch.equal(memory.weight.detach(), before)


@ON_CPU
def test_robe_kernels_refuse_an_empty_memory_and_bad_coefficients() -> None:
    memory = robe(4, use_sign=True)
    args = robe_args(memory, 4, True, False)
    ids, offsets = torch.arange(5), torch.tensor([0, 2, 5])
    with pytest.raises(ValueError, match=r"robe_pooled: the memory must hold 1 to 2\^31 - 1 elements, got 0"):
        robe_pooled_forward(torch.zeros(0), ids, offsets, None, **args)
    with pytest.raises(ValueError, match=r"robe_pooled: coefficients must be \[2, 4\] int64, got \(1, 4\)"):
        robe_pooled_forward(memory.weight.detach(), ids, offsets, None, **{**args, "coefficients": args["coefficients"][:1]})


@ON_CPU
@pytest.mark.parametrize("bad", [-1, 1000])
def test_tt_kernels_refuse_ids_outside_the_cores(bad: int) -> None:
    table = EmbeddingBagConfig(name="t", embedding_dim=12, num_embeddings=1000, feature_names=["f"])
    memory = CompressedEmbeddingBagCollection([table], {"t": TTConfig(ranks=3, num_cores=2, seed=0)}).memory_for("t")
    cores = [core.detach() for core in memory.cores]
    limit = memory.cores[0].shape[0] * memory.cores[1].shape[0]
    ids = torch.tensor([0, limit - 1])
    torch.testing.assert_close(tt_rows(cores, ids), tt_reference.rows(cores, ids), **TOL)
    ids = torch.tensor([0, limit if bad > 0 else bad])
    with pytest.raises(RuntimeError, match=rf"tt_rows: an id is outside \[0, {limit}\)"):
        tt_rows(cores, ids)
    with pytest.raises(RuntimeError, match=rf"tt_rows_backward: an id is outside \[0, {limit}\)"):
        tt_rows_backward(torch.ones(2, 12), cores, ids)


@pytest.mark.parametrize("scaled", [False, True])
def test_tt_pooled_cuda_kernels_match_reference(scaled: bool) -> None:
    """``tt_pooled`` / ``tt_pooled_backward`` on CUDA (the Triton rows pooled by torch ops) against the reference,
    with an empty bag and a repeated id."""
    table = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=1000, feature_names=["f"])
    memory = CompressedEmbeddingBagCollection([table], {"t": TTConfig(ranks=(3, 5), num_cores=3, seed=0)}
                                              ).memory_for("t")
    ids, _, offsets, scales = bags(1000, seed=7)
    ids[3] = ids[5]
    scales = scales if scaled else None
    cores = [core.detach() for core in memory.cores]
    out = tt_ops._pooled_cuda(tt_triton, on_device(*cores), *on_device(ids, offsets, scales))
    torch.testing.assert_close(out.cpu(), tt_reference.pooled(cores, ids, offsets, scales), **TOL)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    grads = tt_ops._pooled_backward_cuda(tt_triton, on_device(grad_out)[0], on_device(*cores),
                                         *on_device(ids, offsets, scales))
    for grad, want in zip(grads, tt_reference.pooled_backward(grad_out, cores, ids, offsets, scales), strict=True):
        torch.testing.assert_close(grad.cpu(), want, **TOL)
