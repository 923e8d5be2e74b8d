"""Memory bandwidth reached by the ROBE forward kernel on a GPU, against a device-to-device copy.

The forward (``torch.ops.torchrec_pss.robe_pooled``, the fused Triton hash + gather + pool kernel on CUDA)
of ``B`` bags of ``L`` uniform random ids is timed with CUDA events (median of ``--iters`` launches after
warm-up) and the same batch through ``torch.nn.EmbeddingBag`` on the uncompressed table. Bytes moved per
forward are counted the same way for both: ids (8 B each), offsets (8 B each), the gathered embedding
elements (``N · d · 4`` B: every id reads ``d`` float32 values) and the pooled output (``B · d · 4`` B).
The ceiling is a device-to-device copy of 2 GiB measured in the same run (bytes read + written over its
time). Note that at high compression ``M`` is small enough to stay in L2, so the gathered bytes are
served from cache; the ratio then says how close the kernel is to streaming speed, not DRAM traffic.

    python benchmarks/gpu_bandwidth.py --out benchmarks/results/gpu_bandwidth

writes ``STEM.json`` and ``STEM.md``. Without CUDA it runs a tiny smoke version on the CPU (Triton's
interpreter when ``TRITON_INTERPRET=1``), for testing the script only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from run_info import run_header, write_result
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig

FLOAT_BYTES = 4
INDEX_BYTES = 8
GRAPH_REPEATS = 10


def median_ms(fn: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` (CUDA events on CUDA, wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def graph_ms(fn: Callable[[], Any], repeats: int, iters: int) -> float:
    """Median milliseconds per call of ``fn`` replayed from a CUDA graph of ``repeats`` calls: the kernels'
    own time, without the host's launch overhead."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            fn()
    return median_ms(graph.replay, 2, iters, torch.device("cuda")) / repeats


