"""Universal hashing shared by the hash-based methods (ROBE-Z, HashedNet, the hashing trick).

``h(t, k, c) = ((A·t + B·k + C·c + D) mod P) mod m`` with ``P = 2^31 - 1`` (prime). Every operand is
reduced mod ``P`` before it is multiplied and every product is reduced again before it is added, so
all intermediates stay below ``2^62 + 2^33`` and ids up to ``2^63 - 1`` never overflow int64.
"""

from __future__ import annotations

import zlib

import torch

PRIME = 2**31 - 1
COEFFICIENTS_PER_HASH = 4


def hash_coefficients(seed: int, num_hashes: int) -> torch.Tensor:
    """``num_hashes`` independent coefficient sets ``(A, B, C, D)``, each in ``[1, P)``: ``[num_hashes, 4]`` int64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, PRIME, (num_hashes, COEFFICIENTS_PER_HASH), generator=generator, dtype=torch.int64)


def table_key(name: str) -> int:
    """Stable per-table hash input ``t`` (CRC-32 of the name), independent of table order and process."""
    return zlib.crc32(name.encode("utf-8")) % PRIME


def universal_hash(
    coefficients: torch.Tensor, t: torch.Tensor | int, k: torch.Tensor, c: torch.Tensor | int, modulus: int
) -> torch.Tensor:
    """``((A·t + B·k + C·c + D) mod P) mod modulus`` elementwise (``t``, ``k``, ``c`` broadcast; int64, ``>= 0``).
    Tensors of another integer dtype (int32 ids) are read as int64: a 0-dim int64 coefficient times an int32 tensor
    stays int32 under torch's promotion, and the products would overflow."""
    a, b, cc, d = (coefficients[i] for i in range(COEFFICIENTS_PER_HASH))
    t = t.long() if isinstance(t, torch.Tensor) else t
    first = (a * (t % PRIME)) % PRIME + d
    h = (b * torch.remainder(k.long(), PRIME)) % PRIME + first
    if isinstance(c, int):
        h = h + (cc * (c % PRIME)) % PRIME
    else:
        h = h + (cc * torch.remainder(c.long(), PRIME)) % PRIME
    return (h % PRIME) % modulus
