"""Training step of the 26 Criteo tables compressed into ONE shared ROBE memory, against FBGEMM's CPU TBE.

The 26 Criteo features with the MLPerf cardinalities capped at ``--max-rows``, ``d`` = 128, batch ``B`` bags
of ``L`` uniform ids per feature, in-backward optimizer (SGD, or row-wise Adagrad as in the MLPerf DLRM:
``BlockwiseAdagrad`` with one accumulator per Z memory elements for ROBE).
Measured in one process, median of ``--iters`` steps after ``--warmup``, the three timed in rounds interleaved
(one step of each per round, so that a drift of the machine's speed hits them alike):

- ``tbe``: FBGEMM's CPU ``SplitTableBatchedEmbeddingBagsCodegen`` holding the 26 tables uncompressed
  (``EXACT_SGD`` / ``EXACT_ROWWISE_ADAGRAD`` fused into backward), the baseline;
- ``robe shared``: ``CompressedEmbeddingBagCollection`` with every table in one ROBE-Z memory
  (``share_group="all"``) at ``--compression``;
- ``robe per table``: the same compression with one memory per table (26 memories).

The ROBE modules run with their input checks off, as the TBE checks nothing (``--check-inputs`` turns them on).

    python benchmarks/shared_memory.py --out benchmarks/results/shared_memory

writes ``STEM.json`` and ``STEM.md`` (ms per step and the ratio to the TBE of the same run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lookup import LR, interleaved_medians
from run_info import run_header, write_result
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.models.presets import MLPERF_NUM_EMBEDDINGS
from torchrec_pss.optim import BlockwiseAdagrad, release_in_backward_optimizers

OPTIMIZERS: dict[str, tuple[type[torch.optim.Optimizer], EmbOptimType]] = {
    "sgd": (torch.optim.SGD, EmbOptimType.EXACT_SGD),
    "rowwise_adagrad": (BlockwiseAdagrad, EmbOptimType.EXACT_ROWWISE_ADAGRAD),
}


def tables(max_rows: int, dim: int) -> list[EmbeddingBagConfig]:
    return [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=min(n, max_rows), feature_names=[f])
            for f, n in zip(DEFAULT_CAT_NAMES, MLPERF_NUM_EMBEDDINGS)]


def batch(configs: list[EmbeddingBagConfig], size: int, pooling: int) -> KeyedJaggedTensor:
    """``size`` bags of ``pooling`` uniform ids for every feature (seeded)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randint(0, t.num_embeddings, (size * pooling,), generator=generator) for t in configs])
    return KeyedJaggedTensor(keys=[t.feature_names[0] for t in configs], values=values,
                             lengths=torch.full((size * len(configs),), pooling))


def tbe_step(configs: list[EmbeddingBagConfig], kjt: KeyedJaggedTensor, optimizer: EmbOptimType) -> Callable[[], None]:
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(t.num_embeddings, t.embedding_dim, EmbeddingLocation.HOST, ComputeDevice.CPU)
                         for t in configs],
        optimizer=optimizer, learning_rate=LR, pooling_mode=PoolingMode.SUM,
    )
    indices, offsets = kjt.values(), kjt.offsets()
    return lambda: tbe(indices, offsets).sum().backward()


def robe_module(configs: list[EmbeddingBagConfig], compression: float, share: bool,
                optimizer: type[torch.optim.Optimizer], check_inputs: bool) -> CompressedEmbeddingBagCollection:
    compressed = {t.name: RobeConfig(compression=compression, chunk_size=32, share_group="all" if share else t.name)
                  for t in configs}
    module = CompressedEmbeddingBagCollection(configs, compressed, validate_inputs=check_inputs)
    apply_optimizer_in_backward(optimizer, module.parameters(), {"lr": LR})
    return module


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--max-rows", type=int, default=1_000_000)
    parser.add_argument("--compression", type=float, default=1000)
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--check-inputs", action="store_true", help="run the ROBE modules with their input checks")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/shared_memory"))
    args = parser.parse_args(argv)
    configs = tables(args.max_rows, args.dim)
    cells = []
    for pooling in args.pooling:
        kjt = batch(configs, args.batch, pooling)
        for name in args.optimizers:
            optimizer, tbe_optimizer = OPTIMIZERS[name]
            modules = {label: robe_module(configs, args.compression, share, optimizer, args.check_inputs)
                       for label, share in (("robe_shared", True), ("robe_per_table", False))}
            steps = [tbe_step(configs, kjt, tbe_optimizer),
                     *(lambda m=m: m(kjt).values().sum().backward() for m in modules.values())]
            times = interleaved_medians(steps, args.warmup, args.iters, torch.device("cpu"))
            cell: dict[str, Any] = {"pooling": pooling, "optimizer": name, "tbe_ms": times[0]}
            for (label, module), ms in zip(modules.items(), times[1:]):
                cell[f"{label}_ms"] = ms
                cell[f"{label}_bytes"] = sum(module.num_bytes().values())
                release_in_backward_optimizers(module)
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    meta = {**run_header(__file__, argv), "batch": args.batch, "dim": args.dim, "max_rows": args.max_rows,
            "compression": args.compression, "rows": sum(t.num_embeddings for t in configs),
            "check_inputs": args.check_inputs}
    result = {**meta, "cells": cells}
    lines = ["# 26 Criteo tables in one ROBE memory vs FBGEMM CPU TBE (training step, CPU)", "",
             f"Generated by `{meta['command']}` on {meta['date']}: {meta['rows']:,} logical rows "
             f"(MLPerf cardinalities capped at {args.max_rows:,}), d = {args.dim}, B = {args.batch}, ROBE-32 at "
             f"{args.compression:g}x, optimizer fused into backward; medians of {args.iters} steps timed in rounds "
             f"interleaved between the three; ROBE input checks {'on' if args.check_inputs else 'off'}; "
             f"{meta['threads']} threads, torch {meta['torch']}.", "",
             "| L | optimizer | TBE ms | ROBE shared ms | shared / TBE | ROBE per table ms | per table / TBE |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {c['pooling']} | {c['optimizer']} | {c['tbe_ms']:.2f} | {c['robe_shared_ms']:.2f} | "
              f"{c['robe_shared_ms'] / c['tbe_ms']:.2f} | {c['robe_per_table_ms']:.2f} | "
              f"{c['robe_per_table_ms'] / c['tbe_ms']:.2f} |" for c in cells]
    write_result(args.out, result, "\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
