"""TT C++ CPU kernels: rows and core gradients against ``reference.rows`` + autograd and against an independent
float64 contraction (einsum of the slices), the ``tt_rows`` / ``tt_rows_backward`` custom ops (opcheck) and a
``TTMemory`` training step against the same step with ``TORCHREC_PSS_KERNELS=reference``."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss_plugins.tt import TTConfig, TTMemory, ops, reference
from torchrec_pss_plugins.tt.cpu_kernels import load

KERNELS = load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the TT C++ extension could not be built here")

# (p, q, inner ranks): N = 2, 3, 4 cores, ranks 1 and > 1, d with every column tail of the GEMM tiles
# (16, 8, 4, 1 wide), ranks wider than d, and a rank-1 core beside wide ones.
SHAPES = [
    ((7, 9), (3, 5), (1,)),
    ((7, 9), (4, 4), (6,)),
    ((4, 5, 3), (2, 2, 2), (1, 1)),
    ((4, 5, 3), (2, 3, 2), (3, 5)),
    ((3, 4, 5), (3, 5, 7), (16, 9)),
    ((2, 3, 2), (2, 2, 2), (17, 16)),
    ((3, 4, 5, 2), (2, 3, 1, 2), (5, 1, 4)),
    ((3, 2, 4, 3), (2, 2, 2, 2), (4, 6, 5)),
]


def make_cores(p: tuple[int, ...], q: tuple[int, ...], inner: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    """float32 cores ``[p_k, R_{k-1}, q_k, R_k]`` with ``R = (1, *inner, 1)``."""
    generator = torch.Generator().manual_seed(seed)
    ranks = (1, *inner, 1)
    return [torch.randn(p[k], ranks[k], q[k], ranks[k + 1], generator=generator) for k in range(len(p))]


def make_ids(p: tuple[int, ...], count: int, seed: int = 1) -> torch.Tensor:
    """``count`` random ids in ``[0, ∏ p)``, then duplicates and both ends of the range."""
    high = math.prod(p)
    ids = torch.randint(0, high, (count,), generator=torch.Generator().manual_seed(seed))
    return torch.cat([ids, ids[:3], torch.tensor([0, high - 1, high - 1])])


def float64_rows(cores: list[torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows ``[U, d]``: the slices ``core_k[i_k]`` (digits by Python integer arithmetic) chained by einsum."""
    digits = []
    for x in ids.tolist():
        digit = []
        for core in reversed(cores[1:]):
            x, i = divmod(x, core.shape[0])
            digit.append(i)
        digits.append([x, *reversed(digit)])
    index = torch.tensor(digits, dtype=torch.int64).reshape(len(digits), len(cores))
    chain = cores[0][index[:, 0], 0]  # [U, q_1, R_1]
    for k, core in enumerate(cores[1:], start=1):
        chain = torch.einsum("uar,urbs->uabs", chain, core[index[:, k]]).flatten(1, 2)
    return chain.flatten(1)


