"""QR's and TT's torch.library custom ops: opcheck (schema, fake kernels, autograd registration) and
values / gradients against the modules' references."""

from __future__ import annotations

import pytest
import torch

from torchrec_pss_plugins.qr import ops as qr_ops
from torchrec_pss_plugins.qr import reference as qr_reference
from torchrec_pss_plugins.tt import ops as tt_ops
from torchrec_pss_plugins.tt import reference as tt_reference

OFFSETS = torch.tensor([0, 3, 3, 5, 9])


def qr_inputs(operation: str, parts: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(parts)
    width = 4 if operation == "concat" else 8
    tables = [torch.randn(5, width, generator=generator) for _ in range(parts - 1)]
    tables.append(torch.randn(7, width, generator=generator))
    return tables, torch.randint(0, 5 ** (parts - 1) * 7, (9,), generator=generator)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("mean", [False, True])
def test_qr_op(operation: str, weighted: bool, mean: bool) -> None:
    parts, ids = qr_inputs(operation, 2)
    weights = torch.rand(9, requires_grad=True) if weighted else None
    leaves = [p.clone().requires_grad_(True) for p in parts]
    torch.library.opcheck(qr_ops.qr_pooled, (leaves, ids, OFFSETS, weights, 5, operation, mean, [False, False]))
    out = qr_ops.qr_pooled(leaves, ids, OFFSETS, weights, 5, operation, mean, [False, True])
    expected_leaves = [p.clone().requires_grad_(True) for p in parts]
    expected_weights = None if weights is None else weights.detach().clone().requires_grad_(True)
    rows = qr_reference.compose([p[d] for p, d in zip(expected_leaves, qr_reference.digits(ids, 5, 2))], operation)
    if expected_weights is not None:
        rows = rows * expected_weights.unsqueeze(1)
    lengths = OFFSETS[1:] - OFFSETS[:-1]
    expected = torch.zeros(4, rows.shape[1]).index_add(0, torch.repeat_interleave(torch.arange(4), lengths), rows)
    if mean:
        expected = expected / lengths.clamp(min=1).unsqueeze(1)
    torch.testing.assert_close(out, expected)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    (expected * probe).sum().backward()
    assert leaves[1].grad.is_sparse and not leaves[0].grad.is_sparse
    torch.testing.assert_close(leaves[0].grad, expected_leaves[0].grad)
    torch.testing.assert_close(leaves[1].grad.to_dense(), expected_leaves[1].grad)
    if weighted:
        torch.testing.assert_close(weights.grad, expected_weights.grad)


@pytest.mark.parametrize("kernels", ["fast", "reference"])
def test_qr_int32_ids_and_strided_parts(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """int32 ids give int64 gradient rows in every kernel (the reference's sparse backward indexes with them), and
    a transposed (strided) part gets a contiguous gradient, as its fake says."""
    monkeypatch.setenv("TORCHREC_PSS_KERNELS", kernels)
    parts, ids = qr_inputs("mult", 2)
    ids = ids.to(torch.int32)
    grad = torch.randn(4, parts[0].shape[1])
    torch.library.opcheck(qr_ops.qr_grad_rows, (grad, parts, ids, OFFSETS, None, 5, "mult", False))
    rows, _ = qr_ops.qr_grad_rows(grad, parts, ids, OFFSETS, None, 5, "mult", False)
    assert all(r.dtype == torch.int64 for r in rows)
    strided = [p.t().contiguous().t() for p in parts]
    torch.library.opcheck(qr_ops.qr_pooled_backward, (grad, strided, ids.long(), OFFSETS, None, 5, "mult", False))
    leaves = [p.clone().requires_grad_(True) for p in parts]
    out = qr_ops.qr_pooled(leaves, ids, OFFSETS, None, 5, "mult", False, [True, False])
    (out * grad).sum().backward()
    expected = qr_reference.pooled_backward(grad, parts, ids.long(), OFFSETS, None, 5, "mult", False)
    torch.testing.assert_close(leaves[0].grad.to_dense(), expected[0])
    torch.testing.assert_close(leaves[1].grad, expected[1])


def test_qr_reference_refuses_an_unknown_operation() -> None:
    parts, ids = qr_inputs("mult", 2)
    with pytest.raises(ValueError, match="operation must be one of .*'max'"):
        qr_reference.pooled_forward(parts, ids, OFFSETS, None, 5, "max", False)


def test_tt_reference_gives_contiguous_core_gradients() -> None:
    generator = torch.Generator().manual_seed(1)
    cores = [torch.randn(4, 1, 2, 3, generator=generator), torch.randn(3, 3, 2, 1, generator=generator)]
    strided = [c.transpose(0, 1).contiguous().transpose(0, 1) for c in cores]
    torch.library.opcheck(tt_ops.tt_rows_backward, (torch.randn(5, 4), strided, torch.arange(5)))
    assert all(g.is_contiguous() for g in tt_reference.rows_backward(torch.randn(5, 4), strided, torch.arange(5)))


def test_tt_op() -> None:
    generator = torch.Generator().manual_seed(0)
    cores = [torch.randn(4, 1, 2, 3, generator=generator), torch.randn(5, 3, 2, 2, generator=generator),
             torch.randn(3, 2, 2, 1, generator=generator)]
    ids = torch.randint(0, 60, (11,), generator=generator)
    leaves = [c.clone().requires_grad_(True) for c in cores]
    torch.library.opcheck(tt_ops.tt_rows, (leaves, ids))
    out = tt_ops.tt_rows(leaves, ids)
    for row, x in zip(out.detach(), ids.tolist()):
        i0, i1, i2 = x // 15, (x // 3) % 5, x % 3
        chain = cores[0][i0, 0]  # [q0, R1]
        chain = torch.einsum("ar,rbs->abs", chain, cores[1][i1])  # [q0, q1, R2]
        chain = torch.einsum("abr,rc->abc", chain, cores[2][i2, :, :, 0])
        torch.testing.assert_close(row, chain.reshape(-1))
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    reference_leaves = [c.clone().requires_grad_(True) for c in cores]
    (tt_reference.rows(reference_leaves, ids) * probe).sum().backward()
    for got, want in zip(leaves, reference_leaves):
        torch.testing.assert_close(got.grad, want.grad)
