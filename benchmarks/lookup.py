"""Training-step time of every method against TorchRec's EBC and FBGEMM's CPU TBE on the same logical table.

One step = forward + backward + SGD update, batch ``B`` bags of ``L`` uniform random ids of one table
with ``n`` rows and ``d`` columns. Baselines: (a) ``torchrec.EmbeddingBagCollection`` + ``torch.optim.SGD``
(dense table gradient, as the unsharded EBC gives), (b) FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen``
on the CPU with ``EXACT_SGD`` fused into backward. The methods run through ``CompressedEmbeddingBagCollection``
with ``torch.optim.SGD`` at each asked ratio where they can reach it: ROBE once per gradient layout
(dense, sparse, auto), the hashing trick, QR (mult), TT (the largest rank <= 32 reaching the ratio) and
MLET as a low-rank table (the widest inner dim reaching it).

The methods and the EBC step a plain ``torch.optim.SGD`` after backward — the step of a user who does not fuse
the optimizer, where the gradient layout (dense or sparse) matters — while the TBE fuses its SGD into backward,
so their ratios to it include the unfused optimizer's cost; ``benchmarks/grid.py`` compares fused steps like
for like. Each cell is timed in rounds interleaved with the baseline (one step of each per round) and divided
by the baseline's median of those rounds. The compressed modules run with their input checks off, as the
baselines check nothing (``--check-inputs`` turns them on).

    python benchmarks/lookup.py --rows 1000000 4000000 --pooling 1 20

writes ``benchmarks/results/lookup.json`` and ``benchmarks/results/lookup.md`` (ratios ROBE / TBE).
With ``--device cuda`` (FBGEMM's CPU wheel has no CUDA TBE) the baseline is ``torch.nn.EmbeddingBag``
with sparse gradients and SGD on the GPU, and the files are named ``lookup_cuda.*``.
"""

from __future__ import annotations

import argparse
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
from run_info import run_header, write_result
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_pss import (
    CompressedEmbeddingBagCollection,
    HashingConfig,
    MethodConfig,
    MLETConfig,
    QRConfig,
    RobeConfig,
    TTConfig,
)
from torchrec_pss_plugins.qr.qr import collisions_for
from torchrec_pss_plugins.tt import suggest_tt_shapes

LR = 0.01
MAX_TT_RANK = 32  # larger ranks need GBs of contraction intermediates for a 4096 x 20 batch on the CPU


def interleaved_medians(steps: list[Callable[[], None]], warmup: int, iters: int, device: torch.device) -> list[float]:
    """Median wall time of each step in milliseconds, timed in rounds of one call of each (so a drift in the
    machine's speed hits them alike), synchronising the device around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in steps:
        for _ in range(warmup):
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(iters):
        for step, record in zip(steps, times):
            sync()
            start = time.perf_counter()
            step()
            sync()
            record.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(record) for record in times]


def time_steps(step: Callable[[], None], warmup: int, iters: int, device: torch.device) -> float:
    """Median wall time of ``step`` in milliseconds (synchronising the device around each step)."""
    return interleaved_medians([step], warmup, iters, device)[0]


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
    return tbe_step(n, d, kjt, EmbOptimType.EXACT_SGD)


def cpu_tbe(n: int, d: int, optimizer: EmbOptimType) -> SplitTableBatchedEmbeddingBagsCodegen:
    """FBGEMM's CPU TBE over one ``n x d`` table (SUM pooling) with ``optimizer`` fused into backward."""
    return SplitTableBatchedEmbeddingBagsCodegen(
        embedding_specs=[(n, d, EmbeddingLocation.HOST, ComputeDevice.CPU)],
        optimizer=optimizer,
        learning_rate=LR,
        pooling_mode=PoolingMode.SUM,
    )


def tbe_step(n: int, d: int, kjt: KeyedJaggedTensor, optimizer: EmbOptimType) -> Callable[[], None]:
    """One FBGEMM CPU TBE step (forward + backward with ``optimizer`` fused into backward)."""
    tbe = cpu_tbe(n, d, optimizer)
    indices, offsets = kjt.values(), kjt.offsets()
    return lambda: tbe(indices, offsets).sum().backward()


def tt_config(table: EmbeddingBagConfig, ratio: float) -> TTConfig | None:
    """The largest TT rank (at most ``MAX_TT_RANK``) whose cores compress the table at least ``ratio``x."""
    p, q = suggest_tt_shapes(table.num_embeddings, table.embedding_dim, 3)
    for rank in range(MAX_TT_RANK, 0, -1):
        ranks = (1, rank, rank, 1)
        stored = sum(p[k] * ranks[k] * q[k] * ranks[k + 1] for k in range(3))
        if table.num_embeddings * table.embedding_dim / stored >= ratio:
            return TTConfig(ranks=rank)
    return None


