"""DistributedModelParallel support: compressed memories replicated, plain tables sharded by TorchRec.

``CompressedEmbeddingBagCollectionSharder`` shards a ``CompressedEmbeddingBagCollection``: every
compressed table must be planned DATA_PARALLEL (see :func:`~torchrec_pss.distributed.pss_constraints`)
and its memory is replicated on every rank, kept in sync by :class:`ReplicatedGradientSync`; the plain
tables become a ``torchrec.EmbeddingBagCollection`` sharded by TorchRec's own sharder with their part of
the plan. The sharded module keeps the unsharded module's state_dict keys (``embedding_bags.<table>.*``,
``pss_memories.<group>.*``, ``_extra_state``) and its fused optimizer combines TorchRec's and ours.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import KJTList
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.types import (
    Awaitable,
    EmbeddingModuleShardingPlan,
    LazyAwaitable,
    LazyNoWait,
    NoWait,
    ModuleSharder,
    QuantizedCommCodecs,
    ShardedModule,
    ShardingEnv,
    ShardingType,
)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor
from torchrec.streamable import Multistreamable

from torchrec_pss.contract import PSSMemory
from torchrec_pss.distributed.constraints import REPLICATED_KERNEL
from torchrec_pss.distributed.gradient_sync import ReplicatedGradientSync
from torchrec_pss.modules.compressed_embedding_bag_collection import (
    CompressedEmbeddingBagCollection,
    _check_state_dict_before_load,
)
from torchrec_pss.modules.input_checks import check_structure, check_values, split_by_feature
from torchrec_pss.optim import FusedUpdate, PSSFusedOptimizer

_PLAIN = "_plain"
_STAND_IN_DTYPE = torch.float32
"""The dtype of the planner's stand-ins for compressed tables (their rows hold the bytes really stored)."""


@dataclasses.dataclass
class CompressedEBCContext(Multistreamable):
    """The sharded module's context: the plain tables' TorchRec context, whose sharding contexts it shows."""

    plain: Multistreamable | None = None

    @property
    def sharding_contexts(self) -> list:
        return getattr(self.plain, "sharding_contexts", [])

    def record_stream(self, stream: torch.Stream) -> None:
        if self.plain is not None:
            self.plain.record_stream(stream)


