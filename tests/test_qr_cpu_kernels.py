"""QR C++ CPU kernels against the pure-torch reference (``plugins/qr/reference.py``), an independent autograd
computation (Python-integer digits, index + compose + pool in float64) and the ``QRMemory`` training step with
``TORCHREC_PSS_KERNELS=reference``."""

from __future__ import annotations

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec_pss_plugins.qr import QRConfig, QRMemory, ops, reference
from torchrec_pss_plugins.qr.cpu_kernels import load

KERNELS = load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the QR C++ extension could not be built here")

LENGTHS = torch.tensor([0, 3, 1, 5, 0, 2, 4])  # two empty bags


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def make_parts(operation: str, k: int, collisions: int, last_rows: int, seed: int) -> list[torch.Tensor]:
    """``k`` float32 part tables: ``collisions`` rows each, ``last_rows`` for the quotient part."""
    generator = torch.Generator().manual_seed(seed)
    width = 4 if operation == "concat" else 8
    return [torch.randn(collisions if j < k - 1 else last_rows, width, generator=generator) for j in range(k)]


def python_digits(ids: torch.Tensor, collisions: int, k: int) -> list[torch.Tensor]:
    """Each part's row of every id, with Python's arbitrary-precision floor division."""
    values = ids.tolist()
    rows = [[(x // collisions**j) % collisions for x in values] for j in range(k - 1)]
    return [torch.tensor(r, dtype=torch.int64) for r in rows + [[x // collisions ** (k - 1) for x in values]]]


def independent(parts: list[torch.Tensor], ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
                collisions: int, operation: str, mean: bool, grad_out: torch.Tensor) -> tuple:
    """``(pooled, part grads, weights grad)`` by float64 autograd of index + compose + pool, bag by bag."""
    leaves = [p.double().requires_grad_(True) for p in parts]
    w = None if weights is None else weights.double().requires_grad_(True)
    rows = [leaf[digit] for leaf, digit in zip(leaves, python_digits(ids, collisions, len(parts)))]
    if operation == "concat":
        composed = torch.cat(rows, dim=1)
    else:
        composed = rows[0]
        for row in rows[1:]:
            composed = composed * row if operation == "mult" else composed + row
    if w is not None:
        composed = composed * w.unsqueeze(1)
    bags, first = [], 0
    for length in lengths.tolist():
        bag = composed[first:first + length].sum(0) if length else composed.new_zeros(composed.shape[1])
        bags.append(bag / length if mean and length else bag)
        first += length
    pooled = torch.stack(bags) if bags else composed.new_zeros(0, composed.shape[1])
    grads = torch.autograd.grad(pooled, leaves + ([] if w is None else [w]), grad_out.double(), allow_unused=True)
    return pooled.detach(), list(grads[:len(parts)]), None if w is None else grads[-1]


def batch(seed: int, k: int, collisions: int, last_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, weights)`` for ``LENGTHS``, ids covering every valid row, weights in ``[-2, 2)``."""
    generator = torch.Generator().manual_seed(seed)
    num = int(LENGTHS.sum())
    ids = torch.randint(0, collisions ** (k - 1) * last_rows, (num,), generator=generator)
    return ids, torch.rand(num, generator=generator) * 4 - 2


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=1e-5)


CASES = [(op, k, weighted, mean) for op in ("mult", "add", "concat") for k in (2, 3) for weighted in (False, True)
         for mean in (False, True)]


@pytest.mark.parametrize("operation,k,weighted,mean", CASES)
def test_kernels_match_reference_and_autograd(operation: str, k: int, weighted: bool, mean: bool) -> None:
    collisions, last_rows = 5, 7
    parts = make_parts(operation, k, collisions, last_rows, seed=k)
    ids, weights = batch(k + 10 * weighted, k, collisions, last_rows)
    weights = weights if weighted else None
    offsets = offsets_of(LENGTHS)
    grad_out = torch.randn(LENGTHS.numel(), parts[0].shape[1] * (k if operation == "concat" else 1),
                           generator=torch.Generator().manual_seed(1))
    expected, part_grads, weights_grad = independent(parts, ids, LENGTHS, weights, collisions, operation, mean,
                                                     grad_out)
    args = (ids, offsets, weights, collisions, operation, mean)
    out = KERNELS.qr_pooled_forward(parts, *args)
    close(out, reference.pooled_forward(parts, *args))
    close(out, expected)
    assert torch.all(out[0] == 0) and torch.all(out[4] == 0), "empty bags pool to zeros"
    grads = KERNELS.qr_pooled_backward(grad_out, parts, *args)
    assert [g.shape for g in grads] == [p.shape for p in parts]
    for got, ref, auto in zip(grads, reference.pooled_backward(grad_out, parts, *args), part_grads):
        close(got, ref)
        close(got, auto)
    got = KERNELS.qr_weights_grad(grad_out, parts, ids, offsets, collisions, operation, mean)
    close(got, reference.weights_grad(grad_out, parts, ids, offsets, collisions, operation, mean))
    if weights is not None:
        close(got, weights_grad)
    all_rows, all_values = KERNELS.qr_grad_rows(grad_out, parts, *args)
    ref_rows, ref_values = reference.grad_rows(grad_out, parts, *args)
    assert len(all_rows) == len(all_values) == k
    for j, (part, auto, rows, values) in enumerate(zip(parts, part_grads, all_rows, all_values, strict=True)):
        assert torch.equal(rows, ref_rows[j]) and torch.equal(rows, python_digits(ids, collisions, k)[j].unique())
        close(values, ref_values[j])
        close(torch.zeros_like(part).index_copy_(0, rows, values), auto)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_empty_batches(operation: str) -> None:
    parts = make_parts(operation, 2, 5, 7, seed=0)
    d = parts[0].shape[1] * (2 if operation == "concat" else 1)
    empty = torch.zeros(0, dtype=torch.int64)
    for num_bags in (0, 3):  # no bags; bags without ids
        offsets = torch.zeros(num_bags + 1, dtype=torch.int64)
        out = KERNELS.qr_pooled_forward(parts, empty, offsets, None, 5, operation, True)
        assert out.shape == (num_bags, d) and not out.any()
        grads = KERNELS.qr_pooled_backward(torch.ones(num_bags, d), parts, empty, offsets, torch.zeros(0), 5,
                                           operation, False)
        assert [g.shape for g in grads] == [p.shape for p in parts] and not any(g.any() for g in grads)
        weights_grad = KERNELS.qr_weights_grad(torch.ones(num_bags, d), parts, empty, offsets, 5, operation, False)
        assert weights_grad.shape == (0,)


def row_index_parts(k: int, collisions: int, last_rows: int) -> list[torch.Tensor]:
    """Width-1 parts whose row r holds r (exact in float32 below 2^24): concat pools to the digits themselves."""
    return [torch.arange(collisions if j < k - 1 else last_rows, dtype=torch.float32).unsqueeze(1) for j in range(k)]


@pytest.mark.parametrize("k,collisions,last_rows,ids", [
    # a 21-bit c: ids up to about 2^61 (hardware division) and below 2^32 (multiply)
    (3, 2**21 + 17, 2**19, [0, 1, 2**21 + 16, 2**21 + 17, 2**32 - 1, 2**32, (2**21 + 17) ** 2 * (2**19 - 1) - 1,
                            (2**21 + 17) ** 2 * 123_457 + (2**21 + 17) * 99 + 5, 2**61 + 2**40 + 3]),
    # ids around 2^32, where the first division switches from the multiply to the hardware division
    (4, 257, 300, [2**32 - 2, 2**32 - 1, 2**32, 2**32 + 1, 257**3 * 300 - 1, 257**3 - 1, 257**3, 256, 257]),
    # ids just below and above each power of c
    (3, 3, 5, [0, 2, 3, 8, 9, 26, 44]),
])
def test_digits_are_exact_for_large_ids(k: int, collisions: int, last_rows: int, ids: list[int]) -> None:
    parts = row_index_parts(k, collisions, last_rows)
    ids_t = torch.tensor(ids, dtype=torch.int64)
    out = KERNELS.qr_pooled_forward(parts, ids_t, torch.arange(len(ids) + 1), None, collisions, "concat", False)
    expected = torch.stack(python_digits(ids_t, collisions, k), dim=1).to(torch.float32)
    assert torch.equal(out, expected)
    assert torch.equal(out, torch.stack(reference.digits(ids_t, collisions, k), dim=1).to(torch.float32))
    grads = KERNELS.qr_pooled_backward(torch.ones(len(ids), k), parts, ids_t, torch.arange(len(ids) + 1), None,
                                       collisions, "concat", False)
    for grad, digit in zip(grads, python_digits(ids_t, collisions, k)):
        assert torch.equal(grad.squeeze(1), torch.zeros(grad.shape[0]).index_add_(0, digit, torch.ones(len(ids))))


@pytest.mark.parametrize("k,collisions,last_rows,lengths,num_bags", [
    (2, 13, 5000, 40, 600),   # small remainder part (per-thread buffers), large quotient part (row ranges)
    (3, 4000, 50, 40, 600),   # two large remainder parts (two row-range passes), small quotient part
    (2, 5, 7, 40, 600),       # every part small: one pass over ids
    (2, 400, 400, 1, 2400),   # few ids per row: every part by row ranges
])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_threaded_scatter_loses_no_update(k: int, collisions: int, last_rows: int, lengths: int, num_bags: int,
                                          threads: int) -> None:
    """Many ids hitting a few rows, with several threads' ranges and buffers: equals the float64 reference."""
    generator = torch.Generator().manual_seed(threads)
    width = 16
    parts = [torch.randn(collisions if j < k - 1 else last_rows, width, generator=generator) for j in range(k)]
    lengths_t = torch.randint(0, 2 * lengths, (num_bags,), generator=generator)
    hot = torch.randint(0, collisions ** (k - 1) * last_rows, (30,), generator=generator)
    ids = hot[torch.randint(0, 30, (int(lengths_t.sum()),), generator=generator)]
    ids[::7] = torch.randint(0, collisions ** (k - 1) * last_rows, ids[::7].shape, generator=generator)
    weights = torch.rand(ids.numel(), generator=generator)
    offsets = offsets_of(lengths_t)
    grad_out = torch.randn(num_bags, width, generator=generator)
    expected = reference.pooled_backward(grad_out.double(), [p.double() for p in parts], ids, offsets,
                                         weights.double(), collisions, "mult", True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = KERNELS.qr_pooled_backward(grad_out, parts, ids, offsets, weights, collisions, "mult", True)
        out = KERNELS.qr_pooled_forward(parts, ids, offsets, weights, collisions, "mult", True)
    finally:
        torch.set_num_threads(previous)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4)
    torch.set_num_threads(threads)
    try:
        all_rows, all_values = KERNELS.qr_grad_rows(grad_out, parts, ids, offsets, weights, collisions, "mult", True)
    finally:
        torch.set_num_threads(previous)
    for rows, values, e in zip(all_rows, all_values, expected, strict=True):
        torch.testing.assert_close(values.double(), e[rows], rtol=1e-4, atol=1e-4)
        assert torch.count_nonzero(e.abs().sum(1)) <= rows.numel()
    expected_out = reference.pooled_forward([p.double() for p in parts], ids, offsets, weights.double(), collisions,
                                            "mult", True)
    torch.testing.assert_close(out.double(), expected_out, rtol=1e-5, atol=1e-5)


def test_bad_inputs_are_rejected_with_clear_messages() -> None:
    parts = make_parts("mult", 2, 5, 7, seed=0)
    ids, offsets = torch.tensor([0, 34]), torch.tensor([0, 1, 2])
    with pytest.raises(RuntimeError, match=r"ids\[1\] = 35 is out of range .* part 1: row 7 of 7"):
        KERNELS.qr_pooled_forward(parts, torch.tensor([0, 35]), offsets, None, 5, "mult", False)
    with pytest.raises(RuntimeError, match=r"ids\[0\] = -1 is out of range"):
        KERNELS.qr_pooled_backward(torch.ones(2, 8), parts, torch.tensor([-1, 0]), offsets, None, 5, "mult", False)
    with pytest.raises(RuntimeError, match="operation must be 'mult', 'add' or 'concat'"):
        KERNELS.qr_pooled_forward(parts, ids, offsets, None, 5, "max", False)
    with pytest.raises(RuntimeError, match="offsets must run from 0 to the number of ids"):
        KERNELS.qr_pooled_forward(parts, ids, offsets[:-1], None, 5, "mult", False)
    with pytest.raises(RuntimeError, match="offsets must be non-decreasing"):
        KERNELS.qr_pooled_forward(parts, ids, torch.tensor([0, 2, 1, 2]), None, 5, "mult", False)
    with pytest.raises(RuntimeError, match=r"grad_out must be \[B, d\] = \[2, 8\]"):
        KERNELS.qr_pooled_backward(torch.ones(2, 4), parts, ids, offsets, None, 5, "mult", False)
    with pytest.raises(RuntimeError, match="one positive width"):
        KERNELS.qr_pooled_forward([parts[0], parts[1][:, :4]], ids, offsets, None, 5, "mult", False)
    with pytest.raises(RuntimeError, match="at least 2 part tables"):
        KERNELS.qr_pooled_forward(parts[:1], ids, offsets, None, 5, "mult", False)
    with pytest.raises(RuntimeError, match="float32 CPU tensor"):
        KERNELS.qr_pooled_forward([p.double() for p in parts], ids, offsets, None, 5, "mult", False)
    with pytest.raises(RuntimeError, match="one entry per id"):
        KERNELS.qr_pooled_forward(parts, ids, offsets, torch.ones(3), 5, "mult", False)
    for kernel in (KERNELS.qr_pooled_forward, lambda *args: KERNELS.qr_grad_rows(torch.ones(2, 8), *args)):
        with pytest.raises(RuntimeError, match=r"weights must be a 1-D CPU tensor \[N\] .* got \[2, 1\]"):
            kernel(parts, ids, offsets, torch.ones(2, 1), 5, "mult", False)
    with pytest.raises(RuntimeError, match="part 0 is \\[5\\]") as error:
        KERNELS.qr_pooled_forward([parts[0][:, 0], parts[1]], ids, offsets, None, 5, "mult", False)
    assert str(error.value).count("part 0") == 1
    with pytest.raises(RuntimeError, match="collisions must be positive"):
        KERNELS.qr_pooled_forward(parts, ids, offsets, None, 0, "mult", False)


def test_non_contiguous_inputs() -> None:
    parts = make_parts("mult", 2, 5, 7, seed=3)
    ids, offsets = torch.tensor([3, 30, 17, 4]), torch.tensor([0, 1, 4])
    grad_out = torch.ones(1, 8).expand(2, 8)  # what .sum().backward() passes
    transposed = [p.t().contiguous().t() for p in parts]
    for got, expected in zip(KERNELS.qr_pooled_backward(grad_out, transposed, ids, offsets, None, 5, "mult", False),
                             reference.pooled_backward(grad_out, parts, ids, offsets, None, 5, "mult", False)):
        close(got, expected)
    close(KERNELS.qr_pooled_forward(transposed, ids.int(), offsets.int(), None, 5, "mult", False),
          reference.pooled_forward(parts, ids, offsets, None, 5, "mult", False))


def test_ops_dispatch_to_the_kernels_and_fall_back(monkeypatch: pytest.MonkeyPatch) -> None:
    parts = make_parts("add", 2, 5, 7, seed=4)
    bad, offsets = torch.tensor([-3]), torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="is out of range for the part tables"):  # the kernel's own message
        ops.qr_pooled(parts, bad, offsets, None, 5, "add", False, [False, False])
    ids = torch.tensor([1, 34, 12])
    offsets = torch.tensor([0, 2, 3])
    doubles = [p.double() for p in parts]  # not float32: the reference
    close(ops.qr_pooled(doubles, ids, offsets, None, 5, "add", False, [False, False]),
          reference.pooled_forward(doubles, ids, offsets, None, 5, "add", False))
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", "reference")
    with pytest.raises((IndexError, RuntimeError), match="out of range in self"):
        ops.qr_pooled(parts, bad, torch.tensor([0, 1]), None, 5, "add", False, [False, False])


def test_weights_grad_and_grad_rows_op_check() -> None:
    parts = make_parts("mult", 3, 5, 7, seed=5)
    ids, weights = batch(5, 3, 5, 7)
    grad_out = torch.randn(LENGTHS.numel(), 8)
    torch.library.opcheck(ops.qr_weights_grad, (grad_out, parts, ids, offsets_of(LENGTHS), 5, "mult", True))
    torch.library.opcheck(ops.qr_grad_rows, (grad_out, parts, ids, offsets_of(LENGTHS), weights, 5, "mult", True))


@pytest.mark.parametrize("sparse_grads", [[True, True], [True, False], [False, True]])
@pytest.mark.parametrize("operation", ["mult", "concat"])
def test_sparse_and_mixed_part_gradients_match_the_reference(operation: str, sparse_grads: list[bool]) -> None:
    parts = [p.requires_grad_(True) for p in make_parts(operation, 2, 5, 7, seed=6)]
    ids, weights = batch(6, 2, 5, 7)
    offsets = offsets_of(LENGTHS)
    pooled = ops.qr_pooled(parts, ids, offsets, weights, 5, operation, True, sparse_grads)
    grad_out = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(2))
    pooled.backward(grad_out)
    expected = reference.pooled_backward(grad_out, [p.detach() for p in parts], ids, offsets, weights, 5, operation,
                                         True, sparse_grads)
    for part, sparse, want in zip(parts, sparse_grads, expected):
        assert part.grad.is_sparse == sparse
        if sparse:
            got = part.grad.coalesce()  # AccumulateGrad keeps indices and values but drops the coalesced flag
            assert torch.equal(got.indices(), want.indices())
            close(got.values(), want.values())
        else:
            close(part.grad, want)


def training_step(monkeypatch: pytest.MonkeyPatch, kernels: str, operation: str, k: int, mean: bool,
                  gradient: str) -> list:
    """Parts after one SGD step of ``QRMemory`` on a fixed batch, with weights that need a gradient too."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    torch.manual_seed(0)
    table = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=5000, feature_names=["f"])
    memory = QRMemory(QRConfig(collisions=23, operation=operation, num_partitions=k, gradient=gradient), [table])
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(0, 12, (64,), generator=generator)
    ids = torch.randint(0, 5000, (int(lengths.sum()),), generator=generator)
    weights = torch.rand(ids.numel(), generator=generator).requires_grad_(True)
    optimizer = torch.optim.SGD(list(memory.parameters()) + [weights], lr=0.5)
    pooled = memory.pooled("t", ids, lengths, weights, mean)
    loss = (pooled * torch.randn(pooled.shape, generator=generator)).sum() + pooled.pow(2).sum()
    loss.backward()
    optimizer.step()
    return [p.detach().clone() for p in memory.parts] + [weights.detach().clone(), pooled.detach()]


@pytest.mark.parametrize("operation,k,mean", [("mult", 2, False), ("add", 3, True), ("concat", 2, True),
                                              ("mult", 3, True)])
@pytest.mark.parametrize("gradient", ["dense", "sparse"])
def test_qr_memory_training_step_matches_reference(monkeypatch: pytest.MonkeyPatch, operation: str, k: int,
                                                   mean: bool, gradient: str) -> None:
    fast = training_step(monkeypatch, "fast", operation, k, mean, gradient)
    slow = training_step(monkeypatch, "reference", operation, k, mean, gradient)
    for got, expected in zip(fast, slow):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("operation", ["mult", "concat"])
@pytest.mark.parametrize("layout", ["expanded", "column_slice", "transposed"])
def test_strided_gradients_are_read_in_place(operation: str, layout: str) -> None:
    """The backward, grad-rows and weights-gradient kernels give with a strided ``grad_out`` what they give with
    its contiguous copy: a ``sum``'s expanded gradient (row stride 0), a column slice, a transposed gradient."""
    k, collisions, last_rows = 3, 5, 7
    parts = make_parts(operation, k, collisions, last_rows, seed=4)
    ids, weights = batch(11, k, collisions, last_rows)
    d = parts[0].shape[1] * (k if operation == "concat" else 1)
    wide = torch.randn(LENGTHS.numel(), 2 * d, generator=torch.Generator().manual_seed(5))
    grad = {"expanded": torch.full((1, 1), 0.5).expand(LENGTHS.numel(), d), "column_slice": wide[:, d:],
            "transposed": wide[:, :d].t().contiguous().t()}[layout]
    assert not grad.is_contiguous()
    args = (ids, offsets_of(LENGTHS), weights, collisions, operation, True)
    for call in (lambda g: KERNELS.qr_pooled_backward(g, parts, *args),
                 lambda g: KERNELS.qr_grad_rows(g, parts, *args),
                 lambda g: KERNELS.qr_weights_grad(g, parts, ids, args[1], collisions, operation, True)):
        torch.testing.assert_close(call(grad), call(grad.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("threads", [1, 2])
def test_grad_rows_of_a_large_part_read_by_few_ids(threads: int) -> None:
    """A quotient part of 200k rows read by 16 ids (duplicates among them): the rows are grouped by sorting the
    ids, not by a slot per row of the part (a call cost O(rows): 58 ms at 10M rows for 100 ids); equal to the
    reference."""
    collisions, last_rows = 7, 200_000
    parts = make_parts("mult", 2, collisions, last_rows, seed=5)
    ids = torch.tensor([5, 1_399_999, 70, 5, 3, 700_000, 1_399_999, 12, 13, 14, 99, 1000, 5, 6, 7, 8])
    lengths = torch.tensor([3, 0, 5, 8])
    weights = torch.rand(ids.numel(), generator=torch.Generator().manual_seed(0))
    grad_out = torch.randn(lengths.numel(), 8, generator=torch.Generator().manual_seed(1))
    args = (ids, offsets_of(lengths), weights, collisions, "mult", True)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        all_rows, all_values = KERNELS.qr_grad_rows(grad_out, parts, *args)
    finally:
        torch.set_num_threads(previous)
    ref_rows, ref_values = reference.grad_rows(grad_out, parts, *args)
    for j, (rows, values) in enumerate(zip(all_rows, all_values, strict=True)):
        assert torch.equal(rows, ref_rows[j]) and torch.equal(rows, python_digits(ids, collisions, 2)[j].unique())
        close(values, ref_values[j])
