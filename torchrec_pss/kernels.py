"""Which kernels the methods' custom ops run: their device kernels (default) or the pure-PyTorch references.

``TORCHREC_PSS_KERNELS=reference`` makes every op run its reference implementation and turns off the
fused backward + optimizer kernels (for debugging and for benchmarks of the reference path).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

ENVIRONMENT_VARIABLE = "TORCHREC_PSS_KERNELS"


def reference_only() -> bool:
    """True when ``TORCHREC_PSS_KERNELS=reference`` (read on every call, so it can be switched at run time)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "fast")
    if value not in ("fast", "reference"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: expected 'fast' or 'reference'")
    return value == "reference"


KernelSource = tuple[Callable[[], ModuleType | None], Callable[..., Any]]
"""``(load, call)``: ``load()`` gives the kernel module (or None when unavailable); ``call(module, *op_args)``."""


def register_device_kernels(op: torch.library.CustomOpDef, fallback: Callable[..., Any], *,
                            cpu: KernelSource | None = None, cuda: KernelSource | None = None) -> None:
    """Register ``op``'s CPU / CUDA kernels; each runs ``fallback(*args)`` (the reference) instead when
    its module is unavailable, :func:`reference_only` is set or a floating-point argument is not float32
    (the device kernels' type). Devices without a source keep the op's default (reference) implementation."""
    for device, source in (("cpu", cpu), ("cuda", cuda)):
        if source is None:
            continue
        load, call = source

        def kernel(*args: Any, load: Callable[[], ModuleType | None] = load, call: Callable[..., Any] = call) -> Any:
            kernels = None if reference_only() or not _all_float32(args) else load()
            return fallback(*args) if kernels is None else call(kernels, *args)

        op.register_kernel(device)(kernel)


def _all_float32(args: tuple) -> bool:
    tensors = [a for arg in args for a in (arg if isinstance(arg, (list, tuple)) else [arg])]
    return all(t.dtype == torch.float32 for t in tensors if isinstance(t, torch.Tensor) and t.is_floating_point())


def optional_module(name: str) -> Callable[[], ModuleType | None]:
    """A cached loader of module ``name`` that gives None when it cannot be imported (e.g. no Triton)."""

    @functools.cache
    def load() -> ModuleType | None:
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    return load
