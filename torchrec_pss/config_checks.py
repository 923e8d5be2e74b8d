"""Checks shared by the methods' config dataclasses; each raises ``ValueError`` naming ``Config.field``."""

from __future__ import annotations

import math
from typing import Any, Iterable

from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig


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


def ratio(config: Any, field: str, optional: bool = False) -> None:
    """``field`` is a finite number ``>= 1`` (a compression ratio), or None when ``optional``."""
    value = getattr(config, field)
    if not _skip(config, field, optional) and not (
        isinstance(value, (int, float)) and math.isfinite(value) and value >= 1
    ):
        raise ValueError(f"{type(config).__name__}.{field} must be a finite number >= 1, got {value}")


def positive(config: Any, field: str, optional: bool = False) -> None:
    """``field`` is a finite number ``> 0``, or None when ``optional``."""
    value = getattr(config, field)
    if not _skip(config, field, optional) and not (
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{type(config).__name__}.{field} must be a finite number > 0, got {value}")


def integer_at_least(config: Any, field: str, low: int, high: int | None = None, optional: bool = False) -> None:
    """``field`` is an int in ``[low, high]``, or None when ``optional``."""
    value = getattr(config, field)
    if _skip(config, field, optional):
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{type(config).__name__}.{field} must be an int {bound}, got {value!r}")


def one_of(config: Any, field: str, choices: Iterable[str]) -> None:
    value, choices = getattr(config, field), tuple(choices)
    if value not in choices:
        raise ValueError(f"{type(config).__name__}.{field} must be one of {choices}, got {value!r}")


def float32_tables(method: str, tables: Iterable[EmbeddingBagConfig]) -> None:
    """Compressed memories are float32: refuse tables configured otherwise."""
    for table in tables:
        if table.data_type != DataType.FP32:
            raise ValueError(f"table {table.name!r}: {method} memories are float32, got data_type={table.data_type}")
