"""A slow, independent ROBE-Z reference written from the formula with Python integers and loops."""

from __future__ import annotations

import zlib

import torch

P = 2**31 - 1


def robe_hash(coef: list[int], t: int, k: int, c: int, modulus: int) -> int:
    a, b, cc, d = coef
    return ((a * t + b * (k % P) + cc * c + d) % P) % modulus


def robe_embedding(memory: torch.Tensor, coefficients: torch.Tensor, table: str, x: int, d: int, z: int,
                   use_sign: bool) -> list[float]:
    """Embedding of id ``x`` of ``table`` read element by element from ``memory`` ``[|M|]``."""
    m = memory.numel()
    t = zlib.crc32(table.encode()) % P
    loc, sign = coefficients[0].tolist(), coefficients[1].tolist()
    out = []
    for i in range(d):
        if z <= d:
            k, c, o = x, i // z, i % z
        else:
            r = z // d
            k, c, o = x // r, 0, (x % r) * d + i
        value = float(memory[(robe_hash(loc, t, k, c, m) + o) % m])
        if use_sign:
            value *= 1 - 2 * robe_hash(sign, t, x, i, 2)
        out.append(value)
    return out


def reference_pooled(memory, coefficients, table, d, z, use_sign, bags, weights=None, mean=False):
    """``[len(bags), d]`` float64: each bag (list of ids) pooled from :func:`robe_embedding`."""
    rows = []
    for j, bag in enumerate(bags):
        acc = [0.0] * d
        for n, x in enumerate(bag):
            w = 1.0 if weights is None else float(weights[j][n])
            for i, v in enumerate(robe_embedding(memory, coefficients, table, x, d, z, use_sign)):
                acc[i] += w * v
        if mean and bag:
            acc = [a / len(bag) for a in acc]
        rows.append(acc)
    return torch.tensor(rows, dtype=torch.float64)
