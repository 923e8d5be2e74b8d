"""A deterministic synthetic Criteo-like click stream: 13 dense + 26 sparse features, power-law ids,
labels from a planted logistic model (so AUC is meaningful)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

NUM_DENSE = 13
EFFECT_BUCKETS = 1 << 16
"""Planted per-id effects are read from this many buckets per feature (id mod buckets), so 40M-row
features need no 40M-entry table."""


class SyntheticCriteo:
    """Batches of the synthetic stream. ``seed`` fixes the planted model; ``stream`` picks the sample
    sequence drawn from it (one per rank, another for evaluation). Equal arguments give equal batches.

    Ids of feature ``f`` are ``floor(n_f · u^skew)`` for uniform ``u`` — a power law where small ids are
    frequent (``skew`` > 1 makes it steeper). The label is Bernoulli(sigmoid(logit)) with
    ``logit = dense · w + scale · Σ_f effect_f[id_f mod 2^16] + bias``.
    """

    def __init__(self, num_embeddings: Sequence[int], seed: int = 0, stream: int = 0, skew: float = 3.0,
                 scale: float = 0.5, bias: float = -1.0) -> None:
        if len(num_embeddings) != len(DEFAULT_CAT_NAMES):
            raise ValueError(f"num_embeddings needs {len(DEFAULT_CAT_NAMES)} values, got {len(num_embeddings)}")
        self.num_embeddings = list(num_embeddings)
        self.skew, self.scale, self.bias = skew, scale, bias
        planted = torch.Generator().manual_seed(seed)
        self.dense_weights = torch.randn(NUM_DENSE, generator=planted) / NUM_DENSE**0.5
        self.effects = torch.randn(len(num_embeddings), EFFECT_BUCKETS, generator=planted)
        self.generator = torch.Generator().manual_seed((seed + 1) * 1_000_003 + stream)

    def batch(self, batch_size: int) -> Batch:
        g = self.generator
        dense = torch.rand(batch_size, NUM_DENSE, generator=g).mul(8).exp().floor().log1p()
        ids = torch.stack([
            (torch.rand(batch_size, generator=g).pow(self.skew) * n).long().clamp(max=n - 1)
            for n in self.num_embeddings
        ])  # [26, B]
        effect = self.effects.gather(1, ids % EFFECT_BUCKETS).sum(0)
        standardised = (dense - dense.mean()) / dense.std().clamp(min=1e-6)
        logit = standardised @ self.dense_weights + self.scale * effect + self.bias
        labels = torch.bernoulli(torch.sigmoid(logit), generator=g)
        sparse = KeyedJaggedTensor(keys=list(DEFAULT_CAT_NAMES), values=ids.reshape(-1),
                                   lengths=torch.ones(ids.numel(), dtype=torch.int32))
        return Batch(dense_features=dense, sparse_features=sparse, labels=labels)

    def batches(self, batch_size: int, count: int) -> Iterator[Batch]:
        for _ in range(count):
            yield self.batch(batch_size)