def copy_bandwidth(device: torch.device, num_bytes: int, warmup: int, iters: int) -> float:
    """Bytes per second of a device-to-device copy of ``num_bytes`` (read + written)."""
    src = torch.empty(num_bytes // FLOAT_BYTES, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), warmup, iters, device)
    return 2 * num_bytes / (ms * 1e-3)


def forward_bytes(batch: int, pooling: int, dim: int) -> int:
    """Bytes one pooled forward moves: ids, offsets, gathered rows and the output."""
    ids = batch * pooling
    return ids * INDEX_BYTES + (batch + 1) * INDEX_BYTES + ids * dim * FLOAT_BYTES + batch * dim * FLOAT_BYTES


def timed(forward: Callable[[], Any], warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """Median ms of ``forward`` eagerly and per call from a CUDA graph (the eager time again off CUDA)."""
    with torch.no_grad():
        eager = median_ms(forward, warmup, iters, device)
        return eager, graph_ms(forward, GRAPH_REPEATS, iters) if device.type == "cuda" else eager


def time_robe(ids: torch.Tensor, offsets: torch.Tensor, rows: int, compression: float, chunk_size: int, dim: int,
              warmup: int, iters: int, device: torch.device) -> tuple[float, float]:
    """Eager and graph ms of ``torchrec_pss::robe_pooled`` on a ROBE-Z memory of ``rows`` logical rows."""
    table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=["f"])
    module = CompressedEmbeddingBagCollection([table], {"t": RobeConfig(compression=compression,
                                                                          chunk_size=chunk_size)}, device)
    memory = module.memory_for("t")
    key = memory.table_keys[:1]
    return timed(lambda: torch.ops.torchrec_pss.robe_pooled(memory.weight, ids, offsets, None, memory.hash_coefficients,
                                                            key, dim, chunk_size, memory.config.use_sign, False, False),
                 warmup, iters, device)


def time_embedding_bag(ids: torch.Tensor, offsets: torch.Tensor, rows: int, dim: int, warmup: int, iters: int,
                       device: torch.device) -> tuple[float, float]:
    """Eager and graph ms of ``nn.EmbeddingBag`` (SUM) on the uncompressed ``rows x dim`` table."""
    bag = torch.nn.EmbeddingBag(rows, dim, mode="sum", include_last_offset=True, device=device)
    return timed(lambda: bag(ids, offsets), warmup, iters, device)


def run_cell(rows: int, compression: float, chunk_size: int, pooling: int, batch: int, dim: int, warmup: int,
             iters: int, device: torch.device, bandwidth: float) -> dict[str, Any]:
    """ROBE forward and ``nn.EmbeddingBag`` forward on the same batch: times, GB/s and share of the copy."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, rows, (batch * pooling,), generator=generator).to(device)
    offsets = torch.arange(0, batch * pooling + 1, pooling, dtype=torch.int64, device=device)
    robe_ms, robe_graph_ms = time_robe(ids, offsets, rows, compression, chunk_size, dim, warmup, iters, device)
    bag_ms, bag_graph_ms = time_embedding_bag(ids, offsets, rows, dim, warmup, iters, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    moved = forward_bytes(batch, pooling, dim)
    return {
        "rows": rows, "compression": compression, "chunk_size": chunk_size, "pooling": pooling, "batch": batch,
        "dim": dim, "bytes": moved,
        "robe_ms": robe_ms, "robe_gbps": moved / (robe_ms * 1e-3) / 1e9,
        "robe_of_copy": moved / (robe_ms * 1e-3) / bandwidth,
        "embedding_bag_ms": bag_ms, "embedding_bag_gbps": moved / (bag_ms * 1e-3) / 1e9,
        "embedding_bag_of_copy": moved / (bag_ms * 1e-3) / bandwidth,
        "robe_over_embedding_bag": robe_ms / bag_ms,
        "robe_graph_ms": robe_graph_ms, "robe_graph_of_copy": moved / (robe_graph_ms * 1e-3) / bandwidth,
        "embedding_bag_graph_ms": bag_graph_ms,
        "embedding_bag_graph_of_copy": moved / (bag_graph_ms * 1e-3) / bandwidth,
    }


def markdown(result: dict[str, Any]) -> str:
    """A readable table of ``result``'s cells."""
    lines = [
        f"# ROBE forward bandwidth on {result['device']}",
        "",
        f"Generated by `{result['command']}` on {result['date']} (torch {result['torch']}).",
        "",
        f"Copy ceiling (device-to-device, read + write): **{result['copy_gbps']:.0f} GB/s**. "
        "Bytes per forward = ids + offsets + gathered float32 elements + output. *Eager*: one call timed with "
        "CUDA events (host launch overhead included); *graph*: replayed from a CUDA graph of "
        f"{GRAPH_REPEATS} calls (the kernels alone). EB = `torch.nn.EmbeddingBag` on the uncompressed table.",
        "",
        "| rows | compression | Z | L | B | ROBE eager ms | ROBE graph ms | ROBE graph / copy | EB eager ms | "
        "EB graph ms | EB graph / copy | ROBE / EB (eager) | ROBE / EB (graph) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in result["cells"]:
        lines.append(
            f"| {c['rows']:,} | {c['compression']:g}x | {c['chunk_size']} | {c['pooling']} | {c['batch']} | "
            f"{c['robe_ms']:.3f} | {c['robe_graph_ms']:.3f} | {c['robe_graph_of_copy']:.0%} | "
            f"{c['embedding_bag_ms']:.3f} | {c['embedding_bag_graph_ms']:.3f} | {c['embedding_bag_graph_of_copy']:.0%} | "
            f"{c['robe_over_embedding_bag']:.2f} | {c['robe_graph_ms'] / c['embedding_bag_graph_ms']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4_000_000, 64_000_000])
    parser.add_argument("--compressions", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--batch", type=int, default=10240)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_bandwidth"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        args.rows, args.batch, args.pooling, args.dim, args.iters = [10_000], 16, [2], 16, 2
    bandwidth = copy_bandwidth(device, 2**31 if device.type == "cuda" else 2**20, 3, args.iters)
    result: dict[str, Any] = {
        **run_header(__file__, argv, device),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_gbps": bandwidth / 1e9, "cells": [],
    }
    for rows in args.rows:
        for compression in args.compressions:
            for chunk in args.chunk_sizes:
                for pooling in args.pooling:
                    cell = run_cell(rows, compression, chunk, pooling, args.batch, args.dim, 3, args.iters, device,
                                    bandwidth)
                    print(json.dumps(cell), flush=True)
                    result["cells"].append(cell)
    table = markdown(result)
    write_result(args.out, result, table)
    print(table)


if __name__ == "__main__":
    main()
