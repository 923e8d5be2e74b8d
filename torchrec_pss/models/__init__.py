"""Model presets."""

from torchrec_pss.models.presets import MLPERF_NUM_EMBEDDINGS, PRESETS, DLRMPreset

__all__ = ["DLRMPreset", "MLPERF_NUM_EMBEDDINGS", "PRESETS"]
