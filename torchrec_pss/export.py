"""Serving: ``torch.export`` of models holding compressed tables, and loading the saved programs.

The custom ops of the methods (``torchrec_pss::robe_pooled``, ``qr_pooled``, ``tt_pooled``) have fake
kernels, so a model with :class:`~torchrec_pss.CompressedEmbeddingBagCollection` modules (any method,
MLET too; :func:`torchrec_pss.collapse` first makes MLET tables plain) exports like one with TorchRec's
``EmbeddingBagCollection``: non-strict tracing, ``KeyedJaggedTensor`` in (TorchRec registers it with
pytree), ids and batch size symbolic. :func:`export_for_inference` sets this up in one call;
:func:`load_exported` loads a program saved with ``torch.export.save`` in a fresh process.
"""

from __future__ import annotations

import os
from typing import IO, Any

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.export import Dim, ExportedProgram, ShapesCollection
from torch.utils import _pytree as pytree
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from torchrec_pss.registry import registered_methods


def export_for_inference(model: nn.Module, example_inputs: tuple[Any, ...], *, dynamic: bool = True) -> ExportedProgram:
    """The inference forward of ``model`` on ``example_inputs`` (its positional arguments) as an ``ExportedProgram``.

    - Traced non-strict, in eval mode and without autograd; the training flag of ``model`` and of each of its
      submodules is restored.
    - The input checks of every ``CompressedEmbeddingBagCollection`` whose ``validate_inputs`` is on are traced
      as asserts: the program refuses ids outside a table, negative lengths and non-finite weights with a
      ``RuntimeError`` naming the table and feature. Turn ``validate_inputs`` off before exporting for a
      program without them.
    - Every ``KeyedJaggedTensor`` in ``example_inputs`` is traced as a KJT of keys, values, lengths (and
      weights): call the program with KJTs that carry lengths (TorchRec's batches do; for one built from
      offsets only pass ``lengths=kjt.lengths()`` as well). The KJTs must have one batch size for every key:
      a variable-batch (VBE) example is refused, and the program cannot tell a VBE KJT it is called with
      (its per-key batch sizes are not among the KJT's flattened tensors), so do not serve those.
    - ``dynamic``: the batch size ``B`` is symbolic (dim 0 of every tensor argument, and ``B x len(keys)``
      lengths of every KJT) and so is the id count of each KJT (its weights with it); ``B = 1`` is not
      specialised (``backed_size_oblivious``). Otherwise every shape is that of ``example_inputs``.
    """
    inputs = pytree.tree_map(_with_lengths, example_inputs, is_leaf=lambda x: isinstance(x, KeyedJaggedTensor))
    shapes = _dynamic_shapes(inputs) if dynamic else None
    was_training = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad(), fx_config.patch(backed_size_oblivious=True):
            return torch.export.export(
                model, inputs, dynamic_shapes=None if shapes is None else shapes.dynamic_shapes(model, inputs),
                strict=False,
            )
    finally:
        for module, training in was_training.items():
            module.training = training


def load_exported(path: str | os.PathLike[str] | IO[bytes]) -> ExportedProgram:
    """``torch.export.load`` of a program that holds compressed tables, in any process.

    Imports every registered method first (their custom ops must exist to deserialize the graph) and
    allows the KJT classes in the saved example inputs.
    """
    registered_methods()
    with torch.serialization.safe_globals([KeyedJaggedTensor, JaggedTensor]):
        return torch.export.load(path)


def _with_lengths(value: Any) -> Any:
    """A KJT rebuilt from keys, values, lengths and weights (no offsets, no caches); other values as they are.

    ``ValueError`` for a variable-batch (VBE) KJT: its per-key batch sizes would be lost in the rebuilt one.
    """
    if not isinstance(value, KeyedJaggedTensor):
        return value
    if value.variable_stride_per_key() or value.inverse_indices_or_none() is not None:
        raise ValueError(
            f"export_for_inference: the example KJT with keys {value.keys()} has variable batch sizes per key "
            "(VBE); the program is traced for fixed-stride KJTs (one batch size B for every key), so give such an "
            "example and serve such batches"
        )
    return KeyedJaggedTensor(keys=value.keys(), values=value.values(), lengths=value.lengths(),
                             weights=value.weights_or_none())


def _dynamic_shapes(inputs: tuple[Any, ...]) -> ShapesCollection:
    """Batch ``B`` on dim 0 of every tensor and in every KJT's lengths; one free id count per KJT."""
    shapes = ShapesCollection()
    batch = Dim("batch", min=1)
    leaves = pytree.tree_leaves(inputs, is_leaf=lambda x: isinstance(x, KeyedJaggedTensor))
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, KeyedJaggedTensor):
            ids = Dim(f"ids_{index}")
            shapes[leaf.values()] = (ids,)
            if leaf.weights_or_none() is not None:
                shapes[leaf.weights()] = (ids,)
            shapes[leaf.lengths()] = (batch * len(leaf.keys()),)
        elif isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            shapes[leaf] = (batch,) + (Dim.STATIC,) * (leaf.dim() - 1)
    return shapes
