"""torchrec-pss: parameter-shared (compressed) embedding tables for TorchRec.

Method configs (``RobeConfig``, ...) are exported from here through the method registry, so that
``from torchrec_pss import RobeConfig`` works for every installed method without the core naming one.
"""

from typing import Any

from torchrec_pss.collapse import collapse
from torchrec_pss.compress import compress_
from torchrec_pss.contract import MethodConfig, PSSMemory
from torchrec_pss.decompress import decompress
from torchrec_pss.flags import CompressionFlag, parse_compression_flag
from torchrec_pss.modules import CompressedEmbeddingBagCollection
from torchrec_pss.quantize import quantize_memories_
from torchrec_pss.registry import (
    failed_entry_points,
    method_by_name,
    method_for_config,
    register_method,
    registered_methods,
)
from torchrec_pss.sketch import sketch_from_pretrained

__all__ = [
    "CompressedEmbeddingBagCollection",
    "CompressionFlag",
    "MethodConfig",
    "PSSMemory",
    "collapse",
    "compress_",
    "decompress",
    "failed_entry_points",
    "method_by_name",
    "method_for_config",
    "parse_compression_flag",
    "quantize_memories_",
    "register_method",
    "registered_methods",
    "sketch_from_pretrained",
]


def __getattr__(name: str) -> Any:
    for method in registered_methods().values():
        if method.config_cls.__name__ == name:
            return method.config_cls
    failed = failed_entry_points()
    hint = f" (method entry points that failed to load: {sorted(failed.values())})" if failed else ""
    raise AttributeError(f"module 'torchrec_pss' has no attribute {name!r}{hint}")
