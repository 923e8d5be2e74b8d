"""Single-process modules."""

from torchrec_pss.modules.compressed_embedding_bag_collection import CompressedEmbeddingBagCollection

__all__ = ["CompressedEmbeddingBagCollection"]
