"""MLET: a two-layer factorised table for training, collapsed to a plain table for inference."""

from torchrec_pss_plugins.mlet.config import MLETConfig
from torchrec_pss_plugins.mlet.mlet import MLETMemory

__all__ = ["MLETConfig", "MLETMemory"]
