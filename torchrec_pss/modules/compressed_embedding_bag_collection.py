"""``CompressedEmbeddingBagCollection``: a drop-in ``EmbeddingBagCollection`` with compressed tables."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType, pooling_type_to_str
from torchrec.modules.embedding_modules import (
    EmbeddingBagCollectionInterface,
    get_embedding_names_by_table,
    process_pooled_embeddings,
    reorder_inverse_indices,
)
from torchrec.optim.fused import FusedOptimizerModule
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor
from torchrec.sparse.tensor_dict import maybe_td_to_kjt

from torchrec_pss.contract import BagRequest, MethodConfig, PSSMemory
from torchrec_pss.modules.input_checks import check_structure, check_values, inputs_checked_by_default, split_by_feature
from torchrec_pss.optim import FusedUpdate, PSSFusedOptimizer
from torchrec_pss.pooling import embedding_bag
from torchrec_pss.registry import method_for_config

PLAIN = "plain"
_EXTRA_STATE = "_extra_state"


class CompressedEmbeddingBagCollection(EmbeddingBagCollectionInterface, FusedOptimizerModule):
    """An ``EmbeddingBagCollection`` whose tables named in ``compression`` are compressed memories.

    ``forward(KeyedJaggedTensor) -> KeyedTensor`` gives exactly the keys, order and per-key
    dimensions of ``torchrec.EmbeddingBagCollection(tables)``: one ``[B, d]`` block per feature of
    every table, in table order (a feature read by several tables is named ``feature@table``).
    Tables not named in ``compression`` stay ordinary ``nn.EmbeddingBag`` tables with the state
    keys ``embedding_bags.<table>.weight`` of an EBC; compressed tables read memory groups stored
    under ``pss_memories.<group>.*`` (tables whose configs have the same ``group_key`` share one).

    Pooling: SUM or MEAN; with ``is_weighted`` every embedding is multiplied by its KJT weight before
    pooling (a weighted MEAN divides the weighted sum by the bag length, as FBGEMM's TBE does);
    empty bags give zeros, and a batch of no bags gives ``[0, d]`` blocks.

    Input checks (``validate_inputs``; by default on unless the environment sets
    ``TORCHREC_PSS_VALIDATE=0``; the attribute can be changed at any time, e.g. off in benchmarks):
    features missing from or unknown to the module (torchrec's EBC ignores unknown ones), non-integer
    ids, lengths that do not match the ids, negative lengths, ids outside ``[0, num_embeddings)``, weights of the wrong count or
    dtype, NaN / inf weights each raise ``ValueError`` / ``TypeError`` naming the table, feature and value
    (see :mod:`torchrec_pss.modules.input_checks`; a good batch costs one device synchronisation).

    Fused optimizers, the TorchRec way: ``torchrec.optim.apply_optimizer_in_backward(cls, module.parameters(),
    kwargs)`` makes the update of those parameters run inside backward (their ``.grad`` stays None);
    the module replaces torch's per-parameter optimizers by :class:`~torchrec_pss.optim.FusedUpdate`
    (dense or sparse, as the gradient comes) and exposes them as ``fused_optimizer``.
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        compression: Mapping[str, MethodConfig] | None = None,
        device: torch.device | str | None = None,
        *,
        is_weighted: bool = False,
        validate_inputs: bool | None = None,
    ) -> None:
        super().__init__()
        self.validate_inputs = inputs_checked_by_default() if validate_inputs is None else validate_inputs
        compression = dict(compression or {})
        _validate_tables(tables, compression)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        self._is_weighted = is_weighted
        self._embedding_bag_configs = list(tables)
        for table in self._embedding_bag_configs:
            if not table.feature_names:
                table.feature_names = [table.name]
        self._compression = compression
        self.embedding_bags = nn.ModuleDict()
        self.pss_memories = nn.ModuleDict()
        self._group_of: dict[str, str] = {}
        self._fused_updates: dict[str, FusedUpdate] = {}
        self._named_parameters: list[tuple[str, nn.Parameter]] | None = None
        self._unset_constants: dict[str, tuple[torch.Tensor, int]] = {}
        """Recovery constants materialised from meta and not written since: ``key -> (buffer, its version then)``."""
        groups: dict[str, tuple[MethodConfig, list[EmbeddingBagConfig]]] = {}
        for table in self._embedding_bag_configs:
            config = compression.get(table.name)
            if config is None:
                self.embedding_bags[table.name] = nn.EmbeddingBag(
                    table.num_embeddings,
                    table.embedding_dim,
                    mode=pooling_type_to_str(table.pooling),
                    include_last_offset=True,
                    device=self._device,
                    dtype=torch.float32 if table.data_type == DataType.FP32 else torch.float16,  # as torchrec's EBC
                )
                continue
            group = config.group_key(table.name).replace(".", "_")
            if group in groups and groups[group][0] != config:
                other = groups[group][1][0].name
                raise ValueError(
                    f"tables {other!r} and {table.name!r} share memory group {group!r} but have different "
                    f"configs: {groups[group][0]} vs {config}"
                )
            groups.setdefault(group, (config, []))[1].append(table)
            self._group_of[table.name] = group
        for group, (config, group_tables) in groups.items():
            try:
                self.pss_memories[group] = method_for_config(config)(config, group_tables, self._device)
            except (RuntimeError, MemoryError) as error:  # e.g. a memory too large to allocate or to size
                raise RuntimeError(
                    f"tables {[t.name for t in group_tables]}: cannot build their memory for {config}: {error}"
                ) from error
        self._compressed_plan = [
            (t.name, list(t.feature_names), t.pooling == PoolingType.MEAN, self._group_of[t.name])
            for t in self._embedding_bag_configs if t.name in self._group_of
        ]
        """``(table, features, mean, memory group)`` of every compressed table, in table order."""
        self._embedding_names = [n for names in get_embedding_names_by_table(tables) for n in names]
        self._lengths_per_embedding = [
            t.embedding_dim for t in self._embedding_bag_configs for _ in t.feature_names
        ]
        self._flat_feature_names = [f for t in self._embedding_bag_configs for f in t.feature_names]
        self._stacked_plan = _stacked_plan(self._embedding_bag_configs, self._group_of, self._flat_feature_names)
        """What a KJT of exactly the module's features, in order, needs for one :meth:`PSSMemory.pooled_stacked` pass."""
        self._reset_plain_tables()
        self.register_load_state_dict_pre_hook(_check_state_dict_before_load)

    def embedding_bag_configs(self) -> list[EmbeddingBagConfig]:
        return self._embedding_bag_configs

    def is_weighted(self) -> bool:
        return self._is_weighted

    @property
    def device(self) -> torch.device:
        """Where the parameters are (after ``to_empty`` or an ``assign=True`` load too); else the construction device."""
        return next((p.device for p in self.parameters()), self._device)

    @property
    def compression(self) -> dict[str, MethodConfig]:
        """The method config of every compressed table (plain tables are absent)."""
        return dict(self._compression)

    def memory_for(self, table: str) -> PSSMemory | None:
        """The memory holding ``table``, or None for a plain table."""
        group = self._group_of.get(table)
        return None if group is None else self.pss_memories[group]

    def num_bytes(self) -> dict[str, int]:
        """Stored bytes per memory group and per plain table (keyed by group / table name)."""
        sizes = {g: m.num_bytes() for g, m in self.pss_memories.items()}
        for name, bag in self.embedding_bags.items():
            sizes[name] = bag.weight.numel() * bag.weight.element_size()
        return sizes

    def reset_parameters(self) -> None:
        """Re-initialise plain tables with their ``init_fn`` and every memory with its own rule."""
        self._reset_plain_tables()
        for memory in self.pss_memories.values():
            memory.reset_parameters()
        self._unset_constants = {}

    def _reset_plain_tables(self) -> None:
        for table in self._embedding_bag_configs:
            bag = self.embedding_bags[table.name] if table.name in self.embedding_bags else None
            if bag is not None and not bag.weight.is_meta:
                table.init_fn(bag.weight)

    @property
    def fused_optimizer(self) -> PSSFusedOptimizer:
        """The KeyedOptimizer of every parameter given an in-backward optimizer (keys: parameter names)."""
        self._adopt_in_backward_optimizers()
        return PSSFusedOptimizer(self._fused_updates)

    def _adopt_in_backward_optimizers(self, named_parameters: Iterable[tuple[str, nn.Parameter]] | None = None
                                      ) -> None:
        """Swap the torch optimizers that ``apply_optimizer_in_backward`` attached for fused updates.

        torch's backward hook steps whatever ``param._in_backward_optimizers`` holds, then drops the
        gradient; the swap keeps that hook and changes only what it steps. ``named_parameters``: the
        parameters to look at (default: all of them, found afresh).
        """
        for name, param in self.named_parameters() if named_parameters is None else named_parameters:
            optimizers = getattr(param, "_in_backward_optimizers", None)
            if not optimizers or optimizers == [self._fused_updates.get(name)]:
                continue
            group = name.split(".")[1] if name.startswith("pss_memories.") else None
            block = self.pss_memories[group].optimizer_block_size(param) if group else param[0].numel()
            update = FusedUpdate.from_tags(name, param, block)
            optimizers[:] = [update]
            self._fused_updates[name] = update

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if isinstance(features, torch.fx.Proxy):
            raise TypeError(
                "torch.fx cannot trace through a CompressedEmbeddingBagCollection (its pooling branches on the "
                "batch); trace it as a leaf module: torchrec.fx.symbolic_trace(model, "
                "leaf_modules=['CompressedEmbeddingBagCollection'])"
            )
        if self._named_parameters is None:  # cleared by loading a state_dict and by _apply (may swap parameters)
            self._named_parameters = list(self.named_parameters())
        self._adopt_in_backward_optimizers(self._named_parameters)
        return self.pool(features)

    def _apply(self, fn: Any, recurse: bool = True) -> CompressedEmbeddingBagCollection:
        self._named_parameters = None
        unset = {key for key, tensor in self._constants().items() if tensor.is_meta or self._constant_unset(key, tensor)}
        super()._apply(fn, recurse)
        self._unset_constants = {
            key: (tensor, tensor._version) for key, tensor in self._constants().items() if key in unset and not tensor.is_meta
        }
        return self

    def _constants(self) -> dict[str, torch.Tensor]:
        """The memories' recovery constants (their buffers), by state_dict key."""
        return {f"pss_memories.{g}.{n}": b for g, m in self.pss_memories.items() for n, b in m.named_buffers()}

    def _constant_unset(self, key: str, tensor: torch.Tensor) -> bool:
        """True while ``tensor`` holds what materialising from meta (``to_empty``) left: no value to compare."""
        recorded = self._unset_constants.get(key)
        return recorded is not None and recorded[0] is tensor and tensor._version == recorded[1]

    def pool(self, features: KeyedJaggedTensor) -> KeyedTensor:
        """The forward pass without taking over in-backward optimizers (for wrappers that own them)."""
        features = maybe_td_to_kjt(features, None)
        if self.validate_inputs:
            check_structure(features, self._flat_feature_names, self._is_weighted)
        if features.lengths().numel() == 0:  # no bags (KJT.to_dict cannot split an empty batch)
            trainable = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            dtype = _pooled_dtype(*(p.dtype for p in self.parameters() if p.is_floating_point()))
            values = torch.zeros(0, sum(self._lengths_per_embedding), dtype=dtype, device=features.values().device,
                                 requires_grad=trainable)  # a loss on it back-propagates, changing nothing
            return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding, values=values)
        if self.validate_inputs:
            check_values(features, split_by_feature(features), self._embedding_bag_configs, self._is_weighted)
        stacked = self._pooled_stacked(features)
        if stacked is not None:
            return KeyedTensor(keys=self._embedding_names, length_per_key=self._lengths_per_embedding,
                               values=stacked.to(_pooled_dtype(stacked.dtype)))
        inverse_indices = reorder_inverse_indices(
            inverse_indices=features.inverse_indices_or_none(),
            feature_names=self._flat_feature_names,
        )
        feature_dict = features.to_dict()
        compressed = self._pooled_compressed(feature_dict)
        pooled: list[torch.Tensor] = []
        for table in self._embedding_bag_configs:
            if table.name in self.embedding_bags:
                pooled.extend(self._pooled_plain(table, feature_dict[f]) for f in table.feature_names)
            else:
                pooled.extend(block.to(_pooled_dtype(block.dtype)) for block in compressed[table.name])
        return KeyedTensor(
            keys=self._embedding_names,
            values=pooled[0] if len(pooled) == 1 and features.inverse_indices_or_none() is None  # no copy
            else process_pooled_embeddings(pooled_embeddings=pooled, inverse_indices=inverse_indices),
            length_per_key=self._lengths_per_embedding,
        )

    def _pooled_plain(self, table: EmbeddingBagConfig, jt: JaggedTensor) -> torch.Tensor:
        """One feature of a plain table, as an EBC pools it; a weighted MEAN is the weighted sum / length."""
        bag = self.embedding_bags[table.name]
        if not self._is_weighted:
            return bag(input=jt.values(), offsets=jt.offsets()).to(_pooled_dtype(bag.weight.dtype))
        return embedding_bag(jt.values(), bag.weight, jt.offsets(), jt.weights(), table.pooling == PoolingType.MEAN,
                             bag.sparse).to(_pooled_dtype(bag.weight.dtype))

    def _pooled_stacked(self, features: KeyedJaggedTensor) -> torch.Tensor | None:
        """The KeyedTensor's values ``[B, T·d]`` from one :meth:`PSSMemory.pooled_stacked` pass over the KJT's ids
        as they lie (no per-feature split), or None where the batch or the memory does not allow it."""
        if (self._stacked_plan is None or features.inverse_indices_or_none() is not None
                or features.variable_stride_per_key() or features.keys() != self._flat_feature_names):
            return None
        group, tables, mean, dim = self._stacked_plan
        batch = features.stride()
        stacked = self.pss_memories[group].pooled_stacked(
            tables, features.values().long(), features.offsets().long(),
            features.weights() if self._is_weighted else None, mean, batch)
        if stacked is None or len(tables) == 1:
            return stacked
        return torch.cat(stacked.view(len(tables), batch, dim).unbind(0), dim=1)  # no guard on B == 1 when traced

    def _pooled_compressed(self, feature_dict: Mapping[str, JaggedTensor]) -> dict[str, list[torch.Tensor]]:
        """Every compressed table's ``[B_f, d]`` blocks, one per feature: one ``pooled_many`` call per memory
        group, with one request per table (its features' bags concatenated)."""
        requests: dict[str, list[BagRequest]] = {}
        bags_per_feature: dict[str, list[int]] = {}
        for name, features, mean, group in self._compressed_plan:
            jagged = [feature_dict[f] for f in features]
            bags_per_feature[name] = [jt.lengths().numel() for jt in jagged]
            weights = _joined([jt.weights() for jt in jagged]) if self._is_weighted else None
            requests.setdefault(group, []).append(BagRequest(
                name, _joined([jt.values() for jt in jagged]).long(), _joined([jt.lengths() for jt in jagged]).long(),
                weights, mean, jagged[0].offsets().long() if len(jagged) == 1 else None,  # KJT.to_dict computed them
            ))
        out: dict[str, list[torch.Tensor]] = {}
        memories = self.pss_memories
        for group, group_requests in requests.items():
            for request, pooled in zip(group_requests, memories[group].pooled_many(group_requests)):
                sizes = bags_per_feature[request.table]
                out[request.table] = [pooled] if len(sizes) == 1 else list(torch.split(pooled, sizes))
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict`` that, when ``strict``, refuses missing or unexpected keys before copying."""
        state_dict = {**state_dict, **_own_extra_state(self, state_dict, "")}
        _checked_state(self, state_dict, "")
        if strict:
            mine, theirs = set(self.state_dict(keep_vars=True)), set(state_dict)
            if mine != theirs:
                raise StateDictMismatchError(
                    f"state_dict does not match this module; missing {sorted(mine - theirs)}, "
                    f"unexpected {sorted(theirs - mine)}; nothing was loaded"
                )
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def get_extra_state(self) -> dict[str, Any]:
        """Method and recovery signature of every table, checked when a state_dict is loaded."""
        return {"tables": self._table_signatures()}

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: the pre-load check already refused a state with other signatures."""

    def _table_signatures(self) -> dict[str, dict[str, Any]]:
        """Every table's method; a compressed table's memory group, its position among the group's tables (the
        row of its per-table constants: a checkpoint's order survives flattening by name, as DCP stores it) and
        the config's recovery signature."""
        signatures: dict[str, dict[str, Any]] = {}
        for table in self._embedding_bag_configs:
            config = self._compression.get(table.name)
            if config is None:
                signatures[table.name] = {"method": PLAIN}
            else:
                group = self._group_of[table.name]
                signatures[table.name] = {
                    "method": method_for_config(config).name,
                    "group": group,
                    "position": list(self.pss_memories[group].tables).index(table.name),
                    "signature": config.signature(),
                }
        return signatures


