"""Data sources for the DLRM application."""

from torchrec_pss.datasets.criteo_npy import npy_batches as criteo_npy_batches
from torchrec_pss.datasets.criteo_npy import npy_days
from torchrec_pss.datasets.criteo_text import batches as criteo_text_batches
from torchrec_pss.datasets.criteo_text import read_rows as read_criteo_rows
from torchrec_pss.datasets.synthetic import SyntheticCriteo

__all__ = ["SyntheticCriteo", "criteo_npy_batches", "criteo_text_batches", "npy_days", "read_criteo_rows"]
