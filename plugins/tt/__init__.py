"""TT-Rec tensor-train embeddings."""

from torchrec_pss_plugins.tt.config import TTConfig
from torchrec_pss_plugins.tt.shapes import TTShapes, suggest_tt_shapes
from torchrec_pss_plugins.tt.tt import TTMemory

__all__ = ["TTConfig", "TTMemory", "TTShapes", "suggest_tt_shapes"]
