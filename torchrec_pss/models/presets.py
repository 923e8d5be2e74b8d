"""DLRM / DLRM-DCNv2 presets: the MLPerf Criteo-TB configuration and a small one for quick runs."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torchrec import EmbeddingBagCollection
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig

MLPERF_NUM_EMBEDDINGS = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10, 2209, 11938, 155, 4,
    976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)


@dataclasses.dataclass(frozen=True)
class DLRMPreset:
    """Table sizes and architecture of a DLRM (DCNv2 when ``dcn_num_layers`` is set)."""

    name: str
    num_embeddings: tuple[int, ...]
    embedding_dim: int
    dense_arch_layer_sizes: tuple[int, ...]
    over_arch_layer_sizes: tuple[int, ...]
    dcn_num_layers: int | None
    dcn_low_rank_dim: int | None
    learning_rate: float
    batch_size: int

    def tables(self) -> list[EmbeddingBagConfig]:
        """One table per Criteo categorical feature, named ``t_<feature>``."""
        return [
            EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=self.embedding_dim, num_embeddings=n,
                               feature_names=[feature])
            for feature, n in zip(DEFAULT_CAT_NAMES, self.num_embeddings)
        ]

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """The torchrec DLRM (or DLRM_DCN) of this preset; build large presets on ``"meta"``."""
        ebc = EmbeddingBagCollection(self.tables(), device=torch.device(device))
        common = dict(embedding_bag_collection=ebc, dense_in_features=13,
                      dense_arch_layer_sizes=list(self.dense_arch_layer_sizes),
                      over_arch_layer_sizes=list(self.over_arch_layer_sizes), dense_device=torch.device(device))
        if self.dcn_num_layers is None:
            return DLRM(**common)
        return DLRM_DCN(**common, dcn_num_layers=self.dcn_num_layers, dcn_low_rank_dim=self.dcn_low_rank_dim)


PRESETS: dict[str, DLRMPreset] = {
    "mlperf_dcnv2": DLRMPreset(
        name="mlperf_dcnv2", num_embeddings=MLPERF_NUM_EMBEDDINGS, embedding_dim=128,
        dense_arch_layer_sizes=(512, 256, 128), over_arch_layer_sizes=(1024, 1024, 512, 256, 1),
        dcn_num_layers=3, dcn_low_rank_dim=512, learning_rate=0.005, batch_size=65536,
    ),
    "small": DLRMPreset(
        name="small", num_embeddings=tuple(min(n, 100_000) for n in MLPERF_NUM_EMBEDDINGS), embedding_dim=16,
        dense_arch_layer_sizes=(64, 16), over_arch_layer_sizes=(64, 32, 1), dcn_num_layers=None,
        dcn_low_rank_dim=None, learning_rate=0.05, batch_size=512,
    ),
}
