"""ROBE-Z C++ CPU kernels against the pure-torch ``RobeMemory`` path, autograd and ``FusedUpdate``.

The expected values come from ``RobeMemory`` with ``TORCHREC_PSS_KERNELS=reference``, so its ops run their
pure-PyTorch references even where the module dispatches to these very kernels by default.
"""

from __future__ import annotations

import math

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec_pss_plugins.robe import RobeConfig, RobeMemory, reference
from torchrec_pss_plugins.robe.cpu_kernels import load

from torchrec_pss.optim import BlockwiseAdagrad, FusedUpdate

KERNELS = load()
pytestmark = pytest.mark.skipif(KERNELS is None, reason="the ROBE C++ extension could not be built here")

D = 32


@pytest.fixture(autouse=True)
def reference_module(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", "reference")

# Z = 1 and short runs (hashed as used, Z < 16), Z < d through a plan, Z == d, Z > d (two ratios)
Z_CASES = [1, 2, 8, 16, D, 2 * D, 4 * D]


def build(z: int, use_sign: bool, memory_size: int = 97, d: int = D) -> RobeMemory:
    table = EmbeddingBagConfig(name="t1", embedding_dim=d, num_embeddings=1000, feature_names=["f1"])
    memory = RobeMemory(RobeConfig(memory_size=memory_size, chunk_size=z, use_sign=use_sign, seed=5, gradient="dense"),
                        [table])
    with torch.no_grad():
        memory.weight.normal_(generator=torch.Generator().manual_seed(z + memory_size))
    return memory


def batch(seed: int, huge: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids, lengths, weights)`` of 7 bags (two empty); some ids near 2^62 and 2^63 - 1."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 3, 1, 5, 0, 2, 4])
    ids = torch.randint(0, 1000, (int(lengths.sum()),), generator=generator)
    if huge:
        ids[::3] += 2**62 - 500
        ids[1] = 2**63 - 1
    weights = torch.rand(ids.numel(), generator=generator) * 4 - 2
    return ids, lengths, weights


def offsets_of(lengths: torch.Tensor) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])


