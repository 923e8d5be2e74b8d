"""Distributed training of compressed memories: replicated (data-parallel) gradient sync and checks."""

from torchrec_pss.distributed.budget import compression_for_budget, parse_bytes
from torchrec_pss.distributed.checksum import assert_replicas_identical, bit_checksum
from torchrec_pss.distributed.constraints import make_planner, pss_constraints
from torchrec_pss.distributed.gradient_sync import ReplicatedGradientSync, replicate_gradients
from torchrec_pss.distributed.sharder import (
    CompressedEmbeddingBagCollectionSharder,
    ShardedCompressedEmbeddingBagCollection,
    get_pss_sharders,
)

__all__ = [
    "CompressedEmbeddingBagCollectionSharder",
    "ReplicatedGradientSync",
    "ShardedCompressedEmbeddingBagCollection",
    "get_pss_sharders",
    "make_planner",
    "assert_replicas_identical",
    "bit_checksum",
    "compression_for_budget",
    "parse_bytes",
    "pss_constraints",
    "replicate_gradients",
]
