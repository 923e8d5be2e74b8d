"""Without a GPU, Triton kernels run in Triton's interpreter: the switch must be set before anything
imports triton (its own library functions are built at import), so it is set here, first."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
