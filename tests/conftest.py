"""Without a GPU, Triton kernels run in Triton's interpreter: the switch must be set before anything
imports triton (its own library functions are built at import), so it is set here, first.

The methods' C++ CPU extensions are built (or loaded from their cache) once at session start, so that no
test that runs a subprocess under a timeout pays for a first build (about a minute each on 2 cores)."""

import importlib
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

CPU_KERNELS = ("torchrec_pss_plugins.robe.cpu_kernels", "torchrec_pss_plugins.qr.cpu_kernels",
               "torchrec_pss_plugins.tt.cpu_kernels")


def pytest_sessionstart(session) -> None:
    for name in CPU_KERNELS:
        importlib.import_module(name).load()
