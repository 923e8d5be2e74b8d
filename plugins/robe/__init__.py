"""ROBE-Z (and HashedNet = ROBE-1): one shared hashed array per share group."""

from torchrec_pss_plugins.robe.config import RobeConfig
from torchrec_pss_plugins.robe.robe import RobeMemory

__all__ = ["RobeConfig", "RobeMemory"]
