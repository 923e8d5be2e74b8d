"""Applications: the DLRM training job (``python -m torchrec_pss.app.dlrm_main``)."""
