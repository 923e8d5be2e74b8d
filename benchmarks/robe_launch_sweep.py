"""Launch parameters of the ROBE Triton kernels on a GPU: forward and scatter (fused SGD) times per setting.

For each case (logical rows, compression, chunk size Z, pooling L; B = 10240 bags, d = 128) the fused forward
kernel and the atomic scatter kernel are launched directly with every combination of ``BLOCK_N`` (ids per step;
``--block-n-short`` for L = 1), ``BLOCK_D`` and ``num_warps`` and timed per call from a CUDA graph (the kernels
alone, as in ``gpu_bandwidth.py``); the forward's bytes (ids, offsets, gathered elements, output) are given as a
share of a device-to-device copy's bandwidth. The result picks ``triton_kernels.NUM_WARPS``.

    python benchmarks/robe_launch_sweep.py --out benchmarks/results/robe_launch_sweep

writes ``STEM.json`` and ``STEM.md``. Needs CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import torch
import triton
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from gpu_bandwidth import copy_bandwidth, forward_bytes, graph_ms, write_result
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss_plugins.robe import triton_kernels

CASES = [(4_000_000, 1000.0, 32, 20), (64_000_000, 100.0, 32, 20), (4_000_000, 1000.0, 1, 20), (4_000_000, 1000.0, 32, 1)]
"""(logical rows, compression, Z, L)."""


def sweep_case(rows: int, compression: float, chunk: int, pooling: int, batch: int, dim: int,
               settings: list[tuple[int, int, int]], bandwidth: float) -> list[dict[str, Any]]:
    """Forward and scatter ms of one case for every ``(BLOCK_N, BLOCK_D, num_warps)`` setting."""
    device = torch.device("cuda")
    table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])
    module = CompressedEmbeddingBagCollection([table], {"t": RobeConfig(compression=compression, chunk_size=chunk)},
                                              device)
    memory = module.memory_for("t")
    weight, coefficients, key = memory.weight.detach(), memory.hash_coefficients, memory.table_keys[:1].contiguous()
    ids = torch.randint(0, rows, (batch * pooling,), generator=torch.Generator().manual_seed(0)).to(device)
    offsets = torch.arange(0, batch * pooling + 1, pooling, dtype=torch.int64, device=device)
    out = torch.empty(batch, dim, device=device)
    grad = torch.randn(batch, dim, device=device)
    target = torch.zeros_like(weight)
    moved = forward_bytes(batch, pooling, dim)
    defaults = triton_kernels._launch(ids.numel(), batch, dim, chunk, weight.numel(), key)
    rows_out = []
    for block_n, block_d, warps in settings:
        grid = (batch, triton.cdiv(dim, block_d))
        constants = {**defaults, "DIM": dim, "Z": chunk, "USE_SIGN": memory.config.use_sign, "HAS_WEIGHTS": False,
                     "MEAN": False, "BLOCK_N": block_n, "BLOCK_D": block_d, "num_warps": warps}

        def forward() -> None:
            triton_kernels._pooled_forward_kernel[grid](weight, ids, offsets, None, coefficients, key, out,
                                                        weight.numel(), **constants)

        def scatter() -> None:
            triton_kernels._scatter_kernel[grid](target, grad, grad.stride(0), grad.stride(1), ids, offsets, None,
                                                 coefficients, key, -0.01, weight.numel(), **constants)

        forward_ms, scatter_ms = graph_ms(forward, 10, 10), graph_ms(scatter, 10, 10)
        row = {"rows": rows, "compression": compression, "chunk_size": chunk, "pooling": pooling, "block_n": block_n,
               "block_d": block_d, "num_warps": warps, "forward_ms": forward_ms, "scatter_ms": scatter_ms,
               "forward_of_copy": moved / (forward_ms * 1e-3) / bandwidth}
        print(json.dumps(row), flush=True)
        rows_out.append(row)
    return rows_out


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# ROBE Triton launch parameters on {result['device']}", "",
             f"B = {result['batch']}, d = {result['dim']}; per-call ms from CUDA graphs; copy ceiling "
             f"{result['copy_gbps']:.0f} GB/s.", "",
             "| rows | compression | Z | L | BLOCK_N | BLOCK_D | warps | forward ms | forward / copy | scatter ms |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["cells"]:
        lines.append(f"| {r['rows']:,} | {r['compression']:g}x | {r['chunk_size']} | {r['pooling']} | {r['block_n']} | "
                     f"{r['block_d']} | {r['num_warps']} | {r['forward_ms']:.4f} | {r['forward_of_copy']:.0%} | "
                     f"{r['scatter_ms']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block-n", type=int, nargs="+", default=[8, 16, 32])
    parser.add_argument("--block-n-short", type=int, nargs="+", default=[2, 4, 8], help="BLOCK_N values for L = 1")
    parser.add_argument("--block-d", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--batch", type=int, default=10240)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robe_launch_sweep"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("robe_launch_sweep.py needs CUDA")
    bandwidth = copy_bandwidth(torch.device("cuda"), 2**31, 3, 10)
    result: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batch": args.batch,
                              "dim": args.dim, "copy_gbps": bandwidth / 1e9, "cells": []}
    for rows, compression, chunk, pooling in CASES:
        block_ns = args.block_n_short if pooling == 1 else args.block_n
        settings = list(itertools.product(block_ns, args.block_d, args.warps))
        result["cells"] += sweep_case(rows, compression, chunk, pooling, args.batch, args.dim, settings, bandwidth)
        torch.cuda.empty_cache()
    write_result(result, args.out, markdown(result))


if __name__ == "__main__":
    main()