def mlet_config(table: EmbeddingBagConfig, ratio: float) -> MLETConfig | None:
    """MLET with the widest inner dim ``k`` that stores at most ``n·d / ratio`` elements (a low-rank table)."""
    n, d = table.num_embeddings, table.embedding_dim
    k = int(n * d / ratio // (n + d))
    return MLETConfig(inner_dim=k) if k >= 1 else None


def qr_config(table: EmbeddingBagConfig, ratio: float) -> QRConfig | None:
    config = QRConfig(compression=ratio)
    try:
        collisions_for(table, config)
    except ValueError:
        return None
    return config


METHODS = ("robe", "hashing", "qr", "tt", "mlet")


def method_configs(table: EmbeddingBagConfig, ratio: float, chunk: int) -> list[tuple[str, MethodConfig | None]]:
    """Every method at ``ratio``x (None where the method cannot reach it); labels start with a ``METHODS`` name."""
    configs: list[tuple[str, MethodConfig | None]] = [
        (f"robe {gradient}", RobeConfig(compression=ratio, chunk_size=chunk, gradient=gradient))
        for gradient in ("dense", "sparse", "auto")
    ]
    return configs + [
        ("hashing", HashingConfig(compression=ratio)),
        ("qr mult", qr_config(table, ratio)),
        ("tt", tt_config(table, ratio)),
        ("mlet", mlet_config(table, ratio)),
    ]


def run(rows: list[int], poolings: list[int], ratios: list[float], batch: int, dim: int, chunk: int,
        warmup: int, iters: int, device: torch.device, methods: tuple[str, ...] = METHODS,
        check_inputs: bool = False) -> list[dict]:
    """One row per cell: ``ms`` (median step) and ``baseline_ms`` (the baseline's median in the same rounds)."""
    results = []
    for n in rows:
        table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=n, feature_names=["f"])
        logical = n * dim * 4
        for pooling in poolings:
            generator = torch.Generator().manual_seed(0)
            lengths = torch.full((batch,), pooling)
            kjt = KeyedJaggedTensor(  # offsets given: FBGEMM's CPU wheel cannot compute them on CUDA
                keys=["f"],
                values=torch.randint(0, n, (batch * pooling,), generator=generator),
                lengths=lengths,
                offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            ).to(device)
            baseline = baseline_step(n, dim, kjt, device)
            base = time_steps(baseline, warmup, iters, device)
            common = {"rows": n, "pooling": pooling, "batch": batch, "dim": dim}
            ebc = EmbeddingBagCollection([table], device=device)
            ebc_ms, ebc_base = interleaved_medians([collection_step(ebc, kjt), baseline], warmup, iters, device)
            del ebc
            results.append({**common, "method": "baseline", "asked": 1, "compression": 1.0, "ms": base,
                            "baseline_ms": base})
            results.append({**common, "method": "ebc", "asked": 1, "compression": 1.0, "ms": ebc_ms,
                            "baseline_ms": ebc_base})
            for ratio in ratios:
                for label, config in method_configs(table, ratio, chunk):
                    if label.split()[0] not in methods:
                        continue
                    row = {**common, "method": label, "asked": ratio, "config": repr(config)}
                    if config is not None:
                        module = CompressedEmbeddingBagCollection([table], {"t": config}, device,
                                                                  validate_inputs=check_inputs)
                        row["compression"] = logical / module.memory_for("t").num_bytes()
                        row["ms"], row["baseline_ms"] = interleaved_medians(
                            [collection_step(module, kjt), baseline], warmup, iters, device)
                        del module
                    results.append(row)
                    print(f"n={n} L={pooling} {label} {ratio:g}x: {row.get('ms', float('nan')):.2f} ms "
                          f"(baseline {row.get('baseline_ms', float('nan')):.2f})", flush=True)
    return results


def markdown(results: list[dict], baseline: str, meta: dict) -> str:
    first = results[0]
    lines = [
        f"Training step (forward + backward + SGD) in ms and as a ratio to the baseline, {baseline}; lower is "
        f"better. Generated by `{meta['command']}` on {meta['date']}. Batch {first['batch']} bags of L ids, "
        f"d = {first['dim']}, median of timed steps, each cell in rounds interleaved with the baseline and divided "
        "by the baseline's median of those rounds; the methods and the EBC step a plain `torch.optim.SGD` after "
        f"backward (not fused); compressed modules' input checks {'on' if meta['check_inputs'] else 'off'}; "
        f"torch {meta['torch']}, {meta['threads']} threads, {meta['device_name']}. "
        "`compression` is the logical table bytes over the bytes the method stores; a dash: the method cannot "
        "reach the asked ratio.",
        "",
        "| rows | L | method | asked | compression | ms | / baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "ms" not in r:
            cells = ["-", "-", "-"]
        else:
            cells = [f"{r['compression']:.0f}x", f"{r['ms']:.2f}", f"{r['ms'] / r['baseline_ms']:.2f}"]
        asked = "-" if r["method"] in ("baseline", "ebc") else f"{r['asked']:g}x"
        lines.append(f"| {r['rows']:,} | {r['pooling']} | {r['method']} | {asked} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--compression", type=float, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32, help="ROBE chunk size Z")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"))
    parser.add_argument("--check-inputs", action="store_true", help="run the compressed modules with their input checks")
    parser.add_argument("--out", type=Path, default=None, help="path stem; default benchmarks/results/lookup[_cuda]")
    args = parser.parse_args()
    cuda = args.device.type == "cuda"
    out = args.out or Path(__file__).parent / "results" / ("lookup_cuda" if cuda else "lookup")
    baseline = "nn.EmbeddingBag (sparse grad) + SGD on CUDA" if cuda else "FBGEMM CPU TBE (EXACT_SGD)"
    results = run(args.rows, args.pooling, args.compression, args.batch, args.dim, args.chunk_size,
                  args.warmup, args.iters, args.device, tuple(args.methods), args.check_inputs)
    meta = {**run_header(__file__, None, args.device), "baseline": baseline, "check_inputs": args.check_inputs}
    table = markdown(results, baseline, meta)
    write_result(out, {"meta": meta, "results": results}, table)
    print(table)


if __name__ == "__main__":
    main()
