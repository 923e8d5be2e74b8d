"""Warm start (PSS paper §2.4): a signed ROBE memory ``M = S·E`` sketched from trained tables.

Flatten the tables of one ROBE memory into ``e`` (``N = Σ_t n_t·d_t`` elements). ROBE's recovery is
``Ẽ = Sᵀ M`` for the sparse matrix ``S ∈ {0, ±1}^{|M| × N}`` with one non-zero per column,
``S[h(t, x, i), (t, x, i)] = g(t, x, i)`` (position and sign hashes of
:mod:`torchrec_pss_plugins.robe.robe`): a one-row CountSketch, the sparse JLT that §2.5 of the paper puts
in place of the dense Gaussian ``S`` of theorem 5. So ``M = S·e`` — every element ``E_t[x, i]`` added
with its sign at its position — is the memory that recovers ``Sᵀ S e``, the paper's
``M(M, x) = (S e_x)ᵀ M``.

Error. A query ``<E[x], v>`` is ``<u, e>`` with ``u = e_x ⊗ v``; the sketched model answers ``<S u, S e>``.
With pairwise independent signs and uniform positions the error ``<Ẽ[x], v> - <E[x], v>`` has mean 0 and

    Var = (‖u‖²‖e‖² + <u, e>² - 2 Σ_k u_k² e_k²) / |M|
        = (‖E‖_F² + <E[x], v>² - 2 Σ_i v_i² E[x, i]²) / |M|     (‖v‖ = 1)
        ≈ ‖E‖_F² / |M|,

with ``‖E‖_F`` over every table sharing the memory. This is the JLT condition of definition 4 for the pair
``(u, e)``: theorem 5 applied to the flattened table (one column, ``N`` rows, ``σ = ‖E‖_F``) with corollary
6's ``k = |M| = Ω(σ²/ε² · log(N/δ))`` bounds all ``N`` recovered elements at once by
``ε ≈ ‖E‖_F · sqrt(c · log(N/δ) / |M|)``: the typical error ``‖E‖_F / sqrt(|M|)`` times a union-bound factor
(``log(n/δ)`` for the ``n`` queries ``<E[x], v>`` of one ``v``). So the error shrinks as ``1 / sqrt(|M|)``, and
relative to the table it is ``‖Ẽ - E‖_F / ‖E‖_F ≈ sqrt(N / |M|)``, the square root of the compression.
ROBE's hashes are universal, not random, so single seeds stray from that mean. Measured on a 4000 x 16 Gaussian
table, three seeds each, for Z = 1, 4 and 16: 0.89-1.05x the predicted mean squared error at compression >= 8;
at compression 2-4 single seeds range 0.69-1.83x. The position hash is linear in the id and the block (the
paper's universal family), so some coefficient sets leave part of ``M`` unused: over seeds 0-19 on five shapes
(8000 x 32 at 16x with Z = 1 and 4, 100k x 64 at 100x with Z = 32, 100k x 16 at 10x with Z = 1, 1M x 16 at 100x
with Z = 16) the colliding pairs of positions were 0.93-0.99x the uniform count at the median and up to 1.41-1.77x
for single seeds (the default seed 0 on 8000 x 32, Z = 1, 16x: 1.41x), and the sketch's squared error grows with
them (1.37-1.66x the prediction in those cases).

The sketch is unbiased only with signs (``use_sign=True``): without them every colliding element adds its
value, a bias of ``Σ E / |M|`` per element, so unsigned configs are refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_pss.collapse import copy_memory
from torchrec_pss.compress import ConfigChoice, _check_named_tables, _mapping
from torchrec_pss.contract import MethodConfig
from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

DEFAULT_ROWS_PER_CHUNK = 1 << 16


@torch.no_grad()
def sketch_from_pretrained(
    ebc: EmbeddingBagCollection | CompressedEmbeddingBagCollection,
    config: ConfigChoice,
    rows_per_chunk: int = DEFAULT_ROWS_PER_CHUNK,
) -> CompressedEmbeddingBagCollection:
    """A ``CompressedEmbeddingBagCollection`` whose ROBE memories are sketched from ``ebc``'s trained tables.

    ``config`` chooses the tables exactly as in :func:`torchrec_pss.compress_`: one ``RobeConfig`` for every
    plain table, a mapping table -> ``RobeConfig``, or a callable ``(EmbeddingBagConfig) -> RobeConfig | None``
    (e.g. a parsed flag); every chosen method must have a sketch (``PSSMemory.sketch_``: ROBE, with
    ``use_sign=True``; others raise ``ValueError``). Tables sharing
    a ``share_group`` are summed into one memory, ``M = Σ_t S_t·E_t`` (see the module docstring for the
    error). Tables not chosen stay plain and keep their weights; in a ``CompressedEmbeddingBagCollection``
    its compressed tables keep their method and memory, int8 ones included (a sketched table may not join their
    group).

    One pass over the rows, ``rows_per_chunk`` at a time: extra memory ``|M|`` float64 accumulators plus
    ``rows_per_chunk · d`` positions and signs. The accumulation runs in float64; ``M`` is float32.
    """
    if rows_per_chunk < 1:
        raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
    device = next(ebc.parameters()).device  # not ebc.device: a module built on meta keeps that after to_empty
    if device.type == "meta":
        raise ValueError("sketch_from_pretrained needs trained tables, got a module on the meta device")
    _check_named_tables(config, [ebc])
    tables = ebc.embedding_bag_configs()
    previous = ebc.compression if isinstance(ebc, CompressedEmbeddingBagCollection) else {}
    chosen = _chosen_configs(config, [t for t in tables if t.name not in previous], previous)
    module = CompressedEmbeddingBagCollection(tables, {**previous, **chosen}, device, is_weighted=ebc.is_weighted())
    for name, bag in module.embedding_bags.items():
        bag.weight.copy_(ebc.embedding_bags[name].weight)
    for group, memory in list(module.pss_memories.items()):
        names = set(memory.tables)
        if names.isdisjoint(chosen):
            copy_memory(ebc, module, group)
        elif names <= set(chosen):
            memory.sketch_({name: ebc.embedding_bags[name].weight for name in memory.tables}, rows_per_chunk)
        else:
            raise ValueError(
                f"memory group {group!r} would hold sketched tables {sorted(names & set(chosen))} and tables "
                f"{sorted(names - set(chosen))} that are already compressed; give the sketched ones another share_group"
            )
    return module


def _chosen_configs(config: ConfigChoice, plain: list[EmbeddingBagConfig],
                    previous: Mapping[str, MethodConfig]) -> dict[str, MethodConfig]:
    """The config of every plain table ``config`` chooses (``ValueError`` for an already compressed one)."""
    if isinstance(config, Mapping):
        compressed = sorted(set(config) & set(previous))
        if compressed:
            raise ValueError(f"tables {compressed} are already compressed; only plain tables can be sketched")
    return _mapping(config, plain)
