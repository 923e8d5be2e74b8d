"""``collapse``: turn training-time factorised tables (e.g. MLET) into ordinary tables for inference.

:func:`with_plain_tables` is the copy both ``collapse`` and :func:`torchrec_pss.decompress` make.
"""

from __future__ import annotations

import copy
from typing import Collection

import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import PoolingType

from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection
from torchrec_pss.quantize import Int8Memory


def collapse(module: CompressedEmbeddingBagCollection) -> EmbeddingBagCollection | CompressedEmbeddingBagCollection:
    """A copy of ``module`` whose tables held by a method with ``collapses_for_inference`` are plain tables.

    See :func:`with_plain_tables` for the result's type and values.
    """
    return with_plain_tables(
        module, [name for name in module.compression if type(module.memory_for(name)).collapses_for_inference]
    )


def with_plain_tables(
    module: CompressedEmbeddingBagCollection, tables: Collection[str]
) -> EmbeddingBagCollection | CompressedEmbeddingBagCollection:
    """A copy of ``module`` in which the compressed ``tables`` are plain ``[n, d]`` float32 tables.

    Each is materialised in float64 (``PSSMemory.materialize``) and cast to float32, so outputs equal the module's
    up to float32 rounding. Plain tables keep copies of their weights; the other compressed tables keep copies of
    their memories, int8 ones included. A share group of which only some tables became plain keeps the same memory
    (same size, values and hash constants) for the rest, configured by
    :meth:`~torchrec_pss.contract.PSSMemory.config_of_a_subset` (ROBE: its ``memory_size``), so that the result's
    ``compression`` rebuilds it and its state_dict loads into that rebuild; an int8 memory is kept whole. The result
    is a ``torchrec.EmbeddingBagCollection`` when no compressed table is left, except for a weighted module with a
    MEAN table (``nn.EmbeddingBag`` refuses per-sample weights with MEAN): that, and a module with compressed tables
    left, is a ``CompressedEmbeddingBagCollection`` (same keys, ``embedding_bags.<table>.weight`` for plain tables).
    """
    configs = module.embedding_bag_configs()
    made_plain = set(tables)
    keep = {name: config for name, config in module.compression.items() if name not in made_plain}
    for name in keep:
        memory = module.memory_for(name)
        if not isinstance(memory, Int8Memory) and made_plain & set(memory.tables):
            keep[name] = memory.config_of_a_subset()
    device = next(module.parameters()).device
    weighted_mean = module.is_weighted() and any(t.pooling == PoolingType.MEAN for t in configs)
    if keep or weighted_mean:
        result = CompressedEmbeddingBagCollection(configs, keep, device, is_weighted=module.is_weighted(),
                                                  validate_inputs=module.validate_inputs)
        for group in list(result.pss_memories):
            copy_memory(module, result, group)
    else:
        result = EmbeddingBagCollection(configs, is_weighted=module.is_weighted(), device=device)
    with torch.no_grad():
        for table in configs:
            memory = module.memory_for(table.name)
            if memory is None:
                weight = module.embedding_bags[table.name].weight
            elif table.name in keep:
                continue
            else:
                weight = memory.materialize(table.name)
            result.embedding_bags[table.name].weight.copy_(weight)  # cast while copying: no float32 temporary
    return result


def copy_memory(source: CompressedEmbeddingBagCollection, target: CompressedEmbeddingBagCollection, group: str) -> None:
    """Give ``target`` the memory ``group`` of ``source``: an int8 one as it is (inference-only: no optimizer attached
    to copy along), a float one's values loaded into ``target``'s memory of that group, whose tables may be some of
    the source's (per-table buffers keep those tables' entries)."""
    memory, original = target.pss_memories[group], source.pss_memories[group]
    if isinstance(original, Int8Memory):
        target.pss_memories[group] = copy.deepcopy(original)
        return
    state = original.state_dict()
    rows = [list(original.tables).index(table) for table in memory.tables]
    for name in original.per_table_buffers:
        state[name] = state[name][rows]
    memory.load_state_dict(state)
