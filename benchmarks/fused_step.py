"""Fused training step of ROBE, dense versus sparse update path — the CPU analogue of the PSS paper's Figure 3.

One step = forward + backward with the optimizer update fused into backward
(``apply_optimizer_in_backward``), batch ``B`` bags of ``L`` uniform random ids, d = 128, for logical
tables of 4M–256M rows at 10x–10000x. Each ROBE configuration runs with ``gradient="dense"``,
``"sparse"`` and ``"auto"`` under SGD and BlockwiseAdagrad (one accumulator per Z-chunk); the baseline
is FBGEMM's CPU TBE with EXACT_SGD / EXACT_ROWWISE_ADAGRAD on the same logical table, where its
``n x d`` table fits the memory budget.

    python benchmarks/fused_step.py --rows 4000000 16000000 64000000 256000000

writes ``benchmarks/results/fused_step.json`` and ``fused_step.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Callable

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lookup import LR, tbe_step, time_steps
from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.optim import BlockwiseAdagrad

AUTO_DENSE_RATIO = RobeConfig.__dataclass_fields__["auto_dense_ratio"].default
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": LR}, EmbOptimType.EXACT_SGD),
    "rowwise_adagrad": (BlockwiseAdagrad, {"lr": LR}, EmbOptimType.EXACT_ROWWISE_ADAGRAD),
}


def robe_step(table: EmbeddingBagConfig, ratio: float, gradient: str, optimizer: str,
              kjt: KeyedJaggedTensor, chunk: int) -> Callable[[], None]:
    config = RobeConfig(compression=ratio, chunk_size=chunk, gradient=gradient)
    module = CompressedEmbeddingBagCollection([table], {"t": config})
    cls, kwargs, _ = OPTIMIZERS[optimizer]
    apply_optimizer_in_backward(cls, module.parameters(), kwargs)
    return lambda: module(kjt).values().sum().backward()


def run(rows: list[int], ratios: list[float], pooling: int, batch: int, dim: int, chunk: int, budget_gb: float,
        warmup: int, iters: int) -> list[dict]:
    cpu = torch.device("cpu")
    results = []
    for n in rows:
        table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=n, feature_names=["f"])
        kjt = KeyedJaggedTensor(
            keys=["f"],
            values=torch.randint(0, n, (batch * pooling,), generator=torch.Generator().manual_seed(0)),
            lengths=torch.full((batch,), pooling),
        )
        touched = batch * pooling * dim
        for optimizer, (_, _, tbe_optimizer) in OPTIMIZERS.items():
            common = {"rows": n, "pooling": pooling, "batch": batch, "dim": dim, "optimizer": optimizer}
            if n * dim * 4 <= budget_gb * 2**30:
                ms = time_steps(tbe_step(n, dim, kjt, tbe_optimizer), warmup, iters, cpu)
                results.append({**common, "method": "tbe", "compression": 1, "ms": ms})
                print(f"n={n} {optimizer} tbe {ms:.2f} ms", flush=True)
            for ratio in ratios:
                memory = n * dim / ratio
                if 3 * memory * 4 > budget_gb * 2**30:  # memory, its dense gradient, the optimizer's work
                    continue
                for gradient in ("dense", "sparse", "auto"):
                    ms = time_steps(robe_step(table, ratio, gradient, optimizer, kjt, chunk), warmup, iters, cpu)
                    results.append({**common, "method": f"robe {gradient}", "compression": ratio, "ms": ms,
                                    "memory_over_touched": memory / touched})
                    print(f"n={n} {optimizer} robe {ratio:g}x {gradient} {ms:.2f} ms", flush=True)
    return results


def markdown(results: list[dict], meta: dict) -> str:
    first = results[0]
    lines = [
        f"Fused training step (forward + backward with the update inside backward), ms; batch {first['batch']} "
        f"bags of L = {first['pooling']}, d = {first['dim']}; median of timed steps; {meta}. `/ TBE`: ratio to "
        "FBGEMM's CPU TBE with the same optimizer on the same logical table (blank where its table exceeds the "
        "memory budget). `|M| / touched`: memory elements over the elements one batch touches — the quantity "
        f"the `auto` rule compares with `RobeConfig.auto_dense_ratio` (default {AUTO_DENSE_RATIO:g}).",
        "",
        "| rows | optimizer | compression | |M| / touched | dense ms | sparse ms | auto ms | auto picks | dense / TBE | sparse / TBE |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    tbe = {(r["rows"], r["optimizer"]): r["ms"] for r in results if r["method"] == "tbe"}
    by_config: dict[tuple, dict[str, dict]] = {}
    for r in results:
        if r["method"] != "tbe":
            by_config.setdefault((r["rows"], r["optimizer"], r["compression"]), {})[r["method"]] = r
    for (n, optimizer, ratio), runs in by_config.items():
        dense, sparse, auto = (runs[f"robe {g}"] for g in ("dense", "sparse", "auto"))
        base = tbe.get((n, optimizer))
        ratio_cells = [f"{dense['ms'] / base:.2f}", f"{sparse['ms'] / base:.2f}"] if base else ["", ""]
        picks = "sparse" if dense["memory_over_touched"] > AUTO_DENSE_RATIO else "dense"
        lines.append(
            f"| {n:,} | {optimizer} | {ratio:g}x | {dense['memory_over_touched']:.1f} | {dense['ms']:.2f} | "
            f"{sparse['ms']:.2f} | {auto['ms']:.2f} | {picks} | " + " | ".join(ratio_cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[4_000_000, 16_000_000, 64_000_000, 256_000_000])
    parser.add_argument("--compression", type=float, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--pooling", type=int, default=1)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--budget-gb", type=float, default=8.0, help="skip tables (TBE) / memories (ROBE) above it")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "fused_step")
    args = parser.parse_args()
    results = run(args.rows, args.compression, args.pooling, args.batch, args.dim, args.chunk_size, args.budget_gb,
                  args.warmup, args.iters)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    table = markdown(results, meta)
    Path(f"{args.out}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
