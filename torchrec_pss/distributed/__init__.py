"""Distributed training of compressed memories: replicated (data-parallel) gradient sync and checks."""

from torchrec_pss.distributed.checksum import assert_replicas_identical, bit_checksum
from torchrec_pss.distributed.gradient_sync import ReplicatedGradientSync, replicate_gradients

__all__ = ["ReplicatedGradientSync", "assert_replicas_identical", "bit_checksum", "replicate_gradients"]
