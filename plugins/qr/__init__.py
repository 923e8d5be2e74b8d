"""Quotient-remainder compositional embeddings."""

from torchrec_pss_plugins.qr.config import QRConfig
from torchrec_pss_plugins.qr.qr import QRMemory

__all__ = ["QRConfig", "QRMemory"]