def _stacked_plan(tables: Sequence[EmbeddingBagConfig], group_of: Mapping[str, str], features: Sequence[str]
                  ) -> tuple[str, list[str], bool, int] | None:
    """``(memory group, tables, MEAN?, d)`` when one memory group holds every table, each table reads one feature
    read by no other, and all have one width and pooling mode; else None."""
    groups = {group_of.get(t.name) for t in tables}
    if (len(groups) != 1 or None in groups or any(len(t.feature_names) != 1 for t in tables)
            or len(set(features)) != len(features) or len({(t.embedding_dim, t.pooling) for t in tables}) != 1):
        return None
    return groups.pop(), [t.name for t in tables], tables[0].pooling == PoolingType.MEAN, tables[0].embedding_dim


def _pooled_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype of pooled blocks read from tables of ``dtypes``: float32 as in torchrec's EBC (which pools half
    precision into float32), float64 for a float64 module (kept for references and gradcheck)."""
    out = torch.float32
    for dtype in dtypes:
        out = torch.promote_types(out, dtype)
    return out


def _joined(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` that returns a single tensor as it is (no copy)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)


class StateDictMismatchError(RuntimeError, ValueError):
    """A strict ``load_state_dict`` whose keys are not the module's: a ``RuntimeError`` as torch raises for it (also
    a ``ValueError``, as this module raised before)."""


def _validate_tables(tables: Sequence[EmbeddingBagConfig], compression: Mapping[str, MethodConfig]) -> None:
    names = [t.name for t in tables]
    seen: set[str] = set()
    for name in names:
        if not name:
            raise ValueError("every EmbeddingBagConfig needs a non-empty name")
        if name in seen:
            raise ValueError(f"duplicate table name {name!r}")
        seen.add(name)
    unknown = sorted(set(compression) - seen)
    if unknown:
        raise ValueError(f"compression names tables that are not in `tables`: {unknown}; tables are {names}")
    for table in tables:
        if table.pooling not in (PoolingType.SUM, PoolingType.MEAN):
            raise ValueError(f"table {table.name!r}: pooling {table.pooling} is not supported; an "
                             "EmbeddingBagCollection pools SUM or MEAN")
    for name, config in compression.items():
        if not isinstance(config, MethodConfig):
            raise TypeError(f"compression[{name!r}] must be a registered method config, got {config!r}")
    for table in tables:
        if table.name in compression and _custom_init(table):
            warnings.warn(f"table {table.name!r}: init_fn / weight_init_min / weight_init_max initialise plain "
                          f"tables only; its {method_for_config(compression[table.name]).name} memory is initialised "
                          "by its method config (e.g. init_scale)", UserWarning, stacklevel=3)


def _custom_init(table: EmbeddingBagConfig) -> bool:
    """Whether ``table`` asks for another init than TorchRec's default ``U(±sqrt(1 / num_embeddings))``."""
    if table.weight_init_min is not None or table.weight_init_max is not None:
        return True
    default = {"a": table.get_weight_init_min(), "b": table.get_weight_init_max()}
    init = table.init_fn
    return not (isinstance(init, functools.partial) and init.func is torch.nn.init.uniform_ and not init.args
                and init.keywords == default)


