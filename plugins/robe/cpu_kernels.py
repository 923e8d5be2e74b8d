"""ROBE-Z CPU kernels: a C++ extension (``csrc/robe_cpu.cpp``) compiled on first use.

:func:`load` builds it with ``torch.utils.cpp_extension.load`` (``-O3``, OpenMP through ``at::parallel_for``)
for this CPU (``-march=native``; one build directory per CPU model and feature set) into
``$TORCHREC_PSS_EXTENSIONS_DIR`` (default ``~/.cache/torchrec_pss/extensions``) and returns the module,
or None — with a logged warning — when it cannot be built, so callers fall back to the pure-torch path.
The functions (plain tensors, ints and floats; ``weights`` may be None; ``offsets`` ``[B + 1]``; the two
coefficient arguments are the rows of ``RobeMemory.hash_coefficients``):

- ``robe_pooled_forward(memory, ids, offsets, weights, location_coefficients, sign_coefficients, table_key,
  dim, chunk_size, use_sign, mean) -> [B, dim]``: equals ``RobeMemory.pooled``.
- ``robe_pooled_backward(grad_out, ids, offsets, weights, location_coefficients, sign_coefficients, table_key,
  memory_size, dim, chunk_size, use_sign, mean) -> [|M|]``: the dense gradient of ``M``.
- ``robe_sgd_update_(memory, grad_out, ids, offsets, weights, location_coefficients, sign_coefficients,
  table_key, chunk_size, use_sign, mean, lr)``: backward fused with ``p -= lr·g`` in place.
- ``robe_adagrad_update_(memory, accumulator, grad_out, ids, offsets, weights, location_coefficients,
  sign_coefficients, table_key, chunk_size, use_sign, mean, lr, eps, block_size)``: backward fused with
  blockwise Adagrad (``block_size = 1``: elementwise) in place; ``lr`` is the decayed ``clr`` of
  :class:`~torchrec_pss.optim.FusedUpdate` and ``accumulator`` has ``ceil(|M| / block_size)`` entries.
- ``robe_weights_grad(memory, grad_out, ids, offsets, location_coefficients, sign_coefficients, table_key,
  chunk_size, use_sign, mean) -> [N]``: the gradient of the per-sample weights.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
from pathlib import Path
from types import ModuleType

from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

EXTENSION_NAME = "torchrec_pss_robe_cpu"
SOURCE = Path(__file__).parent / "csrc" / "robe_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-fopenmp"]


def build_directory() -> Path:
    """The cache of compiled extensions: ``$TORCHREC_PSS_EXTENSIONS_DIR``, else ``~/.cache/torchrec_pss/extensions``."""
    root = os.environ.get("TORCHREC_PSS_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torchrec_pss" / "extensions"


def cpu_fingerprint() -> str:
    """A short hash of this CPU's model and features, so a ``-march=native`` build is reused on the same CPUs only."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})
    text = "\n".join(lines) or platform.processor() or platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


@functools.cache
def load() -> ModuleType | None:
    """The compiled ROBE CPU kernels, or None (with a warning) when the extension cannot be built or loaded."""
    try:
        directory = build_directory() / f"{EXTENSION_NAME}-{cpu_fingerprint()}"
        directory.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(SOURCE)],
            extra_cflags=CFLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(directory),
        )
    except Exception as error:  # noqa: BLE001 - any build or load failure means: use the pure-torch path
        logger.warning("ROBE CPU kernels unavailable (%s: %s); using the pure-torch path", type(error).__name__, error)
        return None
