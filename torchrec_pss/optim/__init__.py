"""Fused (in-backward) optimizers for compressed memories."""

from torchrec_pss.optim.blockwise_adagrad import BlockwiseAdagrad
from torchrec_pss.optim.fused import PSSFusedOptimizer
from torchrec_pss.optim.fused_update import FusedUpdate
from torchrec_pss.optim.release import release_in_backward_optimizers

__all__ = ["BlockwiseAdagrad", "FusedUpdate", "PSSFusedOptimizer", "release_in_backward_optimizers"]
