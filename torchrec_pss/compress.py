"""``compress_``: swap a model's EmbeddingBagCollections for compressed ones (torchao's ``quantize_`` style)."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import MethodConfig
from torchrec_pss.flags import CompressionFlag
from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

ConfigChoice = Union[MethodConfig, Mapping[str, MethodConfig], Callable[[EmbeddingBagConfig], Union[MethodConfig, None]]]
FilterFn = Callable[[nn.Module, str], bool]


def compress_(model: nn.Module, config: ConfigChoice, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace every ``torchrec.EmbeddingBagCollection`` in ``model`` accepted by ``filter_fn(module, fqn)``.

    ``config`` is one method config for every table, a mapping table name -> config (other tables stay
    plain), or a callable ``(EmbeddingBagConfig) -> config | None``. A mapping, or a parsed flag's
    per-table overrides, applies to the whole model: naming a table that no accepted EBC has is a
    ``ValueError``, raised before anything is replaced. Each replacement is a
    ``CompressedEmbeddingBagCollection`` with the same tables, feature order, pooling and weightedness,
    on the device of the EBC's parameters and in its training mode; plain tables keep their current weights,
    ``requires_grad`` and ``sparse`` flag, compressed ones start from their method's init. An EBC registered under
    several names (accepted under any of them, ``filter_fn`` sees every one) is replaced by one module under all
    of them. All replacements are built before the first is put in place; the rest of the model is untouched.
    Returns ``model`` (or the replacement when ``model`` itself is an EBC). A model whose embedding modules are
    sharded already (wrapped by ``DistributedModelParallel``) is refused: compress before sharding.
    """
    if _accepted(model, "", filter_fn):
        _check_named_tables(config, [model])
        return _compressed(model, config)
    places: dict[EmbeddingBagCollection, list[tuple[nn.Module, str]]] = {}
    chosen: dict[EmbeddingBagCollection, None] = {}
    for fqn, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if type(child) is not EmbeddingBagCollection:
                continue
            places.setdefault(child, []).append((parent, name))
            if child not in chosen and _accepted(child, f"{fqn}.{name}" if fqn else name, filter_fn):
                chosen[child] = None
    if not chosen:
        sharded = [fqn for fqn, module in model.named_modules() if isinstance(module, ShardedModule)]
        if sharded:
            raise ValueError(f"compress_: the model's embedding modules are sharded already ({sharded}); call "
                             "compress_ before DistributedModelParallel shards the model")
    _check_named_tables(config, list(chosen))
    replacements = {ebc: _compressed(ebc, config) for ebc in chosen}
    for ebc, replacement in replacements.items():
        for parent, name in places[ebc]:
            setattr(parent, name, replacement)
    return model


def _accepted(module: nn.Module, fqn: str, filter_fn: FilterFn | None) -> bool:
    return type(module) is EmbeddingBagCollection and (filter_fn is None or filter_fn(module, fqn))


def _check_named_tables(config: ConfigChoice, ebcs: Sequence[EmbeddingBagCollection]) -> None:
    """``ValueError`` when a mapping or a flag's overrides name a table that none of ``ebcs`` has."""
    if isinstance(config, Mapping):
        named = set(config)
    elif isinstance(config, CompressionFlag):
        named = set(config.overrides)
    else:
        return
    available = sorted({table.name for ebc in ebcs for table in ebc.embedding_bag_configs()})
    unknown = sorted(named - set(available))
    if unknown and not ebcs:
        raise ValueError(f"compression config names tables {unknown}, but no torchrec.EmbeddingBagCollection is "
                         "being compressed (filter_fn accepted none, or the model's are compressed already)")
    if unknown:
        raise ValueError(f"compression config names tables {unknown} that no EmbeddingBagCollection being compressed "
                         f"has; tables: {available}")


def _mapping(config: ConfigChoice, tables: list[EmbeddingBagConfig]) -> dict[str, MethodConfig]:
    names = [t.name for t in tables]
    if isinstance(config, MethodConfig):
        return {name: config for name in names}
    if isinstance(config, Mapping):
        unknown = sorted(set(config) - set(names))
        if unknown:
            raise ValueError(f"compression config names tables {unknown} that this EBC does not have; it has {names}")
        return dict(config)
    if callable(config):
        return {t.name: chosen for t in tables if (chosen := config(t)) is not None}
    raise TypeError(f"config must be a method config, a mapping or a callable, got {config!r}")


def _device(ebc: EmbeddingBagCollection) -> torch.device:
    """Where ``ebc``'s weights are (``ebc.device`` stays the construction device after ``to_empty``)."""
    devices = {parameter.device for parameter in ebc.parameters()}
    if len(devices) > 1:
        raise ValueError(f"EmbeddingBagCollection with tables {[t.name for t in ebc.embedding_bag_configs()]} has "
                         f"parameters on several devices: {sorted(map(str, devices))}")
    return devices.pop() if devices else ebc.device


@torch.no_grad()
def _compressed(ebc: EmbeddingBagCollection, config: ConfigChoice) -> CompressedEmbeddingBagCollection:
    """``ebc`` rebuilt with the tables ``config`` picks compressed; its plain tables keep their weights,
    ``requires_grad`` and ``sparse`` flag, the module its training mode."""
    tables = ebc.embedding_bag_configs()
    if isinstance(config, Mapping):
        names = {t.name for t in tables}
        config = {name: chosen for name, chosen in config.items() if name in names}
    module = CompressedEmbeddingBagCollection(tables, _mapping(config, tables), _device(ebc), is_weighted=ebc.is_weighted())
    for name, bag in module.embedding_bags.items():
        source = ebc.embedding_bags[name]
        if not source.weight.is_meta and not bag.weight.is_meta:
            bag.weight.copy_(source.weight)
        bag.weight.requires_grad_(source.weight.requires_grad)
        bag.sparse = source.sparse
    return module.train(ebc.training)
