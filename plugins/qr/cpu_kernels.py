"""QR CPU kernels: a C++ extension (``csrc/qr_cpu.cpp``) compiled on first use.

:func:`load` builds it (:mod:`torchrec_pss.cpp_extensions`) and returns the module, or None when it cannot be
built. The functions (``parts`` the ``k >= 2`` float32 part tables ``[rows_j, width]``; ``ids`` ``[N]``;
``offsets`` ``[B + 1]``; ``weights`` ``[N]`` or None; ``operation`` ``"mult"`` / ``"add"`` / ``"concat"``;
``d = width``, or ``k · width`` for concat):

- ``qr_pooled_forward(parts, ids, offsets, weights, collisions, operation, mean) -> [B, d]``: equals
  :func:`~torchrec_pss_plugins.qr.reference.pooled_forward`.
- ``qr_pooled_backward(grad_out, parts, ids, offsets, weights, collisions, operation, mean) -> list[Tensor]``:
  the dense gradient of every part table (:func:`~torchrec_pss_plugins.qr.reference.pooled_backward`).
- ``qr_grad_rows(grad_out, parts, ids, offsets, weights, collisions, operation, mean) -> (rows, values)``:
  every part's gradient over the rows the batch reads (lists, one entry per part), rows ascending and unique
  (:func:`~torchrec_pss_plugins.qr.reference.grad_rows`).
- ``qr_weights_grad(grad_out, parts, ids, offsets, collisions, operation, mean) -> [N]``: the gradient of the
  per-sample weights (:func:`~torchrec_pss_plugins.qr.reference.weights_grad`).
"""

from __future__ import annotations

from pathlib import Path

from torchrec_pss.cpp_extensions import extension_loader

load = extension_loader("torchrec_pss_qr_cpu", Path(__file__).parent / "csrc" / "qr_cpu.cpp")
