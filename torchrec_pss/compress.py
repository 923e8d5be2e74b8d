"""``compress_``: swap a model's EmbeddingBagCollections for compressed ones (torchao's ``quantize_`` style)."""

from __future__ import annotations

from typing import Callable, Mapping, Union

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.contract import MethodConfig
from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

ConfigChoice = Union[MethodConfig, Mapping[str, MethodConfig], Callable[[EmbeddingBagConfig], Union[MethodConfig, None]]]
FilterFn = Callable[[nn.Module, str], bool]


def compress_(model: nn.Module, config: ConfigChoice, filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace every ``torchrec.EmbeddingBagCollection`` in ``model`` accepted by ``filter_fn(module, fqn)``.

    ``config`` is one method config for every table, a mapping table name -> config (other tables stay
    plain), or a callable ``(EmbeddingBagConfig) -> config | None``. Each replacement is a
    ``CompressedEmbeddingBagCollection`` with the same tables, feature order, pooling, weightedness and
    device; plain tables keep their current weights, compressed ones start from their method's init.
    The rest of the model is untouched. Returns ``model`` (or the replacement when ``model`` itself is
    an EBC).
    """
    if _accepted(model, "", filter_fn):
        return _compressed(model, config)
    for fqn, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            child_fqn = f"{fqn}.{name}" if fqn else name
            if _accepted(child, child_fqn, filter_fn):
                setattr(parent, name, _compressed(child, config))
    return model


def _accepted(module: nn.Module, fqn: str, filter_fn: FilterFn | None) -> bool:
    return type(module) is EmbeddingBagCollection and (filter_fn is None or filter_fn(module, fqn))


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


@torch.no_grad()
def _compressed(ebc: EmbeddingBagCollection, config: ConfigChoice) -> CompressedEmbeddingBagCollection:
    tables = ebc.embedding_bag_configs()
    module = CompressedEmbeddingBagCollection(tables, _mapping(config, tables), ebc.device, is_weighted=ebc.is_weighted())
    for name, bag in module.embedding_bags.items():
        source = ebc.embedding_bags[name].weight
        if not source.is_meta and not bag.weight.is_meta:
            bag.weight.copy_(source)
    return module