def _check_state_dict_before_load(
    module: CompressedEmbeddingBagCollection,
    state_dict: dict[str, Any],
    prefix: str,
    local_metadata: Any,
    strict: bool,  # torch passes True here whatever the caller asked; strictness is checked in load_state_dict
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load pre-hook: :func:`_checked_state`, then its per-table constants in this module's table order go into
    ``state_dict`` (torch's own copy of the caller's). Also drops the module's cached parameter list
    (``assign=True`` swaps parameters)."""
    module._named_parameters = None
    state_dict.update(_own_extra_state(module, state_dict, prefix))
    state_dict.update(_checked_state(module, state_dict, prefix))


def _own_extra_state(module: CompressedEmbeddingBagCollection, state_dict: Mapping[str, Any], prefix: str
                     ) -> dict[str, Any]:
    """This module's signatures, to stand in for the ones ``state_dict`` lacks where the module compresses no
    table (an ``EmbeddingBagCollection``'s state_dict then loads strictly: there is nothing to check); else ``{}``."""
    if module.pss_memories or prefix + _EXTRA_STATE in state_dict:
        return {}
    return {prefix + _EXTRA_STATE: module.get_extra_state()}


def _checked_state(module: CompressedEmbeddingBagCollection, state_dict: Mapping[str, Any], prefix: str
                   ) -> dict[str, torch.Tensor]:
    """Refuse, before anything is copied, a state_dict from another method, signature, shape or constants.

    Constants are compared with the module's unless the module has none yet (on meta, or materialised from meta
    and not reset): it then takes the checkpoint's. Returns the checkpoint's per-table constants reordered to this
    module's table order where the checkpoint lists a memory group's tables in another order."""
    saved = state_dict.get(prefix + _EXTRA_STATE)
    theirs: dict[str, dict[str, Any]] = {} if saved is None else saved.get("tables", {})
    if saved is not None:
        mine = module._table_signatures()
        if set(theirs) != set(mine):
            raise ValueError(
                f"{prefix or 'module'}: checkpoint holds tables {sorted(theirs)}, this module {sorted(mine)}"
            )
        for table, sig in mine.items():
            other = theirs[table]
            if other.get("method") != sig["method"]:
                raise ValueError(
                    f"table {table!r}: checkpoint was saved with method {other.get('method')!r}, "
                    f"this module uses {sig['method']!r}; refusing to load"
                )
            diff = {
                k: (other.get("signature", {}).get(k), v)
                for k, v in sig.get("signature", {}).items()
                if other.get("signature", {}).get(k) != v
            }
            if diff or other.get("group") != sig.get("group"):
                details = ", ".join(f"{k}: checkpoint {a!r} vs module {b!r}" for k, (a, b) in diff.items())
                raise ValueError(
                    f"table {table!r} ({sig['method']}): checkpoint recovers embeddings differently "
                    f"({details or 'memory group ' + repr(other.get('group'))}); refusing to load"
                )
    constants = module._constants()
    reordered = _in_module_table_order(module, state_dict, prefix, theirs)
    for key, tensor in module.state_dict(keep_vars=True).items():
        if key == _EXTRA_STATE:
            continue
        incoming = reordered.get(prefix + key, state_dict.get(prefix + key))
        if incoming is None:
            continue
        if tuple(incoming.shape) != tuple(tensor.shape):
            raise ValueError(
                f"{prefix + key}: checkpoint shape {tuple(incoming.shape)} != module shape {tuple(tensor.shape)}"
            )
        if (key in constants and not tensor.is_meta and not module._constant_unset(key, tensor)
                and not torch.equal(incoming.to(tensor.device), tensor)):
            raise ValueError(
                f"{prefix + key}: recovery constants (hash coefficients) differ from this module's; "
                "the checkpoint was made with another seed or tables — refusing to load"
            )
    return reordered


def _in_module_table_order(module: CompressedEmbeddingBagCollection, state_dict: Mapping[str, Any], prefix: str,
                           theirs: Mapping[str, Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """The checkpoint's per-table constants of each memory group whose tables its signatures (``theirs``: each
    table's ``position`` in its group; their order where a signature has none) list in another order than this
    module, permuted into this module's order."""
    out: dict[str, torch.Tensor] = {}
    for group, memory in module.pss_memories.items():
        mine = list(memory.tables)
        in_group = [table for table, sig in theirs.items() if sig.get("group") == group]
        saved_order = sorted(in_group, key=lambda table: theirs[table].get("position", in_group.index(table)))
        if saved_order == mine or sorted(saved_order) != sorted(mine):
            continue
        permutation = [saved_order.index(table) for table in mine]
        for name in memory.per_table_buffers:
            incoming = state_dict.get(f"{prefix}pss_memories.{group}.{name}")
            if isinstance(incoming, torch.Tensor) and tuple(incoming.shape[:1]) == (len(mine),):
                out[f"{prefix}pss_memories.{group}.{name}"] = incoming[permutation]
    return out
