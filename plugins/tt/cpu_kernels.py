"""TT-Rec CPU kernels: a C++ extension (``csrc/tt_cpu.cpp``) compiled on first use.

:func:`load` builds it (:mod:`torchrec_pss.cpp_extensions`) and returns the module, or None when it cannot be
built. The functions (``cores``: float32 ``[p_k, R_{k-1}, q_k, R_k]`` with ``R_0 = R_N = 1``, ``N >= 2``;
``ids`` ``[U]`` integers in ``[0, ∏ p_k)``; ``d = ∏ q_k``):

- ``tt_rows_forward(cores, ids) -> [U, d]``: equals :func:`~torchrec_pss_plugins.tt.reference.rows`.
- ``tt_rows_backward(grad, cores, ids) -> list[Tensor]``: the dense gradients of the cores (their shapes) for
  the gradient ``grad`` ``[U, d]`` of those rows.
- ``tt_pooled_forward(cores, ids, offsets, scales) -> [B, d]`` and ``tt_pooled_backward(grad, cores, ids, offsets,
  scales) -> list[Tensor]``: equal :func:`~torchrec_pss_plugins.tt.reference.pooled` /
  :func:`~torchrec_pss_plugins.tt.reference.pooled_backward` (``scales`` ``[N]`` float32 or None).
"""

from __future__ import annotations

from pathlib import Path

from torchrec_pss.cpp_extensions import extension_loader

load = extension_loader("torchrec_pss_tt_cpu", Path(__file__).parent / "csrc" / "tt_cpu.cpp")
