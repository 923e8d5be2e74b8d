"""Checks of a ``KeyedJaggedTensor`` against the tables that read it, with errors that name what is wrong.

Cheap enough to stay on: the structural checks use only Python integers; the value checks are one
reduction per feature (min / max of the ids; one of all lengths; the sum of the weights, which is finite only
when every weight is) folded into one flag tensor, so a good batch costs a single device
synchronisation. Only when that flag is set are the features scanned one by one to name the first bad
feature, position and value. Inside a traced graph (``torch.compile``, ``torch.export``) the checks on values
become asserts that run with the graph (``torch._assert_async``), so tracing needs no graph break.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_pss.device_checks import assert_ids_below

_ID_DTYPES = (torch.int32, torch.int64)
SWITCH = "TORCHREC_PSS_VALIDATE"
"""Environment variable: ``0`` makes new modules skip the input checks by default."""


def inputs_checked_by_default() -> bool:
    """False when ``TORCHREC_PSS_VALIDATE=0``, else True."""
    return os.environ.get(SWITCH, "1") != "0"


def check_structure(features: KeyedJaggedTensor, feature_names: Sequence[str], is_weighted: bool) -> None:
    """Keys, dtypes and sizes of ``features``: raises ``ValueError`` / ``TypeError`` naming the field and value.

    ``feature_names`` are the features the module reads (each must be among the KJT's keys; other keys are
    ignored, as by TorchRec's EBC).
    """
    keys = features.keys()
    missing = [f for f in feature_names if f not in keys]
    if missing:
        raise ValueError(f"KJT lacks features {missing} read by this module; it has {keys}")
    values, lengths, weights = features.values(), features.lengths(), features.weights_or_none()
    if values.dtype not in _ID_DTYPES:
        raise TypeError(f"KJT of features {keys}: ids must be int32 or int64, got {values.dtype}")
    if lengths.dtype not in _ID_DTYPES:
        raise TypeError(f"KJT of features {keys}: lengths must be int32 or int64, got {lengths.dtype}")
    if keys and features.variable_stride_per_key():
        strides = features.stride_per_key()
        if len(strides) != len(keys):
            raise ValueError(
                f"variable-batch KJT has {len(strides)} per-key batch sizes {strides} for its {len(keys)} keys {keys}"
            )
        if sum(strides) != lengths.numel():
            raise ValueError(
                f"variable-batch KJT has {lengths.numel()} lengths but its per-key batch sizes {strides} "
                f"(keys {keys}) add up to {sum(strides)}"
            )
    elif keys and lengths.numel() % len(keys):
        raise ValueError(f"KJT has {lengths.numel()} lengths, not a multiple of its {len(keys)} keys {keys}")
    if is_weighted and weights is None:
        raise ValueError("this CompressedEmbeddingBagCollection is weighted but the KJT has no weights")
    if is_weighted and not weights.is_floating_point():
        raise TypeError(f"KJT of features {keys}: weights must be floating point, got {weights.dtype}")
    if is_weighted and weights.numel() != values.numel():
        raise ValueError(f"KJT of features {keys}: {weights.numel()} weights for {values.numel()} ids")
    if torch.compiler.is_compiling():  # a graph cannot branch on the lengths' sum: asserted when it runs
        torch._assert_async(lengths.sum() == values.numel(),
                            f"KJT of features {keys}: the lengths do not sum to the number of ids")
        return
    total = sum(features.length_per_key())
    if total != values.numel():
        raise ValueError(f"KJT of features {keys}: lengths sum to {total} but there are {values.numel()} ids")


def split_by_feature(features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
    """``features.to_dict()``; where a negative length makes it fail, ``ValueError`` naming the feature, bag and
    length instead of the split's error (a negative length that lets it pass is named by :func:`check_values`)."""
    try:
        return features.to_dict()
    except RuntimeError:
        lengths = features.lengths()
        if lengths.numel() and not torch.compiler.is_compiling() and bool(lengths.min() < 0):
            _raise_negative_length(features)
        raise


def _raise_negative_length(features: KeyedJaggedTensor) -> None:
    """Raise ``ValueError`` naming the feature, bag and value of the KJT's first negative length."""
    lengths = features.lengths()
    position = int(torch.nonzero(lengths < 0)[0])
    strides = features.stride_per_key() if features.variable_stride_per_key() else [features.stride()] * len(features.keys())
    start = 0
    for key, stride in zip(features.keys(), strides):
        if position < start + stride:
            raise ValueError(f"KJT feature {key!r}: bag {position - start} has negative length {int(lengths[position])}")
        start += stride
    raise ValueError(f"KJT: length {int(lengths[position])} at position {position} is negative")


def check_values(
    features: KeyedJaggedTensor, jagged: dict[str, JaggedTensor], tables: Sequence[EmbeddingBagConfig],
    is_weighted: bool
) -> None:
    """Ids in ``[0, num_embeddings)``, lengths ``>= 0`` and finite weights, or an error naming table, feature,
    position and value. ``jagged``: the KJT's ``to_dict()``. Meta tensors hold no values: nothing is checked."""
    if features.values().is_meta or features.lengths().is_meta:
        return
    if torch.compiler.is_compiling():
        _assert_values(features, jagged, tables, is_weighted)
        return
    flags = [features.lengths().min() < 0] if features.lengths().numel() else []
    for table in tables:
        for name in table.feature_names:
            jt = jagged[name]
            if jt.values().numel():
                low, high = torch.aminmax(jt.values())
                flags.append((low < 0) | (high >= table.num_embeddings))
            if is_weighted and jt.weights().numel():
                flags.append(~torch.isfinite(jt.weights().sum()))
    if not flags or not bool(torch.stack(flags).any()):
        return
    for table in tables:
        for name in table.feature_names:
            _explain(table, name, jagged[name], is_weighted)


def _assert_values(features: KeyedJaggedTensor, jagged: dict[str, JaggedTensor], tables: Sequence[EmbeddingBagConfig],
                   is_weighted: bool) -> None:
    """:func:`check_values` inside a traced graph (``torch.compile``, ``torch.export``): asserts that run with the
    graph, without a branch on values or a host synchronisation; a failure raises ``RuntimeError`` naming the
    table and feature (not the position or value)."""
    torch._assert_async((features.lengths() >= 0).all(), f"KJT of features {features.keys()}: a negative length")
    for table in tables:
        for name in table.feature_names:
            where = f"table {table.name!r}, feature {name!r}"
            assert_ids_below(jagged[name].values(), table.num_embeddings, where)
            if is_weighted:
                torch._assert_async(torch.isfinite(jagged[name].weights()).all(), f"{where}: a weight is not finite")


def _bad_ids(ids: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    return (ids < 0) | (ids >= num_embeddings)


def _explain(table: EmbeddingBagConfig, feature: str, jt: JaggedTensor, is_weighted: bool) -> None:
    """Raise for the first bad length, id or weight of one feature (does nothing when it has none)."""
    where = f"table {table.name!r}, feature {feature!r}"
    bad = torch.nonzero(jt.lengths() < 0)
    if bad.numel():
        bag = int(bad[0])
        raise ValueError(f"{where}: bag {bag} has negative length {int(jt.lengths()[bag])}")
    bad = torch.nonzero(_bad_ids(jt.values(), table.num_embeddings))
    if bad.numel():
        position = int(bad[0])
        raise ValueError(
            f"{where}: id {int(jt.values()[position])} is outside [0, {table.num_embeddings}) "
            f"(position {position} of the feature's ids)"
        )
    if is_weighted:
        bad = torch.nonzero(~torch.isfinite(jt.weights()))
        if bad.numel():
            position = int(bad[0])
            raise ValueError(f"{where}: weight {float(jt.weights()[position])} at position {position} is not finite")
