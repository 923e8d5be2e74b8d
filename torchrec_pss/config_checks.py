"""Checks shared by the methods' config dataclasses; each raises ``ValueError`` naming ``Config.field``.

Numbers may be any ``numbers.Integral`` / ``numbers.Real`` but ``bool`` (NumPy scalars included); the numeric
checks store them back as Python ``int`` / ``float``, so configs compare, hash and serialise as usual.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig

_NUMPY_BOOL = numpy.bool_


def exactly_one(config: Any, first: str, second: str) -> None:
    a, b = getattr(config, first), getattr(config, second)
    if (a is None) == (b is None):
        raise ValueError(
            f"{type(config).__name__}: give exactly one of {first} and {second} (got {first}={a}, {second}={b})"
        )


def _skip(config: Any, field: str, optional: bool) -> bool:
    """True for an allowed None; a ``ValueError`` for a None that is not allowed."""
    if getattr(config, field) is not None:
        return False
    if optional:
        return True
    raise ValueError(f"{type(config).__name__}.{field} is required, got None")


def as_int(value: Any) -> int | None:
    """``value`` as a Python int when it is an integral number other than a bool, else None."""
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, _NUMPY_BOOL)):
        return int(value)
    return None


def as_real(value: Any) -> int | float | None:
    """``value`` as a Python int / float when it is a real number other than a bool, else None."""
    integer = as_int(value)
    if integer is not None:
        return integer
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, _NUMPY_BOOL)):
        return float(value)
    return None


def _real_above(config: Any, field: str, optional: bool, low: float, inclusive: bool) -> None:
    value = getattr(config, field)
    if _skip(config, field, optional):
        return
    number = as_real(value)
    if number is None or not math.isfinite(number) or not (number >= low if inclusive else number > low):
        bound = f">= {low:g}" if inclusive else f"> {low:g}"
        raise ValueError(f"{type(config).__name__}.{field} must be a finite number {bound}, got {value!r}")
    object.__setattr__(config, field, number)


def ratio(config: Any, field: str, optional: bool = False) -> None:
    """``field`` is a finite number ``>= 1`` (a compression ratio), or None when ``optional``."""
    _real_above(config, field, optional, 1, inclusive=True)


def positive(config: Any, field: str, optional: bool = False) -> None:
    """``field`` is a finite number ``> 0``, or None when ``optional``."""
    _real_above(config, field, optional, 0, inclusive=False)


def integer_at_least(config: Any, field: str, low: int, high: int | None = None, optional: bool = False) -> None:
    """``field`` is an int in ``[low, high]``, or None when ``optional``."""
    value = getattr(config, field)
    if _skip(config, field, optional):
        return
    number = as_int(value)
    if number is None or number < low or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{type(config).__name__}.{field} must be an int {bound}, got {value!r}")
    object.__setattr__(config, field, number)


def flag(config: Any, field: str) -> None:
    """``field`` is True or False (a NumPy bool is stored back as a Python bool)."""
    value = getattr(config, field)
    if not isinstance(value, (bool, _NUMPY_BOOL)):
        raise ValueError(f"{type(config).__name__}.{field} must be True or False, got {value!r}")
    object.__setattr__(config, field, bool(value))


def text(config: Any, field: str) -> None:
    """``field`` is a non-empty string."""
    value = getattr(config, field)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{type(config).__name__}.{field} must be a non-empty string, got {value!r}")


def one_of(config: Any, field: str, choices: Iterable[str]) -> None:
    value, choices = getattr(config, field), tuple(choices)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {choices}, got {value!r}")


def float32_tables(method: str, tables: Iterable[EmbeddingBagConfig]) -> None:
    """Compressed memories are float32: refuse tables configured otherwise."""
    for table in tables:
        if table.data_type != DataType.FP32:
            raise ValueError(f"table {table.name!r}: {method} memories are float32, got data_type={table.data_type}")
