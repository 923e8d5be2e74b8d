"""Property-based tests (hypothesis): the hash, and every op against a naive element-by-element model.

The naive models below follow the formulas of the methods' docstrings with Python integers and loops,
independently of ``plugins/*/reference.py`` and of the kernels the ops dispatch to (C++ on the CPU for
ROBE; the reference for QR and TT on the CPU). Shapes, ids (up to 2^63 - 1), bag layouts, weights and
options are drawn at random.
"""

from __future__ import annotations

import math

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from torchrec_pss.hashing import PRIME, hash_coefficients, universal_hash
from torchrec_pss_plugins.qr import ops as qr_ops
from torchrec_pss_plugins.robe import ops as robe_ops
from torchrec_pss_plugins.tt import ops as tt_ops

MAX_ID = 2**63 - 1
PROFILE = settings(max_examples=40, deadline=None)
ids_st = st.integers(min_value=0, max_value=MAX_ID)


def python_hash(coefficients: list[int], t: int, k: int, c: int, modulus: int) -> int:
    a, b, cc, d = coefficients
    return ((a * t + b * k + cc * c + d) % PRIME) % modulus


@PROFILE
@given(seed=st.integers(0, 2**31), t=st.integers(0, PRIME - 1), keys=st.lists(ids_st, min_size=1, max_size=20),
       c=st.integers(0, 4096), modulus=st.integers(1, PRIME))
def test_hash_is_in_range_deterministic_and_exact_for_huge_ids(seed: int, t: int, keys: list[int], c: int,
                                                               modulus: int) -> None:
    coefficients = hash_coefficients(seed, 1)[0]
    k = torch.tensor(keys, dtype=torch.int64)
    got = universal_hash(coefficients, t, k, c, modulus)
    assert torch.equal(got, universal_hash(hash_coefficients(seed, 1)[0], t, k.clone(), c, modulus))
    assert int(got.min()) >= 0 and int(got.max()) < modulus
    expected = [python_hash(coefficients.tolist(), t, key, c, modulus) for key in keys]
    assert got.tolist() == expected


@st.composite
def bags(draw: st.DrawFn, max_id: int) -> tuple[list[int], list[int], list[float]]:
    """``(ids, offsets, weights)`` of 0-6 bags of 0-5 ids each."""
    lengths = draw(st.lists(st.integers(0, 5), min_size=0, max_size=6))
    ids = draw(st.lists(st.integers(0, max_id), min_size=sum(lengths), max_size=sum(lengths)))
    weights = draw(st.lists(st.floats(-2, 2, allow_nan=False, width=32), min_size=len(ids), max_size=len(ids)))
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return ids, offsets, weights