def hash_args(memory: RobeMemory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(coefficients, keys)`` of table ``t1``."""
    return memory.hash_coefficients, memory.table_keys[:1]


def forward(memory: RobeMemory, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
            mean: bool) -> torch.Tensor:
    c = memory.config
    return KERNELS.robe_pooled_forward(memory.weight.detach(), ids, offsets_of(lengths), weights, *hash_args(memory),
                                       D, c.chunk_size, c.use_sign, mean)


def reference_step(memory: RobeMemory, ids: torch.Tensor, lengths: torch.Tensor, weights: torch.Tensor | None,
                   mean: bool, grad_out: torch.Tensor) -> torch.Tensor:
    """The autograd (dense) gradient of ``M`` for ``grad_out``."""
    memory.weight.grad = None
    memory.pooled("t1", ids, lengths, weights, mean).backward(grad_out)
    return memory.weight.grad.clone()


CASES = [(z, sign, weighted, mean) for z in Z_CASES for sign in (False, True) for weighted in (False, True)
         for mean in (False, True)]


@pytest.mark.parametrize("z,use_sign,weighted,mean", CASES)
@pytest.mark.parametrize("memory_size", [97, 5])
def test_forward_matches_reference(z: int, use_sign: bool, weighted: bool, mean: bool, memory_size: int) -> None:
    memory = build(z, use_sign, memory_size)
    ids, lengths, weights = batch(z)
    weights = weights if weighted else None
    expected = memory.pooled("t1", ids, lengths, weights, mean).detach()
    out = forward(memory, ids, lengths, weights, mean)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(out[0] == 0) and torch.all(out[4] == 0), "empty bags pool to zeros"


def test_forward_wraps_at_the_end_of_memory() -> None:
    """Runs starting within Z of the end of M continue at M[0]."""
    memory = build(16, False, memory_size=40)
    ids = torch.arange(200)
    starts, _ = memory.chunk_starts("t1", ids)
    assert bool((starts > 40 - 16).any()), "some runs must wrap"
    lengths = torch.ones(200, dtype=torch.int64)
    expected = memory.pooled("t1", ids, lengths, None, False).detach()
    torch.testing.assert_close(forward(memory, ids, lengths, None, False), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("z,use_sign,weighted,mean", CASES)
def test_dense_backward_matches_autograd(z: int, use_sign: bool, weighted: bool, mean: bool) -> None:
    memory = build(z, use_sign)
    ids, lengths, weights = batch(z + 1)
    weights = weights if weighted else None
    grad_out = torch.randn(lengths.numel(), D, generator=torch.Generator().manual_seed(1))
    expected = reference_step(memory, ids, lengths, weights, mean, grad_out)
    c = memory.config
    got = KERNELS.robe_pooled_backward(grad_out, ids, offsets_of(lengths), weights, *hash_args(memory),
                                       memory.memory_size, D, c.chunk_size, c.use_sign, mean)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z,use_sign,weighted,mean", CASES)
@pytest.mark.parametrize("memory_size", [97, 5, 1 << 17])
def test_sparse_grad_matches_the_coalesced_reference(z: int, use_sign: bool, weighted: bool, mean: bool,
                                                     memory_size: int) -> None:
    """Touched positions (ascending, unique) and their summed values; |M| = 5 < Z wraps runs several times and
    |M| = 2^17 needs both radix passes."""
    memory = build(z, use_sign, memory_size)
    ids, lengths, weights = batch(z + 4)
    weights = weights if weighted else None
    grad_out = torch.randn(lengths.numel(), D, generator=torch.Generator().manual_seed(7))
    args = (grad_out, ids, offsets_of(lengths), weights)
    positions, values = KERNELS.robe_sparse_grad(*args, *hash_args(memory), memory_size, D, z, use_sign, mean)
    expected = reference.pooled_backward(*args, memory.hash_coefficients, memory.table_keys[:1], memory_size, z,
                                         use_sign, mean, sparse=True)
    assert torch.equal(positions, expected.indices()[0])
    torch.testing.assert_close(values, expected.values(), rtol=1e-5, atol=1e-5)
    dense = reference_step(memory, ids, lengths, weights, mean, grad_out)
    torch.testing.assert_close(torch.zeros(memory_size).index_add_(0, positions, values), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z,use_sign,weighted,mean", CASES)
def test_sgd_update_equals_dense_sgd(z: int, use_sign: bool, weighted: bool, mean: bool) -> None:
    memory = build(z, use_sign, memory_size=61)
    ids, lengths, weights = batch(z + 2)
    weights = weights if weighted else None
    grad_out = torch.randn(lengths.numel(), D, generator=torch.Generator().manual_seed(2))
    expected = memory.weight.detach() - 0.1 * reference_step(memory, ids, lengths, weights, mean, grad_out)
    updated = memory.weight.detach().clone()
    c = memory.config
    KERNELS.robe_sgd_update_(updated, grad_out, ids, offsets_of(lengths), weights, *hash_args(memory), c.chunk_size,
                             c.use_sign, mean, 0.1)
    torch.testing.assert_close(updated, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z", [3, 6, 12])
def test_run_lengths_without_a_compiled_case(z: int) -> None:
    """d = 24: runs of 3 and 6 (short, hashed as used) and 12 (through a plan) have no compile-time length."""
    memory = build(z, True, memory_size=53, d=24)
    ids, lengths, weights = batch(z)
    offsets = offsets_of(lengths)
    grad_out = torch.randn(lengths.numel(), 24, generator=torch.Generator().manual_seed(z))
    args = (ids, offsets, weights, *hash_args(memory))
    expected = memory.pooled("t1", ids, lengths, weights, True)
    expected.backward(grad_out)
    out = KERNELS.robe_pooled_forward(memory.weight.detach(), *args, 24, z, True, True)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-5, atol=1e-5)
    updated = memory.weight.detach().clone()
    KERNELS.robe_sgd_update_(updated, grad_out, *args, z, True, True, 0.1)
    torch.testing.assert_close(updated, memory.weight.detach() - 0.1 * memory.weight.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory_size", [7, 53, 1 << 20])
def test_hashednet_scatter_in_blocks_and_a_tail(memory_size: int) -> None:
    """Z = 1, d = 40: two blocks of 16 chunks (gather + scatter with AVX-512) and a tail of 8 (scalar). An id's
    chunk positions step by C mod |M|, so they repeat inside a block of 16 when |M| < 16 (|M| = 7: the scalar
    loop must take over) and not otherwise (53, 2^20): SGD and the dense backward."""
    memory = build(1, True, memory_size=memory_size, d=40)
    ids, lengths, weights = batch(1)
    offsets = offsets_of(lengths)
    grad_out = torch.randn(lengths.numel(), 40, generator=torch.Generator().manual_seed(memory_size))
    args = (ids, offsets, weights, *hash_args(memory))
    expected = reference.pooled_backward(grad_out, ids, offsets, weights, memory.hash_coefficients,
                                         memory.table_keys[:1], memory_size, 1, True, True)
    backward = KERNELS.robe_pooled_backward(grad_out, *args, memory_size, 40, 1, True, True)
    torch.testing.assert_close(backward, expected, rtol=1e-5, atol=1e-5)
    updated = memory.weight.detach().clone()
    KERNELS.robe_sgd_update_(updated, grad_out, *args, 1, True, True, 0.1)
    torch.testing.assert_close(updated, memory.weight.detach() - 0.1 * expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2, 5])
@pytest.mark.parametrize("z,memory_size", [(32, 4099), (1, 4099), (4, 4099), (8, 4_500_001), (1, 4_500_001)])
def test_updates_lose_nothing_on_a_large_batch(threads: int, z: int, memory_size: int) -> None:
    """Several threads' memory ranges (runs crossing their bounds) or, for short runs and a small M, their shares of
    the bags and private copies of M; many collisions: the in-place SGD, the dense backward and the blockwise
    Adagrad scatters equal the reference's."""
    memory = build(z, True, memory_size=memory_size, d=128)
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(0, 30, (512,), generator=generator)
    ids = torch.randint(0, 10**6, (int(lengths.sum()),), generator=generator)
    grad_out = torch.randn(512, 128, generator=generator)
    offsets = offsets_of(lengths)
    blocks = math.ceil(memory_size / 30)
    args = (ids, offsets, None, memory.hash_coefficients, memory.table_keys[:1], z, True, False)
    expected, expected_sums = memory.weight.detach().clone(), torch.full((blocks,), 0.1)
    reference.adagrad_update_(expected, expected_sums, grad_out, *args, 0.01, 1e-8, 30)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        updated = memory.weight.detach().clone()
        KERNELS.robe_sgd_update_(updated, grad_out, ids, offsets, None, *hash_args(memory), z, True, False, 0.01)
        backward = KERNELS.robe_pooled_backward(grad_out, ids, offsets, None, *hash_args(memory), memory_size, 128, z,
                                                True, False)
        param, sums = memory.weight.detach().clone(), torch.full((blocks,), 0.1)
        KERNELS.robe_adagrad_update_(param, sums, grad_out, ids, offsets, None, *hash_args(memory), z, True, False,
                                     0.01, 1e-8, 30)
    finally:
        torch.set_num_threads(previous)
    dense = reference.pooled_backward(grad_out, *args[:-3], memory_size, z, True, False)
    torch.testing.assert_close(backward, dense, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(updated, memory.weight.detach() - 0.01 * dense, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums, expected_sums, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("z,use_sign,weighted,mean", [case for case in CASES if case[2] == case[3]])
@pytest.mark.parametrize("blockwise", [False, True])
def test_adagrad_update_equals_fused_update(z: int, use_sign: bool, weighted: bool, mean: bool,
                                            blockwise: bool) -> None:
    memory = build(z, use_sign, memory_size=61)
    block = min(z, memory.memory_size) if blockwise else 1
    optimizer = BlockwiseAdagrad if blockwise else torch.optim.Adagrad
    kwargs = {"lr": 0.05, "eps": 1e-8, "initial_accumulator_value": 0.01}
    update = FusedUpdate("m", memory.weight, optimizer, kwargs, block)
    accumulator = update.state["sum"].clone().reshape(-1)
    param = memory.weight.detach().clone()
    for step in range(3):
        ids, lengths, weights = batch(z + 10 * step)
        weights = weights if weighted else None
        grad_out = torch.randn(lengths.numel(), D, generator=torch.Generator().manual_seed(step))
        update.apply(reference_step(memory, ids, lengths, weights, mean, grad_out))
        c = memory.config
        KERNELS.robe_adagrad_update_(param, accumulator, grad_out, ids, offsets_of(lengths), weights,
                                     *hash_args(memory), c.chunk_size, c.use_sign, mean, 0.05, 1e-8, block)
        torch.testing.assert_close(param, memory.weight.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(accumulator, update.state["sum"].reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block", [1, 4])
def test_adagrad_leaves_untouched_blocks_alone(block: int) -> None:
    memory = build(4, True, memory_size=1000)
    before = memory.weight.detach().clone()
    param, accumulator = before.clone(), torch.full((math.ceil(1000 / block),), 0.5)
    ids, lengths = torch.tensor([3, 2**62 + 7]), torch.tensor([2])
    KERNELS.robe_adagrad_update_(param, accumulator, torch.ones(1, D), ids, offsets_of(lengths), None,
                                 *hash_args(memory), 4, True, False, 0.1, 1e-10, block)
    positions = memory.positions("t1", ids).reshape(-1)
    touched = torch.zeros(accumulator.numel(), dtype=torch.bool)
    touched[torch.div(positions, block, rounding_mode="floor")] = True
    assert bool((accumulator[touched] > 0.5).all()) and bool((accumulator[~touched] == 0.5).all())
    element_touched = torch.zeros(1000, dtype=torch.bool)
    element_touched[positions] = True
    assert torch.equal(param[~element_touched], before[~element_touched])
    assert bool((param[element_touched] != before[element_touched]).all())


def test_blockwise_adagrad_with_a_partial_last_block() -> None:
    """|M| not a multiple of the block: the last block's mean divides by the full block size."""
    memory = build(4, False, memory_size=4 * 25 + 3)
    update = FusedUpdate("m", memory.weight, BlockwiseAdagrad, {"lr": 0.1}, 4)
    accumulator = update.state["sum"].clone().reshape(-1)
    param = memory.weight.detach().clone()
    ids = torch.arange(0, 400)
    lengths = torch.full((40,), 10)
    grad_out = torch.randn(40, D, generator=torch.Generator().manual_seed(4))
    update.apply(reference_step(memory, ids, lengths, None, False, grad_out))
    KERNELS.robe_adagrad_update_(param, accumulator, grad_out, ids, offsets_of(lengths), None, *hash_args(memory), 4,
                                 False, False, 0.1, 1e-10, 4)
    assert math.ceil(memory.memory_size / 4) == accumulator.numel()
    torch.testing.assert_close(param, memory.weight.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(accumulator, update.state["sum"].reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("z,use_sign,weighted,mean", [case for case in CASES if case[2]])
def test_weights_grad_matches_autograd(z: int, use_sign: bool, weighted: bool, mean: bool) -> None:
    memory = build(z, use_sign)
    ids, lengths, weights = batch(z + 3)
    weights = weights.clone().requires_grad_(True)
    grad_out = torch.randn(lengths.numel(), D, generator=torch.Generator().manual_seed(5))
    memory.pooled("t1", ids, lengths, weights, mean).backward(grad_out)
    c = memory.config
    got = KERNELS.robe_weights_grad(memory.weight.detach(), grad_out, ids, offsets_of(lengths), *hash_args(memory),
                                    c.chunk_size, c.use_sign, mean)
    torch.testing.assert_close(got, weights.grad, rtol=1e-5, atol=1e-5)


def test_non_contiguous_grad_and_bad_offsets() -> None:
    memory = build(4, False)
    ids, lengths, _ = batch(0, huge=False)
    offsets = offsets_of(lengths)
    grad_out = torch.ones(1, 1).expand(lengths.numel(), D)  # what out.sum().backward() hands over
    expected = reference_step(memory, ids, lengths, None, False, grad_out)
    got = KERNELS.robe_pooled_backward(grad_out, ids, offsets, None, *hash_args(memory), memory.memory_size, D, 4,
                                       False, False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="offsets"):
        KERNELS.robe_pooled_forward(memory.weight.detach(), ids, offsets[:-1], None, *hash_args(memory), D, 4, False,
                                    False)
    column = torch.ones(ids.numel(), 1)
    with pytest.raises(RuntimeError, match=r"weights must be a 1-D CPU tensor \[N\]"):
        KERNELS.robe_pooled_forward(memory.weight.detach(), ids, offsets, column, *hash_args(memory), D, 4, False,
                                    False)
    with pytest.raises(RuntimeError, match=r"weights must be a 1-D CPU tensor \[N\]"):
        KERNELS.robe_pooled_backward(grad_out, ids, offsets, column, *hash_args(memory), memory.memory_size, D, 4,
                                     False, False)


def test_memory_must_be_flat() -> None:
    """An ``[|M|, 1]`` memory is refused (not read as flat), and a refused update writes nothing."""
    memory = build(4, False)
    ids, lengths, _ = batch(0, huge=False)
    offsets, grad_out = offsets_of(lengths), torch.ones(lengths.numel(), D)
    column = memory.weight.detach().clone().unsqueeze(1)
    with pytest.raises(RuntimeError, match=r"memory must be a contiguous, non-empty 1-D tensor \[\|M\|\], got \[97, 1\]"):
        KERNELS.robe_pooled_forward(column, ids, offsets, None, *hash_args(memory), D, 4, False, False)
    with pytest.raises(RuntimeError, match="1-D tensor"):
        KERNELS.robe_sgd_update_(column, grad_out, ids, offsets, None, *hash_args(memory), 4, False, False, 0.1)
    assert torch.equal(column.squeeze(1), memory.weight.detach())


@pytest.mark.parametrize("z", [1, D])
@pytest.mark.parametrize("layout", ["expanded", "column_slice", "transposed"])
def test_strided_gradients_are_read_in_place(z: int, layout: str) -> None:
    """Every kernel that reads ``grad_out`` gives with a strided one what it gives with its contiguous copy:
    the expanded gradient of a ``sum`` (row stride 0), a column slice of a wider gradient, a transposed one."""
    memory = build(z, use_sign=True)
    ids, lengths, weights = batch(z + 9)
    wide = torch.randn(lengths.numel(), 2 * D, generator=torch.Generator().manual_seed(3))
    grad = {"expanded": torch.full((1, 1), 0.25).expand(lengths.numel(), D), "column_slice": wide[:, D:],
            "transposed": wide[:, :D].t().contiguous().t()}[layout]
    assert not grad.is_contiguous()
    dense = grad.contiguous()
    bags = (ids, offsets_of(lengths))
    hashed = (*hash_args(memory), z, True, True)
    m = memory.memory_size

    def both(call):
        return call(grad), call(dense)

    for got, expected in [
        both(lambda g: KERNELS.robe_pooled_backward(g, *bags, weights, *hash_args(memory), m, D, z, True, True)),
        both(lambda g: KERNELS.robe_sparse_grad(g, *bags, weights, *hash_args(memory), m, D, z, True, True)),
        both(lambda g: KERNELS.robe_weights_grad(memory.weight.detach(), g, *bags, *hashed)),
    ]:
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    for update in ("sgd", "adagrad"):
        results = []
        for g in (grad, dense):
            param = memory.weight.detach().clone()
            if update == "sgd":
                KERNELS.robe_sgd_update_(param, g, *bags, weights, *hashed, 0.1)
            else:
                KERNELS.robe_adagrad_update_(param, torch.zeros(m), g, *bags, weights, *hashed, 0.1, 1e-8, 1)
            results.append(param)
        torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
