"""torchx components of torchrec-pss (installed as ``torchrec_pss_torchx``)."""
