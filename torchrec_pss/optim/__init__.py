"""Fused (in-backward) optimizers for compressed memories."""

from torchrec_pss.optim.blockwise_adagrad import BlockwiseAdagrad
from torchrec_pss.optim.fused import PSSFusedOptimizer
from torchrec_pss.optim.fused_update import FusedUpdate

__all__ = ["BlockwiseAdagrad", "FusedUpdate", "PSSFusedOptimizer"]
