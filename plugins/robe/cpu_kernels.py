"""ROBE-Z CPU kernels: a C++ extension (``csrc/robe_cpu.cpp``) compiled on first use.

:func:`load` builds it (:mod:`torchrec_pss.cpp_extensions`) and returns the module, or None when it cannot be
built. The functions (plain tensors, ints and floats; ``weights`` may be None; ``offsets`` ``[B + 1]``; the
``coefficients`` argument is ``RobeMemory.hash_coefficients``, ``[2, 4]``: location row, sign row):

- ``robe_pooled_forward(memory, ids, offsets, weights, coefficients, table_key,
  dim, chunk_size, use_sign, mean) -> [B, dim]``: equals ``RobeMemory.pooled``.
- ``robe_pooled_backward(grad_out, ids, offsets, weights, coefficients, table_key,
  memory_size, dim, chunk_size, use_sign, mean) -> [|M|]``: the dense gradient of ``M``.
- ``robe_sparse_grad(grad_out, ids, offsets, weights, coefficients, table_key,
  memory_size, dim, chunk_size, use_sign, mean) -> (positions [U], values [U])``: the gradient of ``M`` over the
  positions the batch touches (ascending, unique), the indices and values of its coalesced sparse COO form.
- ``robe_sgd_update_(memory, grad_out, ids, offsets, weights, coefficients,
  table_key, chunk_size, use_sign, mean, lr)``: backward fused with ``p -= lr·g`` in place.
- ``robe_adagrad_update_(memory, accumulator, grad_out, ids, offsets, weights, coefficients,
  table_key, chunk_size, use_sign, mean, lr, eps, block_size)``: backward fused with
  blockwise Adagrad (``block_size = 1``: elementwise) in place; ``lr`` is the decayed ``clr`` of
  :class:`~torchrec_pss.optim.FusedUpdate` and ``accumulator`` has ``ceil(|M| / block_size)`` entries.
- ``robe_weights_grad(memory, grad_out, ids, offsets, coefficients, table_key,
  chunk_size, use_sign, mean) -> [N]``: the gradient of the per-sample weights.
"""

from __future__ import annotations

from pathlib import Path

from torchrec_pss.cpp_extensions import extension_loader

load = extension_loader("torchrec_pss_robe_cpu", Path(__file__).parent / "csrc" / "robe_cpu.cpp")
