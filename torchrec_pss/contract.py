"""The parameter-sharing setup (PSS) contract every compression method implements.

Definition 1 of the PSS paper: a compressed table is a learnable memory ``M`` plus a recovery
function ``M(M, id) -> R^d``. A method is a :class:`PSSMemory` subclass (an ``nn.Module`` that owns
``M`` for one or more tables) together with its frozen :class:`MethodConfig` dataclass. The core
(:class:`~torchrec_pss.CompressedEmbeddingBagCollection`) only talks to this interface.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar, Mapping, NamedTuple, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.config_checks import float32_tables
from torchrec_pss.pooling import lengths_to_offsets, pool

IN_SIGNATURE = "pss_in_signature"
"""Dataclass-field metadata key; ``False`` leaves the field out of the recovery signature."""


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base class of every method's frozen config dataclass.

    Fields whose ``metadata`` has ``IN_SIGNATURE: False`` (initialisation, gradient layout, sizes that
    the parameter shapes already pin down, ...) may differ between a checkpoint and the module that
    loads it; every other field is part of the recovery signature and must match.
    """

    def group_key(self, table_name: str) -> str:
        """Tables whose configs return the same key share one memory. Default: one memory per table."""
        return table_name

    def signature(self) -> dict[str, Any]:
        """The fields that determine how embeddings are recovered (compared when a state_dict is loaded)."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.metadata.get(IN_SIGNATURE, True)
        }


class BagRequest(NamedTuple):
    """Bags of one table to pool: ``ids`` ``[N]`` int64, ``lengths`` ``[S]`` (sum ``N``), ``weights`` ``[N]`` or None;
    ``offsets`` ``[S + 1]`` int64 when the caller has them already (a KJT computes them), else None."""

    table: str
    ids: torch.Tensor
    lengths: torch.Tensor
    weights: torch.Tensor | None
    mean: bool
    offsets: torch.Tensor | None = None

    def bag_offsets(self) -> torch.Tensor:
        """The bags' offsets ``[S + 1]``: ``offsets`` when given, else computed from ``lengths``."""
        return lengths_to_offsets(self.lengths) if self.offsets is None else self.offsets


class PSSMemory(nn.Module, abc.ABC):
    """A learnable memory shared by ``tables`` and the recovery function reading it.

    Subclasses set ``name`` (the registry / command-line name, e.g. ``"robe"``) and are registered
    for their config class with :func:`torchrec_pss.registry.register_method`. Parameters are the
    learnable memory; persistent buffers are recovery constants (hash coefficients, ...), which a
    state_dict must reproduce exactly to be loaded.
    """

    name: ClassVar[str]
    config_cls: ClassVar[type[MethodConfig]]
    collapses_for_inference: ClassVar[bool] = False
    """True for training-time factorisations (MLET) that :func:`torchrec_pss.collapse` turns into plain tables."""
    per_table_buffers: ClassVar[tuple[str, ...]] = ()
    """Buffers with one entry per table, in ``tables``' order: a checkpoint listing the tables in another order
    has them permuted into this order when loaded."""

    def __init__(
        self,
        config: MethodConfig,
        tables: Sequence[EmbeddingBagConfig],
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}"
            )
        float32_tables(self.name, tables)
        self.config = config
        self.tables: dict[str, EmbeddingBagConfig] = {t.name: t for t in tables}

    @abc.abstractmethod
    def recover(self, table: str, ids: torch.Tensor) -> torch.Tensor:
        """Embeddings of ``ids`` (int64, shape ``[N]``, already range-checked) of ``table``: ``[N, d]`` float32."""

    @abc.abstractmethod
    def num_bytes(self) -> int:
        """Bytes this memory actually stores: learnable parameters plus recovery constants."""

    @abc.abstractmethod
    def reset_parameters(self) -> None:
        """(Re)initialise the memory and recompute every recovery constant from the config.

        Called on construction and by DistributedModelParallel after meta-device materialisation.
        """

    def optimizer_block_size(self, param: torch.Tensor) -> int:
        """Elements per accumulator of a row-wise optimizer for ``param``: a row, or one element of a 1-D memory."""
        return param[0].numel() if param.dim() > 1 else 1

    def config_of_a_subset(self) -> MethodConfig:
        """The config of a memory holding only some of this memory's tables with this memory's size and values
        (:func:`~torchrec_pss.collapse.with_plain_tables` when the others become plain): ``config`` itself unless
        the size follows from the tables."""
        return self.config

    def materialize(self, table: str) -> torch.Tensor:
        """The full ``[n, d]`` table in float64, written block by block from :meth:`recover` (methods may do better):
        no more memory than the table and one block's rows."""
        config = self.tables[table]
        device = next(self.parameters()).device
        out = torch.empty(config.num_embeddings, config.embedding_dim, dtype=torch.float64, device=device)
        with torch.no_grad():
            for start in range(0, config.num_embeddings, 1 << 16):
                ids = torch.arange(start, min(start + (1 << 16), config.num_embeddings), device=device)
                out[start : start + ids.numel()] = self.recover(table, ids)
        return out

    def quantized(self, block_size: int) -> PSSMemory | None:
        """An inference-only int8 copy of this memory (``block_size``: elements per scale where the method
        scales blocks), or None when the method has none: it then stays float32 (see
        :func:`torchrec_pss.quantize_memories_`)."""
        return None

    def sketch_(self, weights: Mapping[str, torch.Tensor], rows_per_chunk: int) -> None:
        """Set the memory, in place, from trained tables ``weights`` (table -> ``[n, d]``) so that it recovers
        them approximately (warm start, see :func:`torchrec_pss.sketch_from_pretrained`), reading
        ``rows_per_chunk`` rows at a time. Methods without a sketch raise ``ValueError``."""
        raise ValueError(f"method {self.name!r} (tables {sorted(self.tables)}) cannot be sketched from trained tables")

    def pooled(
        self,
        table: str,
        ids: torch.Tensor,
        lengths: torch.Tensor,
        weights: torch.Tensor | None,
        mean: bool,
    ) -> torch.Tensor:
        """Pooled embeddings of bags (``lengths``: ``[S]``, sum = ``len(ids)``): ``[S, d]``.

        The default recovers every id and pools with :func:`torchrec_pss.pooling.pool`; a method
        may override it with a fused kernel that gives the same values.
        """
        return pool(self.recover(table, ids), lengths, weights, mean)

    def pooled_many(self, requests: Sequence[BagRequest]) -> list[torch.Tensor]:
        """Pooled embeddings ``[S_r, d_r]`` of every request: all the reads of this memory in one forward pass.

        The default pools each request with :meth:`pooled`; a method may pool them in fewer kernel calls
        (ROBE: one per embedding width, SUM and MEAN tables together, which also lets its fused Adagrad see the step's
        whole gradient of a memory shared by several tables).
        """
        return [self.pooled(r.table, r.ids, r.lengths, r.weights, r.mean) for r in requests]

    def pooled_stacked(self, tables: Sequence[str], ids: torch.Tensor, offsets: torch.Tensor,
                       weights: torch.Tensor | None, mean: bool, bags_per_table: int) -> torch.Tensor | None:
        """Pooled embeddings ``[T·B, d]`` of ``B = bags_per_table`` bags of each of the ``T`` ``tables`` (one
        width and pooling mode), stacked table after table as a KJT holds them (``offsets`` ``[T·B + 1]``), in one
        pass without splitting the batch per table; or None where the method pools table by table (the module
        then calls :meth:`pooled_many`). The default returns None."""
        return None