def naive_robe_layout(coefficients: list[list[int]], t: int, x: int, i: int, dim: int, z: int,
                      m: int) -> tuple[int, float]:
    """Memory position and sign of element ``i`` of id ``x`` (the ROBE-Z recovery formula)."""
    if z <= dim:
        position = (python_hash(coefficients[0], t, x, i // z, m) + i % z) % m
    else:
        per_block = z // dim
        start = (python_hash(coefficients[0], t, x // per_block, 0, m) + (x % per_block) * dim) % m
        position = (start + i) % m
    return position, 1.0 - 2.0 * python_hash(coefficients[1], t, x, i, 2)


def bag_scales(offsets: list[int], weights: list[float] | None, mean: bool) -> list[float]:
    """Each id's factor: its weight, divided by its bag's length for MEAN."""
    scales = []
    for b in range(len(offsets) - 1):
        length = offsets[b + 1] - offsets[b]
        for j in range(offsets[b], offsets[b + 1]):
            scales.append((weights[j] if weights is not None else 1.0) / (length if mean else 1))
    return scales


@PROFILE
@given(data=st.data(), dim=st.integers(1, 12), m=st.integers(1, 97), use_sign=st.booleans(), mean=st.booleans(),
       weighted=st.booleans(), seed=st.integers(0, 1000), t=st.integers(0, PRIME - 1))
def test_robe_ops_match_the_formula(data: st.DataObject, dim: int, m: int, use_sign: bool, mean: bool,
                                    weighted: bool, seed: int, t: int) -> None:
    divisors = [z for z in range(1, dim + 1) if dim % z == 0]
    z = data.draw(st.sampled_from(divisors + [2 * dim, 4 * dim]), label="chunk_size")
    ids, offsets, weights = data.draw(bags(MAX_ID), label="bags")
    weights = weights if weighted else None
    coefficients = hash_coefficients(seed, 2)
    memory = torch.randn(m, generator=torch.Generator().manual_seed(seed))
    grad = torch.randn(len(offsets) - 1, dim, generator=torch.Generator().manual_seed(seed + 1))
    ids_t, offsets_t = torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)
    weights_t = None if weights is None else torch.tensor(weights)

    bag_of = [b for b in range(len(offsets) - 1) for _ in range(offsets[b], offsets[b + 1])]
    scales = bag_scales(offsets, weights, mean)
    expected = torch.zeros(len(offsets) - 1, dim, dtype=torch.float64)
    expected_grad = torch.zeros(m, dtype=torch.float64)
    expected_weights_grad = torch.zeros(len(ids), dtype=torch.float64)
    for j, x in enumerate(ids):
        for i in range(dim):
            position, sign = naive_robe_layout(coefficients.tolist(), t, x, i, dim, z, m)
            sign = sign if use_sign else 1.0
            expected[bag_of[j], i] += scales[j] * sign * float(memory[position])
            expected_grad[position] += scales[j] * sign * float(grad[bag_of[j], i])
            expected_weights_grad[j] += sign * float(memory[position]) * float(grad[bag_of[j], i]) / (
                (offsets[bag_of[j] + 1] - offsets[bag_of[j]]) if mean else 1)

    tol = {"rtol": 1e-5, "atol": 1e-5}
    key = torch.tensor([t])
    out = robe_ops.robe_pooled(memory, ids_t, offsets_t, weights_t, coefficients, key, dim, z, use_sign, mean, False)
    torch.testing.assert_close(out.double(), expected, **tol)
    memory_grad = robe_ops.robe_pooled_backward(grad, ids_t, offsets_t, weights_t, coefficients, key, m, z, use_sign,
                                                mean)
    torch.testing.assert_close(memory_grad.double(), expected_grad, **tol)
    weights_grad = robe_ops.robe_weights_grad(grad, memory, ids_t, offsets_t, coefficients, key, z, use_sign, mean)
    torch.testing.assert_close(weights_grad.double(), expected_weights_grad, **tol)

    updated = memory.clone()
    robe_ops.robe_sgd_update_(updated, grad, ids_t, offsets_t, weights_t, coefficients, key, z, use_sign, mean, 0.1)
    torch.testing.assert_close(updated.double(), memory.double() - 0.1 * expected_grad, **tol)

    block = data.draw(st.sampled_from([1, 2, 5]), label="adagrad block")
    blocks = math.ceil(m / block)
    accumulator = torch.rand(blocks, generator=torch.Generator().manual_seed(seed + 2))
    updated, sums = memory.clone(), accumulator.clone()
    robe_ops.robe_adagrad_update_(updated, sums, grad, ids_t, offsets_t, weights_t, coefficients, key, z, use_sign,
                                  mean, 0.1, 1e-8, block)
    padded = torch.cat([expected_grad, expected_grad.new_zeros(blocks * block - m)]).view(blocks, block)
    expected_sums = accumulator.double() + padded.pow(2).mean(1)
    step = (padded / (expected_sums.sqrt() + 1e-8).unsqueeze(1)).reshape(-1)[:m]
    torch.testing.assert_close(sums.double(), expected_sums, **tol)
    torch.testing.assert_close(updated.double(), memory.double() - 0.1 * step, **tol)


@PROFILE
@given(data=st.data(), collisions=st.integers(2, 6), num_parts=st.integers(2, 3),
       operation=st.sampled_from(["mult", "add", "concat"]), width=st.integers(1, 5), mean=st.booleans(),
       weighted=st.booleans(), seed=st.integers(0, 1000))
def test_qr_ops_match_the_formula(data: st.DataObject, collisions: int, num_parts: int, operation: str, width: int,
                                  mean: bool, weighted: bool, seed: int) -> None:
    last_rows = data.draw(st.integers(1, 6), label="rows of the last part")
    n = collisions ** (num_parts - 1) * last_rows
    ids, offsets, weights = data.draw(bags(n - 1), label="bags")
    weights = weights if weighted else None
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(collisions, width, generator=generator) for _ in range(num_parts - 1)]
    parts.append(torch.randn(last_rows, width, generator=generator))
    dim = width * num_parts if operation == "concat" else width
    grad = torch.randn(len(offsets) - 1, dim, generator=generator)

    def row(x: int) -> torch.Tensor:
        pieces = []
        for part in parts[:-1]:
            pieces.append(part[x % collisions].double())
            x //= collisions
        pieces.append(parts[-1][x].double())
        if operation == "concat":
            return torch.cat(pieces)
        return math.prod(pieces[1:], start=pieces[0]) if operation == "mult" else sum(pieces[1:], pieces[0])

    scales = bag_scales(offsets, weights, mean)
    bag_of = [b for b in range(len(offsets) - 1) for _ in range(offsets[b], offsets[b + 1])]
    expected = torch.zeros(len(offsets) - 1, dim, dtype=torch.float64)
    for j, x in enumerate(ids):
        expected[bag_of[j]] += scales[j] * row(x)
    ids_t, offsets_t = torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)
    weights_t = None if weights is None else torch.tensor(weights)
    out = qr_ops.qr_pooled(parts, ids_t, offsets_t, weights_t, collisions, operation, mean, [False] * num_parts)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    leaves = [p.double().requires_grad_(True) for p in parts]
    parts_backup, parts[:] = list(parts), leaves
    loss = sum((scales[j] * row(x) * grad[bag_of[j]].double()).sum() for j, x in enumerate(ids))
    expected_grads = torch.autograd.grad(loss, leaves, allow_unused=True) if ids else [None] * num_parts
    grads = qr_ops.qr_pooled_backward(grad, parts_backup, ids_t, offsets_t, weights_t, collisions, operation, mean)
    for got, want, part in zip(grads, expected_grads, parts_backup):
        want = torch.zeros_like(part, dtype=torch.float64) if want is None else want
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@PROFILE
@given(data=st.data(), num_cores=st.integers(2, 4), seed=st.integers(0, 1000))
def test_tt_rows_match_the_matrix_products(data: st.DataObject, num_cores: int, seed: int) -> None:
    p = data.draw(st.lists(st.integers(1, 4), min_size=num_cores, max_size=num_cores), label="p")
    q = data.draw(st.lists(st.integers(1, 3), min_size=num_cores, max_size=num_cores), label="q")
    ranks = [1] + data.draw(st.lists(st.integers(1, 3), min_size=num_cores - 1, max_size=num_cores - 1)) + [1]
    generator = torch.Generator().manual_seed(seed)
    cores = [torch.randn(p[k], ranks[k], q[k], ranks[k + 1], generator=generator) for k in range(num_cores)]
    ids = data.draw(st.lists(st.integers(0, math.prod(p) - 1), max_size=8), label="ids")
    got = tt_ops.tt_rows(cores, torch.tensor(ids, dtype=torch.int64))
    assert got.shape == (len(ids), math.prod(q))
    for row, x in enumerate(ids):
        digits = []
        for size in reversed(p):
            digits.append(x % size)
            x //= size
        digits.reverse()
        for column in range(math.prod(q)):
            inner, rest = [], column
            for size in reversed(q):
                inner.append(rest % size)
                rest //= size
            inner.reverse()
            product = torch.eye(1, dtype=torch.float64)
            for k in range(num_cores):
                product = product @ cores[k][digits[k], :, inner[k], :].double()
            torch.testing.assert_close(got[row, column].double(), product[0, 0], rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(data=st.data(), dim=st.integers(1, 12), m=st.integers(1, 97), use_sign=st.booleans(), mean=st.booleans(),
       weighted=st.booleans(), seed=st.integers(0, 1000))
def test_triton_robe_kernels_match_the_ops(data: st.DataObject, dim: int, m: int, use_sign: bool, mean: bool,
                                           weighted: bool, seed: int) -> None:
    """The Triton kernels (interpreted on the CPU, compiled on CUDA) against the ops checked above."""
    triton_kernels = pytest.importorskip("torchrec_pss_plugins.robe.triton_kernels")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    z = data.draw(st.sampled_from([c for c in range(1, dim + 1) if dim % c == 0] + [2 * dim]), label="chunk_size")
    ids, offsets, weights = data.draw(bags(MAX_ID), label="bags")
    coefficients = hash_coefficients(seed, 2)
    memory = torch.randn(m, generator=torch.Generator().manual_seed(seed))
    grad = torch.randn(len(offsets) - 1, dim, generator=torch.Generator().manual_seed(seed + 1))
    ids_t, offsets_t = torch.tensor(ids, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)
    weights_t = torch.tensor(weights) if weighted else None
    key = torch.tensor([7])
    args = (coefficients, key, dim, z, use_sign, mean)
    expected = robe_ops.robe_pooled(memory, ids_t, offsets_t, weights_t, *args, False)
    expected_grad = robe_ops.robe_pooled_backward(grad, ids_t, offsets_t, weights_t, coefficients, key, m, z, use_sign,
                                                  mean)
    on = [None if x is None else x.to(device) for x in (memory, ids_t, offsets_t, weights_t, grad, coefficients)]
    memory_d, ids_d, offsets_d, weights_d, grad_d, coefficients_d = on
    kwargs = {"coefficients": coefficients_d, "keys": key.to(device), "dim": dim, "chunk_size": z, "use_sign": use_sign,
              "mean": mean}
    out = triton_kernels.robe_pooled_forward(memory_d, ids_d, offsets_d, weights_d, **kwargs)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    memory_grad = triton_kernels.robe_pooled_backward(grad_d, ids_d, offsets_d, weights_d, memory_size=m, **kwargs)
    torch.testing.assert_close(memory_grad.cpu(), expected_grad, rtol=1e-5, atol=1e-5)
