"""Training-step time of ROBE-Z against TorchRec's EBC and FBGEMM's CPU TBE on the same logical table.

One step = forward + backward + SGD update, batch ``B`` bags of ``L`` uniform random ids of one table
with ``n`` rows and ``d`` columns. Baselines: (a) ``torchrec.EmbeddingBagCollection`` + ``torch.optim.SGD``
(dense table gradient, as the unsharded EBC gives), (b) FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``
on the CPU with ``EXACT_SGD`` fused into backward. ROBE runs through ``CompressedEmbeddingBagCollection``
with ``torch.optim.SGD``, once per gradient layout (dense, sparse) and once with ``auto``.

    python benchmarks/lookup.py --rows 1000000 4000000 --pooling 1 20

writes ``benchmarks/results/lookup.json`` and ``benchmarks/results/lookup.md`` (ratios ROBE / TBE).
With ``--device cuda`` (FBGEMM's CPU wheel has no CUDA TBE) the baseline is ``torch.nn.EmbeddingBag``
with sparse gradients and SGD on the GPU, and the files are named ``lookup_cuda.*``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torchrec import EmbeddingBagCollection
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig

LR = 0.01


def time_steps(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of ``step`` in milliseconds (synchronising the device around each step)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sgd_step(module: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> Callable[[], None]:
    """One training step: ``loss().backward()`` then ``torch.optim.SGD`` on ``module``'s parameters."""
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()

    return step


def collection_step(module: torch.nn.Module, kjt: KeyedJaggedTensor) -> Callable[[], None]:
    return sgd_step(module, lambda: module(kjt).values().sum())


def baseline_step(n: int, d: int, kjt: KeyedJaggedTensor, device: torch.device) -> Callable[[], None]:
    """FBGEMM's CPU TBE with EXACT_SGD on the CPU; ``nn.EmbeddingBag`` (sparse gradient) + SGD on CUDA."""
    if device.type == "cuda":
        bag = torch.nn.EmbeddingBag(n, d, mode="sum", sparse=True, include_last_offset=True, device=device)
        return sgd_step(bag, lambda: bag(kjt.values(), kjt.offsets()).sum())
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(n, d, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=EmbOptimType.EXACT_SGD,
        learning_rate=LR,
        pooling_mode=PoolingMode.SUM,
    )
    indices, offsets = kjt.values(), kjt.offsets()

    def step() -> None:
        tbe(indices, offsets).sum().backward()

    return step


def run(rows: list[int], poolings: list[int], ratios: list[float], batch: int, dim: int, chunk: int,
        warmup: int, iters: int, device: torch.device) -> list[dict]:
    results = []
    for n in rows:
        table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=n, feature_names=["f"])
        for pooling in poolings:
            generator = torch.Generator().manual_seed(0)
            lengths = torch.full((batch,), pooling)
            kjt = KeyedJaggedTensor(  # offsets given: FBGEMM's CPU wheel cannot compute them on CUDA
                keys=["f"],
                values=torch.randint(0, n, (batch * pooling,), generator=generator),
                lengths=lengths,
                offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            ).to(device)
            row = {"rows": n, "pooling": pooling, "batch": batch, "dim": dim, "chunk_size": chunk}
            row["baseline_ms"] = time_steps(baseline_step(n, dim, kjt, device), warmup, iters, device)
            ebc = EmbeddingBagCollection([table], device=device)
            row["ebc_ms"] = time_steps(collection_step(ebc, kjt), warmup, iters, device)
            for ratio in ratios:
                for gradient in ("dense", "sparse", "auto"):
                    config = RobeConfig(compression=ratio, chunk_size=chunk, gradient=gradient)
                    module = CompressedEmbeddingBagCollection([table], {"t": config}, device)
                    key = f"robe_{ratio:g}x_{gradient}_ms"
                    row[key] = time_steps(collection_step(module, kjt), warmup, iters, device)
                    print(f"n={n} L={pooling} {key}={row[key]:.2f} baseline={row['baseline_ms']:.2f} "
                          f"ebc={row['ebc_ms']:.2f}", flush=True)
            results.append(row)
    return results


def markdown(results: list[dict], ratios: list[float], baseline: str, meta: dict) -> str:
    lines = [
        f"Training step (forward + backward + SGD), ms and ratio to {baseline}; lower is better. "
        f"Batch {results[0]['batch']}, d = {results[0]['dim']}, ROBE chunk size {results[0]['chunk_size']}, "
        f"median of timed steps; {meta}.",
        "",
        "| rows | L | base ms | EBC / base | " + " | ".join(
            f"ROBE {r:g}x {g} / base" for r in ratios for g in ("dense", "sparse", "auto")) + " |",
        "|" + "---|" * (4 + 3 * len(ratios)),
    ]
    for row in results:
        base = row["baseline_ms"]
        cells = [f"{row['rows']:,}", str(row["pooling"]), f"{base:.2f}", f"{row['ebc_ms'] / base:.2f}"]
        cells += [f"{row[f'robe_{r:g}x_{g}_ms'] / base:.2f}" for r in ratios for g in ("dense", "sparse", "auto")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--compression", type=float, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--out", type=Path, default=None, help="path stem; default benchmarks/results/lookup[_cuda]")
    args = parser.parse_args()
    cuda = args.device.type == "cuda"
    out = args.out or Path(__file__).parent / "results" / ("lookup_cuda" if cuda else "lookup")
    baseline = "nn.EmbeddingBag (sparse grad) + SGD on CUDA" if cuda else "FBGEMM CPU TBE (EXACT_SGD)"
    results = run(args.rows, args.pooling, args.compression, args.batch, args.dim, args.chunk_size,
                  args.warmup, args.iters, args.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "baseline": baseline,
    }
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, args.compression, baseline, meta)
    out.with_suffix(".md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
