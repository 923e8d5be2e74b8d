"""The textual compression flag for command lines and YAML.

Grammar: clauses separated by ``;``. The first clause without ``<table>=`` is the default for every
table; ``<table>=<clause>`` overrides one table; a clause is ``<method>:<field>=<value>,...`` with a
registered method name (``robe``, ``qr``, ``tt``, ``mlet``, ``hashing``, ...) or ``plain`` / ``none``
to keep a table uncompressed. Values are Python literals (``1000``, ``0.5``, ``True`` or ``true``,
``[4,4,8]``) or bare strings. The key ``min_rows`` (default clause only, a non-negative int) leaves tables
with fewer rows plain. A table overridden twice, or a field given twice in one clause, is an error. Example::

    robe:compression=1000,chunk_size=32,min_rows=100000;t_3=tt:ranks=16;t_7=plain
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import MethodConfig
from torchrec_pss.registry import method_by_name, registered_methods

PLAIN_NAMES = ("plain", "none")
MIN_ROWS = "min_rows"


@dataclasses.dataclass(frozen=True)
class CompressionFlag:
    """A parsed flag: a callable ``(EmbeddingBagConfig) -> MethodConfig | None`` for ``compress_``.

    ``compress_`` raises a ``ValueError`` when an override names a table that none of its EBCs has.
    """

    default: MethodConfig | None
    overrides: dict[str, MethodConfig | None]
    min_rows: int = 0

    def __call__(self, table: EmbeddingBagConfig) -> MethodConfig | None:
        if table.name in self.overrides:
            return self.overrides[table.name]
        return self.default if table.num_embeddings >= self.min_rows else None


def _value(text: str) -> Any:
    """A Python literal (``true`` / ``false`` in any case too), or else the text itself."""
    if text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _split_fields(text: str) -> list[str]:
    """Split ``a=1,b=[1,2]`` at the commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "[(":
            depth += 1
        elif char in "])":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current] if current else parts


def _min_rows(text: str) -> int:
    """The ``min_rows`` value: a non-negative int literal."""
    rows = _value(text)
    if type(rows) is not int or rows < 0:
        raise ValueError(f"{MIN_ROWS} must be a non-negative int, got {text!r}")
    return rows


def _clause(text: str, allow_min_rows: bool, table: str | None = None) -> tuple[MethodConfig | None, int | None]:
    """The config (None for plain) and ``min_rows`` of one clause; ``table``: the table it overrides, if any."""
    method, _, fields = text.strip().partition(":")
    method = method.strip()
    if method in PLAIN_NAMES:
        if fields.strip():
            raise ValueError(f"'{method}' takes no fields, got {fields!r}")
        return None, None
    if method not in registered_methods():
        read_as = "" if table is None else (
            f" (the clause reads as an override of table {table!r}; a default clause is <method>:<field>=<value>,..., "
            "an override <table>=<method>:...)")
        raise ValueError(f"unknown compression method {method!r} in {text!r}{read_as}; known: "
                         f"{sorted(registered_methods())} or {list(PLAIN_NAMES)}")
    config_cls = method_by_name(method).config_cls
    known = {f.name for f in dataclasses.fields(config_cls)}
    kwargs: dict[str, Any] = {}
    min_rows = None
    seen: set[str] = set()
    for field in _split_fields(fields):
        key, sep, value = field.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"expected <field>=<value> in {text!r}, got {field!r}")
        if key in seen:
            raise ValueError(f"field {key!r} given twice in {text!r}")
        seen.add(key)
        if key == MIN_ROWS:
            if not allow_min_rows:
                raise ValueError(f"{MIN_ROWS!r} belongs in the default clause, not in the per-table clause {text!r}")
            min_rows = _min_rows(value.strip())
            continue
        if key not in known:
            raise ValueError(f"{config_cls.__name__} has no field {key!r} (in {text!r}); fields: {sorted(known)}")
        kwargs[key] = _value(value.strip())
    return config_cls(**kwargs), min_rows


def parse_compression_flag(flag: str) -> CompressionFlag:
    """Parse ``flag`` (see the module docstring) into a :class:`CompressionFlag`."""
    default: MethodConfig | None = None
    min_rows = 0
    overrides: dict[str, MethodConfig | None] = {}
    seen_default = False
    for clause in filter(None, (c.strip() for c in flag.split(";"))):
        head = clause.split(":", 1)[0]
        if "=" in head:
            table, _, rest = clause.partition("=")
            table = table.strip()
            if not table:
                raise ValueError(f"per-table clause {clause!r} in {flag!r} names no table")
            if table in overrides:
                raise ValueError(f"table {table!r} is overridden twice in {flag!r}")
            overrides[table], _ = _clause(rest, allow_min_rows=False, table=table)
            continue
        if seen_default:
            raise ValueError(f"more than one default clause in {flag!r}; per-table clauses are <table>=<method>:...")
        seen_default = True
        default, rows = _clause(clause, allow_min_rows=True)
        min_rows = rows or 0
    return CompressionFlag(default, overrides, min_rows)
