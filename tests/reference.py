"""Slow, independent reference implementations written from each method's formula (Python ints, loops)."""

from __future__ import annotations

import zlib
from typing import Callable

import torch

P = 2**31 - 1
Embed = Callable[[int], list[float]]


def universal_hash(coef: list[int], t: int, k: int, c: int, modulus: int) -> int:
    a, b, cc, d = coef
    return ((a * t + b * (k % P) + cc * c + d) % P) % modulus


def table_key(name: str) -> int:
    return zlib.crc32(name.encode()) % P


def robe_embedding(memory: torch.Tensor, coefficients: torch.Tensor, table: str, d: int, z: int,
                   use_sign: bool) -> Embed:
    """ROBE-Z (appendix 7.2 of the ROBE paper): element by element from ``memory`` ``[|M|]``."""
    m, t = memory.numel(), table_key(table)
    loc, sign = coefficients[0].tolist(), coefficients[1].tolist()

    def embed(x: int) -> list[float]:
        out = []
        for i in range(d):
            if z <= d:
                k, c, o = x, i // z, i % z
            else:
                r = z // d
                k, c, o = x // r, 0, (x % r) * d + i
            value = float(memory[(universal_hash(loc, t, k, c, m) + o) % m])
            if use_sign:
                value *= 1 - 2 * universal_hash(sign, t, x, i, 2)
            out.append(value)
        return out

    return embed


def hashing_embedding(weight: torch.Tensor, coefficients: torch.Tensor, table: str) -> Embed:
    """The hashing trick: row ``h(t, x)`` of ``weight``."""
    coef, t = coefficients[0].tolist(), table_key(table)
    return lambda x: weight[universal_hash(coef, t, x, 0, weight.shape[0])].tolist()


def qr_embedding(parts: list[torch.Tensor], collisions: int, operation: str) -> Embed:
    """QR: mixed-radix digits of ``x`` in base ``collisions`` (remainders first, quotient last)."""

    def embed(x: int) -> list[float]:
        digits, rest = [], x
        for _ in range(len(parts) - 1):
            digits.append(rest % collisions)
            rest //= collisions
        digits.append(rest)
        rows = [part[digit].tolist() for part, digit in zip(parts, digits)]
        if operation == "concat":
            return [v for row in rows for v in row]
        out = rows[0]
        for row in rows[1:]:
            out = [a * b if operation == "mult" else a + b for a, b in zip(out, row)]
        return out

    return embed


def tt_embedding(cores: list[torch.Tensor], p: list[int], q: list[int]) -> Embed:
    """TT: ``E[x, j]`` as the product of the cores' ``[R_{k-1}, R_k]`` slices, one element at a time."""

    def digits(value: int, base: list[int]) -> list[int]:
        out = []
        for b in reversed(base):
            out.append(value % b)
            value //= b
        return out[::-1]

    def embed(x: int) -> list[float]:
        row_digits = digits(x, p)
        out = []
        for j in range(int(torch.tensor(q).prod())):
            col_digits = digits(j, q)
            vec = torch.ones(1, 1, dtype=torch.float64)
            for core, i_k, j_k in zip(cores, row_digits, col_digits):
                vec = vec @ core[i_k, :, j_k, :].double()
            out.append(float(vec[0, 0]))
        return out

    return embed


def mlet_embedding(w1: torch.Tensor, w2: torch.Tensor) -> Embed:
    """MLET: ``sum_k W1[x, k] · W2[k, j]``."""
    return lambda x: [sum(float(w1[x, k]) * float(w2[k, j]) for k in range(w1.shape[1])) for j in range(w2.shape[1])]


def pooled(embed: Embed, d: int, bags: list[list[int]], weights: list[list[float]] | None = None,
           mean: bool = False) -> torch.Tensor:
    """``[len(bags), d]`` float64: each bag of ids pooled from ``embed``."""
    rows = []
    for j, bag in enumerate(bags):
        acc = [0.0] * d
        for n, x in enumerate(bag):
            w = 1.0 if weights is None else float(weights[j][n])
            for i, v in enumerate(embed(x)):
                acc[i] += w * v
        if mean and bag:
            acc = [a / len(bag) for a in acc]
        rows.append(acc)
    return torch.tensor(rows, dtype=torch.float64).reshape(len(bags), d)


def reference_pooled(memory, coefficients, table, d, z, use_sign, bags, weights=None, mean=False):
    """ROBE bags pooled by the reference (kept for the ROBE tests)."""
    return pooled(robe_embedding(memory, coefficients, table, d, z, use_sign), d, bags, weights, mean)