def expected(cores: list[torch.Tensor], ids: torch.Tensor, grad: torch.Tensor,
             rows: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``rows(cores, ids)`` and the cores' gradients for ``grad`` by autograd."""
    leaves = [core.clone().requires_grad_(True) for core in cores]
    out = rows(leaves, ids)
    return out.detach(), list(torch.autograd.grad(out, leaves, grad))


def check(cores: list[torch.Tensor], ids: torch.Tensor) -> None:
    """The kernels' rows and gradients equal the float32 reference's and, to float32 accuracy, float64's."""
    out = KERNELS.tt_rows_forward(cores, ids)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = KERNELS.tt_rows_backward(grad, cores, ids)
    want_out, want_grads = expected(cores, ids, grad, reference.rows)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert len(grads) == len(cores)
    for got, want, core in zip(grads, want_grads, cores):
        assert got.shape == core.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())  # sums in other orders
    exact_out, exact_grads = expected([c.double() for c in cores], ids, grad.double(), float64_rows)
    torch.testing.assert_close(out.double(), exact_out, rtol=1e-5, atol=1e-5 * exact_out.abs().max().item())
    for got, want in zip(grads, exact_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for got, want in zip(reference.rows_backward(grad.double(), [c.double() for c in cores], ids), exact_grads):
        torch.testing.assert_close(got, want)  # the op's default (reference) kernel, in float64


@pytest.mark.parametrize("p, q, inner", SHAPES)
def test_rows_and_gradients(p: tuple[int, ...], q: tuple[int, ...], inner: tuple[int, ...]) -> None:
    cores, ids = make_cores(p, q, inner), make_ids(p, 40)
    check(cores, ids)
    check(cores, ids.sort().values)  # sorted (as TTMemory passes them): no reordering in the kernels


def test_many_ids_on_every_thread_count() -> None:
    """Enough ids for one gradient buffer per thread (summed after the scatter), with 1, 2 and 5 threads; many
    ids share prefixes (their left products and summed gradients) across the threads' chunks."""
    p = (6, 7, 5)
    cores, ids = make_cores(p, (2, 4, 2), (8, 6), seed=3), make_ids(p, 3000)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            check(cores, ids)
    finally:
        torch.set_num_threads(threads)


def test_large_ids_within_range() -> None:
    p = (5, 40_000, 40_000)  # 8e9 rows: ids past 2^32
    cores = make_cores(p, (2, 2, 2), (2, 3))
    ids = torch.tensor([0, 2**32 + 7, 8_000_000_000 - 1, 7_999_960_001, 39_999, 40_000, 7_000_000_000])
    check(cores, ids)


def test_no_ids() -> None:
    cores = make_cores((4, 5, 3), (2, 3, 2), (3, 5))
    ids = torch.empty(0, dtype=torch.int64)
    assert KERNELS.tt_rows_forward(cores, ids).shape == (0, 12)
    for grads in (KERNELS.tt_rows_backward(torch.empty(0, 12), cores, ids),
                  reference.rows_backward(torch.empty(0, 12), cores, ids)):
        assert all(g.shape == c.shape and not g.any() for g, c in zip(grads, cores))


def make_bags(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets ``[B + 1]`` of bags of 0..6 ids covering ``count`` ids (empty bags included), and float32 scales."""
    generator = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < count:
        lengths.append(min(int(torch.randint(0, 7, (1,), generator=generator)), count - sum(lengths)))
    offsets = torch.tensor([0, 0, *torch.tensor(lengths).cumsum(0).tolist()])  # the first bag is empty
    return offsets, torch.randn(count, generator=generator)


def check_pooled(cores: list[torch.Tensor], ids: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor | None) -> None:
    """The pooled kernels against the float64 pooling of float64 einsum rows and its autograd gradients."""
    out = KERNELS.tt_pooled_forward(cores, ids, offsets, scales)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    grads = KERNELS.tt_pooled_backward(grad, cores, ids, offsets, scales)
    leaves = [core.double().requires_grad_(True) for core in cores]
    want = reference.pooled(leaves, ids, offsets, None if scales is None else scales.double(), float64_rows)
    want_grads = torch.autograd.grad(want, leaves, grad.double())
    scale = want.abs().max().item()
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5 * scale)
    assert not out[0].any(), "an empty bag pools to zeros"
    for got, expect, core in zip(grads, want_grads, cores):
        assert got.shape == core.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expect, rtol=1e-5, atol=1e-5 * expect.abs().max().item())


@pytest.mark.parametrize("p, q, inner", SHAPES)
@pytest.mark.parametrize("scaled", [False, True])
def test_pooled_rows_and_gradients(p: tuple[int, ...], q: tuple[int, ...], inner: tuple[int, ...],
                                   scaled: bool) -> None:
    cores, ids = make_cores(p, q, inner), make_ids(p, 40)  # unsorted, with repeated ids
    offsets, scales = make_bags(ids.numel(), seed=len(p) + len(inner))
    check_pooled(cores, ids, offsets, scales if scaled else None)


def test_pooled_many_ids_on_every_thread_count() -> None:
    """Private [B, d] outputs and gradient buffers per chunk of ids, summed after, with 1, 2 and 5 threads: bags
    get rows from several chunks (ids are visited in sorted order, bags hold random ids)."""
    p = (6, 7, 5)
    cores, ids = make_cores(p, (2, 4, 2), (8, 6), seed=3), make_ids(p, 3000)
    offsets, scales = make_bags(ids.numel(), seed=9)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            check_pooled(cores, ids, offsets, scales)
    finally:
        torch.set_num_threads(threads)


def test_pooled_one_id_per_bag_on_every_thread_count() -> None:
    """About one id per bag (and empty bags): with several threads the rows are contracted into a [U, d] block
    and the bags summed from it; with one thread into the output directly."""
    p = (6, 7, 5)
    cores, ids = make_cores(p, (2, 4, 2), (8, 6), seed=4), make_ids(p, 3000)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.arange(ids.numel() + 1),
                         torch.full((50,), ids.numel())])  # empty bags first and last
    scales = torch.randn(ids.numel(), generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2, 5):
            torch.set_num_threads(count)
            check_pooled(cores, ids, offsets, scales)
            check_pooled(cores, ids, offsets, None)
    finally:
        torch.set_num_threads(threads)


def test_pooled_bags_without_ids() -> None:
    """Three empty bags: zero outputs and zero core gradients, as the reference gives."""
    cores, ids = make_cores((4, 5, 3), (2, 3, 2), (3, 5)), torch.empty(0, dtype=torch.int64)
    offsets = torch.zeros(4, dtype=torch.int64)
    for out in (KERNELS.tt_pooled_forward(cores, ids, offsets, None), reference.pooled(cores, ids, offsets, None)):
        assert out.shape == (3, 12) and not out.any()
    grad = torch.ones(3, 12)
    for grads in (KERNELS.tt_pooled_backward(grad, cores, ids, offsets, None),
                  reference.pooled_backward(grad, cores, ids, offsets, None)):
        assert all(g.shape == c.shape and not g.any() for g, c in zip(grads, cores))


def test_pooled_bad_inputs() -> None:
    cores, ids = make_cores((4, 5, 3), (2, 3, 2), (3, 5)), torch.tensor([1, 2, 3])
    with pytest.raises(RuntimeError, match=r"offsets must run from 0 to the number of ids \(3\), got 0 ... 2"):
        KERNELS.tt_pooled_forward(cores, ids, torch.tensor([0, 1, 2]), None)
    with pytest.raises(RuntimeError, match="one entry per id"):
        KERNELS.tt_pooled_forward(cores, ids, torch.tensor([0, 1, 3]), torch.ones(2))
    with pytest.raises(RuntimeError, match=r"weights must be a 1-D CPU tensor \[N\] .* got \[3, 1\]"):
        KERNELS.tt_pooled_forward(cores, ids, torch.tensor([0, 1, 3]), torch.ones(3, 1))
    with pytest.raises(RuntimeError, match=r"weights must be a 1-D CPU tensor \[N\] .* got \[1, 3\]"):
        KERNELS.tt_pooled_backward(torch.zeros(2, 12), cores, ids, torch.tensor([0, 1, 3]), torch.ones(1, 3))
    with pytest.raises(RuntimeError, match=r"grad must be a CPU tensor \[B, d\] = \[2, 12\]"):
        KERNELS.tt_pooled_backward(torch.zeros(3, 12), cores, ids, torch.tensor([0, 1, 3]), None)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda cores, ids: ([cores[0]], ids), "at least 2 cores"),
        (lambda cores, ids: ([cores[0].double(), *cores[1:]], ids), "float32 CPU"),
        (lambda cores, ids: ([cores[0], cores[1][:, :2].contiguous(), cores[2]], ids), "R_in = 2"),
        (lambda cores, ids: (cores[:2], ids), "last core must have R_out = 1"),
        (lambda cores, ids: (cores, torch.tensor([60])), r"id 60 \(position 0\) is outside \[0, 60\)"),
        (lambda cores, ids: (cores, torch.tensor([3, -1])), "id -1"),
        (lambda cores, ids: (cores, ids.float()), "1-D integer CPU tensor"),
    ],
)
def test_bad_inputs(change: Callable, message: str) -> None:
    cores, ids = change(make_cores((4, 5, 3), (2, 3, 2), (3, 5)), torch.tensor([1, 2]))
    with pytest.raises(RuntimeError, match=message):
        KERNELS.tt_rows_forward(cores, ids)


def test_backward_checks_the_gradient_shape() -> None:
    cores = make_cores((4, 5, 3), (2, 3, 2), (3, 5))
    with pytest.raises(RuntimeError, match=r"grad must be \[U, d\] = \[2, 12\]"):
        KERNELS.tt_rows_backward(torch.zeros(2, 11), cores, torch.tensor([1, 2]))


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_ops(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """opcheck of both ops, and the op's autograd (the C++ backward) against the reference's."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    p = (4, 5, 3)
    cores, ids = make_cores(p, (2, 3, 2), (3, 5)), make_ids(p, 9)
    leaves = [core.clone().requires_grad_(True) for core in cores]
    torch.library.opcheck(ops.tt_rows, (leaves, ids))
    grad = torch.randn(ids.numel(), 12, generator=torch.Generator().manual_seed(4))
    torch.library.opcheck(ops.tt_rows_backward, (grad, cores, ids))
    out = ops.tt_rows(leaves, ids)
    out.backward(grad)
    want_out, want_grads = expected(cores, ids, grad, reference.rows)
    torch.testing.assert_close(out.detach(), want_out, rtol=1e-5, atol=1e-5)
    for leaf, want in zip(leaves, want_grads):
        torch.testing.assert_close(leaf.grad, want, rtol=1e-5, atol=1e-4)
    for got, want in zip(ops.tt_rows_backward(grad, cores, ids), want_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_pooled_ops(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """opcheck of the pooled ops, and their autograd (cores and scales) against autograd through the reference."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    p = (4, 5, 3)
    cores, ids = make_cores(p, (2, 3, 2), (3, 5)), make_ids(p, 9)
    offsets, scales = make_bags(ids.numel(), seed=2)
    leaves = [core.clone().requires_grad_(True) for core in cores]
    scale_leaf = scales.clone().requires_grad_(True)
    torch.library.opcheck(ops.tt_pooled, (leaves, ids, offsets, scale_leaf))
    torch.library.opcheck(ops.tt_pooled, (leaves, ids, offsets, None))
    grad = torch.randn(offsets.numel() - 1, 12, generator=torch.Generator().manual_seed(4))
    torch.library.opcheck(ops.tt_pooled_backward, (grad, cores, ids, offsets, scales))
    ops.tt_pooled(leaves, ids, offsets, scale_leaf).backward(grad)
    want_leaves = [core.clone().requires_grad_(True) for core in cores]
    want_scales = scales.clone().requires_grad_(True)
    reference.pooled(want_leaves, ids, offsets, want_scales).backward(grad)
    for leaf, want in zip([*leaves, scale_leaf], [*want_leaves, want_scales]):
        torch.testing.assert_close(leaf.grad, want.grad, rtol=1e-5, atol=1e-4)


def training_step(monkeypatch: pytest.MonkeyPatch, kernels: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One SGD step of a ``TTMemory`` on pooled bags: the pooled output and the updated cores."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    table = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=5000, feature_names=["f"])
    memory = TTMemory(TTConfig(ranks=(6, 5), seed=0), [table])
    generator = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 5000, (300,), generator=generator)
    lengths = torch.full((30,), 10)
    optimizer = torch.optim.SGD(memory.parameters(), lr=0.5)
    out = memory.pooled("t", ids, lengths, None, False)
    (out * torch.randn(out.shape, generator=generator)).sum().backward()
    optimizer.step()
    return out.detach(), [core.detach().clone() for core in memory.cores]


def test_tt_memory_training_step_equals_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    backward = KERNELS.tt_pooled_backward
    monkeypatch.setattr(KERNELS, "tt_pooled_backward", lambda *args: calls.append(1) or backward(*args))
    out, cores = training_step(monkeypatch, "fast")
    assert calls, "the step must run the C++ backward"
    want_out, want_cores = training_step(monkeypatch, "reference")
    assert len(calls) == 1
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-6)
    for got, want in zip(cores, want_cores):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
