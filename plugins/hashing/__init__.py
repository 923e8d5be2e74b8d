"""The hashing trick: whole-row hashing into ``k`` buckets, the baseline every paper compares against."""

from torchrec_pss_plugins.hashing.config import HashingConfig
from torchrec_pss_plugins.hashing.hashing import HashingMemory

__all__ = ["HashingConfig", "HashingMemory"]
