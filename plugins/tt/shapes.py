"""Balanced tensor-train factorisations of a table's shape."""

from __future__ import annotations

import math
from typing import NamedTuple


class TTShapes(NamedTuple):
    """Row factors ``p`` (``prod(p) >= n``, the rows past ``n`` are padding) and column factors ``q`` (``prod(q) = d``)."""

    p_shapes: tuple[int, ...]
    q_shapes: tuple[int, ...]

    def describe(self, n: int, d: int) -> str:
        padded = math.prod(self.p_shapes)
        return (
            f"n={n} -> p={list(self.p_shapes)} ({padded} rows, {padded - n} padding), "
            f"d={d} -> q={list(self.q_shapes)}"
        )


def _prime_factors(x: int) -> list[int]:
    factors, f = [], 2
    while f * f <= x:
        while x % f == 0:
            factors.append(f)
            x //= f
        f += 1
    return factors + ([x] if x > 1 else [])


def balanced_exact_factors(d: int, num_factors: int) -> tuple[int, ...]:
    """``num_factors`` factors with product exactly ``d``, as equal as the primes of ``d`` allow (ascending)."""
    bins = [1] * num_factors
    for prime in sorted(_prime_factors(d), reverse=True):
        bins[bins.index(min(bins))] *= prime
    return tuple(sorted(bins))


def balanced_covering_factors(n: int, num_factors: int) -> tuple[int, ...]:
    """``num_factors`` near-equal factors whose product is the smallest such product ``>= n`` (ascending)."""
    base = max(1, math.floor(n ** (1 / num_factors)))
    while base ** num_factors > n and base > 1:
        base -= 1
    factors = [base] * num_factors
    i = 0
    while math.prod(factors) < n:
        factors[i % num_factors] += 1
        i += 1
    return tuple(sorted(factors))


def suggest_tt_shapes(n: int, d: int, num_cores: int = 3) -> TTShapes:
    """Balanced ``p`` (covering ``n`` rows) and ``q`` (exactly ``d``) for ``num_cores`` cores."""
    if not 2 <= num_cores <= 4:
        raise ValueError(f"num_cores must be 2, 3 or 4, got {num_cores}")
    if n < 1 or d < 1:
        raise ValueError(f"n and d must be >= 1, got n={n}, d={d}")
    return TTShapes(balanced_covering_factors(n, num_cores), balanced_exact_factors(d, num_cores))
