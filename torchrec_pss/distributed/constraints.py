"""Planning: constraints that keep compressed tables replicated (data parallel), and a one-call planner."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface, EmbeddingCollectionInterface

from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

REPLICATED_KERNEL = "dense"
"""The compute kernel of a replicated compressed table (TorchRec's planner knows it and its costs)."""


def pss_constraints(model: nn.Module) -> dict[str, ParameterConstraints]:
    """``{table name: ParameterConstraints(DATA_PARALLEL, dense)}`` for every compressed table in ``model``.

    For teams that keep their own planner: merge the result into their constraints. Plain tables are
    left alone (TorchRec's planner shards them as usual). Constraints are keyed by table name, so a
    compressed table name that also names another table anywhere in ``model`` (in any embedding bag or
    embedding collection, compressed or not) is refused: its constraint would replicate that table too.
    """
    places: dict[str, list[tuple[str, bool]]] = {}  # table name -> (module path, compressed) of every table
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollectionInterface):
            configs: list[BaseEmbeddingConfig] = list(module.embedding_bag_configs())
        elif isinstance(module, EmbeddingCollectionInterface):
            configs = list(module.embedding_configs())
        else:
            continue
        compressed = module.compression if isinstance(module, CompressedEmbeddingBagCollection) else {}
        for table in configs:
            places.setdefault(table.name, []).append((path, table.name in compressed))
    constraints: dict[str, ParameterConstraints] = {}
    for table, owners in places.items():
        first = next((i for i, (_, compressed) in enumerate(owners) if compressed), None)
        if first is None:
            continue
        if len(owners) > 1:
            other_path, other_compressed = owners[1 if first == 0 else 0]
            raise ValueError(
                f"compressed table {table!r} in module {_where(owners[first][0])} shares its name with a "
                f"{'compressed' if other_compressed else 'plain'} table in module {_where(other_path)}; planner "
                "constraints are keyed by table name, so both would be held data_parallel: rename one of them"
            )
        constraints[table] = ParameterConstraints(
            sharding_types=[ShardingType.DATA_PARALLEL.value], compute_kernels=[REPLICATED_KERNEL]
        )
    return constraints


def _where(path: str) -> str:
    """A module path for messages (the model itself has the empty path)."""
    return repr(path) if path else "'' (the model itself)"


def make_planner(
    model: nn.Module,
    topology: Topology,
    constraints: dict[str, ParameterConstraints] | None = None,
    **planner_kwargs: Any,
) -> EmbeddingShardingPlanner:
    """TorchRec's ``EmbeddingShardingPlanner`` with every compressed table of ``model`` held DATA_PARALLEL.

    ``constraints`` (e.g. pooling factors, or sharding types for plain tables) are kept; for a
    compressed table only its sharding type and kernel are overridden, and a constraint asking for
    another sharding type is refused. Plan with ``get_pss_sharders() + get_default_sharders()``.
    """
    merged = dict(constraints or {})
    for table, replicated in pss_constraints(model).items():
        given = merged.get(table)
        if given is None:
            merged[table] = replicated
            continue
        if given.sharding_types and given.sharding_types != replicated.sharding_types:
            raise ValueError(
                f"table {table!r} is compressed and must stay {ShardingType.DATA_PARALLEL.value}; "
                f"constraints ask for {given.sharding_types}"
            )
        merged[table] = dataclasses.replace(
            given, sharding_types=replicated.sharding_types, compute_kernels=replicated.compute_kernels
        )
    return EmbeddingShardingPlanner(topology=topology, constraints=merged, **planner_kwargs)
