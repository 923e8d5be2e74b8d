"""Compression methods of torchrec-pss, one sub-package each, installed as ``torchrec_pss_plugins``."""
