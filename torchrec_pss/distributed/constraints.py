"""``pss_constraints``: planner constraints that keep compressed tables replicated (data parallel)."""

from __future__ import annotations

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingType

from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

REPLICATED_KERNEL = "dense"
"""The compute kernel of a replicated compressed table (TorchRec's planner knows it and its costs)."""


def pss_constraints(model: nn.Module) -> dict[str, ParameterConstraints]:
    """``{table name: ParameterConstraints(DATA_PARALLEL, dense)}`` for every compressed table in ``model``.

    For teams that keep their own planner: merge the result into their constraints. Plain tables are
    left alone (TorchRec's planner shards them as usual). Constraints are keyed by table name, so a
    compressed table name used twice in the model is refused.
    """
    constraints: dict[str, ParameterConstraints] = {}
    for path, module in model.named_modules():
        if not isinstance(module, CompressedEmbeddingBagCollection):
            continue
        for table in module.compression:
            if table in constraints:
                raise ValueError(
                    f"compressed table name {table!r} appears in more than one module (again in {path!r}); "
                    "planner constraints are keyed by table name, so names must be unique"
                )
            constraints[table] = ParameterConstraints(
                sharding_types=[ShardingType.DATA_PARALLEL.value], compute_kernels=[REPLICATED_KERNEL]
            )
    return constraints
