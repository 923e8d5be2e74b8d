"""``collapse``: turn training-time factorised tables (e.g. MLET) into ordinary tables for inference."""

from __future__ import annotations

import torch
from torchrec import EmbeddingBagCollection

from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection


def collapse(module: CompressedEmbeddingBagCollection) -> EmbeddingBagCollection | CompressedEmbeddingBagCollection:
    """A copy of ``module`` whose tables held by a method with ``collapses_for_inference`` are plain tables.

    Each such table is materialised in float64 (``PSSMemory.materialize``) and cast to float32. The
    result is a ``torchrec.EmbeddingBagCollection`` when no compressed table is left, otherwise a
    ``CompressedEmbeddingBagCollection`` with the remaining compressed tables (their memories copied).
    Outputs equal the module's up to float32 rounding.
    """
    tables = module.embedding_bag_configs()
    keep = {
        name: config
        for name, config in module.compression.items()
        if not type(module.memory_for(name)).collapses_for_inference
    }
    device = next(module.parameters()).device
    if keep:
        result = CompressedEmbeddingBagCollection(tables, keep, device, is_weighted=module.is_weighted())
        for group, memory in result.pss_memories.items():
            memory.load_state_dict(module.pss_memories[group].state_dict())
    else:
        result = EmbeddingBagCollection(tables, is_weighted=module.is_weighted(), device=device)
    with torch.no_grad():
        for table in tables:
            memory = module.memory_for(table.name)
            if memory is None:
                weight = module.embedding_bags[table.name].weight
            elif table.name in keep:
                continue
            else:
                weight = memory.materialize(table.name)
            result.embedding_bags[table.name].weight.copy_(weight.to(torch.float32))
    return result