class ShardedCompressedEmbeddingBagCollection(
    ShardedModule[KJTList, KeyedTensor, KeyedTensor, "CompressedEBCContext"], FusedOptimizerModule
):
    """The sharded form of a :class:`CompressedEmbeddingBagCollection` (see the module docstring)."""

    def __init__(
        self,
        module: CompressedEmbeddingBagCollection,
        plan: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: str,
        ebc_sharder: EmbeddingBagCollectionSharder,
    ) -> None:
        super().__init__(ebc_sharder.qcomm_codecs_registry)
        for table in module.compression:
            sharding = plan.get(table)
            if sharding is None or sharding.sharding_type != ShardingType.DATA_PARALLEL.value:
                got = None if sharding is None else sharding.sharding_type
                raise ValueError(
                    f"{module_fqn}: compressed table {table!r} must be planned {ShardingType.DATA_PARALLEL.value} "
                    f"(replicated), got {got}; merge torchrec_pss.distributed.pss_constraints(model) into the "
                    "planner's constraints"
                )
        self._env = env
        self._signatures = module.get_extra_state()
        compressed = [t for t in module.embedding_bag_configs() if t.name in module.compression]
        plain = [t for t in module.embedding_bag_configs() if t.name not in module.compression]
        # The compressed tables' pooling, reading this module's memories; held in a list so that it stays
        # out of the module tree (the memories are registered once, as ``pss_memories``).
        self._local = [CompressedEmbeddingBagCollection(compressed, module.compression, "meta",
                                                        is_weighted=module.is_weighted(), validate_inputs=False)
                       ] if compressed else []
        self._tables = module.embedding_bag_configs()
        self._feature_names = module._flat_feature_names
        self._is_weighted = module.is_weighted()
        self.validate_inputs = module.validate_inputs
        if self._local:
            self._local[0].pss_memories = module.pss_memories
        self._optimizer_tags = {  # kept: materialising meta parameters replaces them, dropping their attributes
            name: (p._optimizer_classes, [dict(k) for k in p._optimizer_kwargs])
            for name, p in module.pss_memories.named_parameters(prefix="pss_memories")
            if getattr(p, "_optimizer_classes", None)
        }
        self.pss_memories = _materialised(module.pss_memories, device)
        self._tag_memories()
        # A stand-in of the unsharded module for its pre-load check: every table (plain ones on meta, costing
        # nothing) and this module's memories; held in a list so that it stays out of the module tree.
        self._unsharded = [CompressedEmbeddingBagCollection(self._tables, module.compression, "meta",
                                                            is_weighted=module.is_weighted(), validate_inputs=False)]
        self._unsharded[0].pss_memories = self.pss_memories
        self._sync: ReplicatedGradientSync | None = None
        self._fused: PSSFusedOptimizer | None = None
        if plain:
            ebc = EmbeddingBagCollection(plain, is_weighted=module.is_weighted(), device=torch.device("meta"))
            for table in plain:
                weight = module.embedding_bags[table.name].weight
                ebc.embedding_bags[table.name].weight = weight
            sub_plan = EmbeddingModuleShardingPlan({t.name: plan[t.name] for t in plain})
            setattr(self, _PLAIN, ebc_sharder.shard(ebc, sub_plan, env, device, f"{module_fqn}.{_PLAIN}"))
        self._table_order = [
            (t.name in module.compression, len(t.feature_names) * t.embedding_dim) for t in module.embedding_bag_configs()
        ]
        self._embedding_names = module._embedding_names
        self._lengths_per_embedding = module._lengths_per_embedding
        self._register_state_dict_hook(_drop_plain_prefix)
        # The unsharded module's check first: it reads the keys as saved, before the plain tables' are renamed.
        self.register_load_state_dict_pre_hook(_check_as_unsharded)
        self.register_load_state_dict_pre_hook(_add_plain_prefix)

    def _tag_memories(self) -> dict[str, nn.Parameter]:
        """The memories' parameters by name, each carrying its in-backward optimizer tags again.

        Materialising meta parameters replaces them by untagged ones; without ``_in_backward_optimizers``
        TorchRec's ``in_backward_optimizer_filter`` would hand them to the dense optimizer as well.
        """
        params = dict(self.pss_memories.named_parameters(prefix="pss_memories"))
        for name, (classes, kwargs) in self._optimizer_tags.items():
            param = params[name]
            param._optimizer_classes, param._optimizer_kwargs = classes, kwargs
            if not hasattr(param, "_in_backward_optimizers"):
                param._in_backward_optimizers = []
        return params

    def _replication(self) -> tuple[ReplicatedGradientSync, PSSFusedOptimizer]:
        """Fused updates and gradient sync for the memories, built on first use (after DMP materialised them)."""
        if self._sync is None:
            params = self._tag_memories()
            updates = {}
            for name in self._optimizer_tags:
                param = params[name]
                block = self.pss_memories[name.split(".")[1]].optimizer_block_size(param)
                updates[name] = FusedUpdate.from_tags(name, param, block)
                param._in_backward_optimizers[:] = [updates[name]]
            self._broadcast_from_first_rank()
            self._sync = ReplicatedGradientSync(params, updates, self._env.process_group)
            self._fused = PSSFusedOptimizer(updates)
        return self._sync, self._fused

    @torch.no_grad()
    def _broadcast_from_first_rank(self) -> None:
        """Start every replica from the first rank's memory (initialisation may differ per rank)."""
        group = self._env.process_group
        source = dist.get_global_rank(group, 0) if group is not None else 0
        for tensor in [*self.pss_memories.parameters(), *self.pss_memories.buffers()]:
            dist.broadcast(tensor, src=source, group=group)

    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        _, ours = self._replication()
        parts: list[tuple[str, KeyedOptimizer]] = [("", ours)]
        plain = getattr(self, _PLAIN, None)
        if isinstance(plain, FusedOptimizerModule):
            parts.append(("", plain.fused_optimizer))
        return CombinedOptimizer(parts)

    @property
    def unsharded_module_type(self) -> type[CompressedEmbeddingBagCollection]:
        return CompressedEmbeddingBagCollection

    def get_extra_state(self) -> Any:
        return self._signatures

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: the pre-load check already refused a state with other signatures."""

    def create_context(self) -> CompressedEBCContext:
        return CompressedEBCContext()

    def input_dist(self, ctx: CompressedEBCContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        """TorchRec's input dist for the plain tables, then the features as they are for the replicas.

        One ``KJTListSplitsAwaitable``, as TrainPipelineSparseDist needs to fuse the splits all-to-alls.
        The features are checked first, against every table (``validate_inputs``, as the unsharded module).
        """
        if self.validate_inputs:
            check_structure(features, self._feature_names, self._is_weighted)
            check_values(features, split_by_feature(features), self._tables, self._is_weighted)
        awaitables: list = []
        plain = getattr(self, _PLAIN, None)
        if plain is not None:
            ctx.plain = plain.create_context()
            awaitables.extend(plain.input_dist(ctx.plain, features).awaitables)
        awaitables.append(NoWait(NoWait(features)))
        return KJTListSplitsAwaitable(awaitables, ctx)

    def compute(self, ctx: CompressedEBCContext, dist_input: KJTList) -> KeyedTensor:
        """Plain tables through TorchRec's sharded EBC, compressed ones locally; columns in table order."""
        self._replication()
        kjts = list(dist_input)
        plain = getattr(self, _PLAIN, None)
        parts = {
            True: self._local[0].pool(kjts[-1]).values() if self._local else None,
            False: plain.compute_and_output_dist(ctx.plain, KJTList(kjts[:-1])).values() if plain is not None else None,
        }
        offsets = {True: 0, False: 0}
        columns = []
        for compressed, width in self._table_order:
            columns.append(parts[compressed][:, offsets[compressed] : offsets[compressed] + width])
            offsets[compressed] += width
        return KeyedTensor(self._embedding_names, self._lengths_per_embedding, torch.cat(columns, dim=1))

    def output_dist(self, ctx: CompressedEBCContext, output: KeyedTensor) -> LazyAwaitable[KeyedTensor]:
        return LazyNoWait(output)


def _materialised(memories: nn.ModuleDict, device: torch.device) -> nn.ModuleDict:
    """The memories on ``device``; built on meta, they are allocated and initialised here, as TBE does
    for its tables (DMP's own materialisation would come after it collected the fused optimizers)."""
    if not any(p.is_meta for p in memories.parameters()):
        return memories.to(device)
    memories.to_empty(device=device)
    for memory in memories.values():
        memory.reset_parameters()
    return memories


def _drop_plain_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}{_PLAIN}.")]:
        state_dict[prefix + key[len(prefix) + len(_PLAIN) + 1 :]] = state_dict.pop(key)


def _check_as_unsharded(module: ShardedCompressedEmbeddingBagCollection, state_dict: dict[str, Any], prefix: str,
                        *args: Any) -> None:
    """Load pre-hook: the unsharded module's refusal of another method, signature, shape or constants, before
    anything is copied (it may also put the checkpoint's per-table constants into this module's table order)."""
    _check_state_dict_before_load(module._unsharded[0], state_dict, prefix, *args)


def _add_plain_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(f"{prefix}embedding_bags.")]:
        state_dict[f"{prefix}{_PLAIN}.{key[len(prefix):]}"] = state_dict.pop(key)


class CompressedEmbeddingBagCollectionSharder(ModuleSharder[CompressedEmbeddingBagCollection]):
    """Sharder for :class:`CompressedEmbeddingBagCollection`: compressed tables DATA_PARALLEL, plain ones
    as TorchRec's EBC sharder offers. ``fused_params`` go to TorchRec's sharder for the plain tables."""

    def __init__(self, fused_params: dict[str, Any] | None = None,
                 qcomm_codecs_registry: dict[str, QuantizedCommCodecs] | None = None) -> None:
        super().__init__(qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder = EmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry=qcomm_codecs_registry)

    @property
    def module_type(self) -> type[CompressedEmbeddingBagCollection]:
        return CompressedEmbeddingBagCollection

    @property
    def fused_params(self) -> dict[str, Any] | None:
        """The fused params handed to TorchRec's sharder (TorchRec's planner estimators read them)."""
        return self._ebc_sharder.fused_params

    def shardable_parameters(self, module: CompressedEmbeddingBagCollection) -> dict[str, nn.Parameter]:
        """Plain tables' weights, and for each compressed table a meta stand-in of its share of the memory.

        The planner charges ``numel × element_size`` of each stand-in (plus optimizer state for an
        ``_optimizer_classes`` tag, which the stand-ins do not carry). A stand-in is float32 of shape
        ``(rows, d)``, its ``rows × d × 4`` bytes the table's share of what its memory group really holds:
        the memory and its recovery constants (``num_bytes()``) plus the state of the in-backward optimizer
        the group's parameters carry, as the fused update keeps it (e.g. BlockwiseAdagrad: one accumulator
        per ``optimizer_block_size`` elements). The group's bytes are split over its tables in proportion to
        their logical sizes, each share rounded up to whole rows (less than ``4·d`` bytes over).
        """
        stored = {id(m): m.num_bytes() + _optimizer_state_bytes(g, m) for g, m in module.pss_memories.items()}
        params: dict[str, nn.Parameter] = {}
        for table in module.embedding_bag_configs():
            memory = module.memory_for(table.name)
            if memory is None:
                params[table.name] = module.embedding_bags[table.name].weight
                continue
            logical = {t.name: t.num_embeddings * t.embedding_dim for t in memory.tables.values()}
            row_bytes = table.embedding_dim * _STAND_IN_DTYPE.itemsize
            share = stored[id(memory)] * logical[table.name]
            rows = -(-share // (sum(logical.values()) * row_bytes))
            params[table.name] = nn.Parameter(torch.empty(rows, table.embedding_dim, dtype=_STAND_IN_DTYPE, device="meta"))
        return params

    def sharding_types(self, compute_device_type: str) -> list[str]:
        return self._ebc_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        kernels = self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)
        if sharding_type == ShardingType.DATA_PARALLEL.value and REPLICATED_KERNEL not in kernels:
            kernels = [REPLICATED_KERNEL, *kernels]
        return kernels

    def shard(
        self,
        module: CompressedEmbeddingBagCollection,
        params: EmbeddingModuleShardingPlan,
        env: ShardingEnv,
        device: torch.device | None = None,
        module_fqn: str | None = None,
    ) -> ShardedCompressedEmbeddingBagCollection:
        return ShardedCompressedEmbeddingBagCollection(
            module, params, env, device or torch.device("cpu"), module_fqn or "", self._ebc_sharder
        )


def _optimizer_state_bytes(group: str, memory: PSSMemory) -> int:
    """Bytes of the state that the in-backward optimizers of memory group ``group``'s parameters keep, fused
    as the module and its sharded form run them (the state is built on meta: nothing is allocated)."""
    total = 0
    for name, param in memory.named_parameters(prefix=f"pss_memories.{group}"):
        if not getattr(param, "_optimizer_classes", None):
            continue
        stand_in = torch.empty_like(param, device="meta")
        stand_in._optimizer_classes, stand_in._optimizer_kwargs = param._optimizer_classes, param._optimizer_kwargs
        update = FusedUpdate.from_tags(name, stand_in, memory.optimizer_block_size(param))
        total += sum(t.numel() * t.element_size() for t in update.state.values())
    return total


def get_pss_sharders(fused_params: dict[str, Any] | None = None) -> list[ModuleSharder[nn.Module]]:
    """The sharders to put before ``get_default_sharders()`` in the planner and in DMP."""
    return [CompressedEmbeddingBagCollectionSharder(fused_params)]
