"""Cost of the input checks: forward and training step of a Criteo-shaped module with and without them.

A ``CompressedEmbeddingBagCollection`` with the 26 Criteo features (cardinalities of the MLPerf preset,
capped at ``--max-rows``; tables above ``--min-rows`` compressed by ROBE-32 at 100x, the rest plain),
``d`` = 16, batch ``B`` bags of ``L`` ids per feature. The same module and batch are timed with
``validate_inputs`` True and False, alternating, median of ``--iters`` each:

    python benchmarks/validation_cost.py --out benchmarks/results/validation_cost

writes ``STEM.json`` and ``STEM.md`` (times and the overhead of the checks in percent).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.models.presets import MLPERF_NUM_EMBEDDINGS


def build(max_rows: int, min_rows: int, dim: int) -> tuple[CompressedEmbeddingBagCollection, list[int]]:
    """The module and its per-feature cardinalities."""
    rows = [min(n, max_rows) for n in MLPERF_NUM_EMBEDDINGS]
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=dim, num_embeddings=n, feature_names=[f])
              for f, n in zip(DEFAULT_CAT_NAMES, rows)]
    robe = RobeConfig(compression=100, chunk_size=min(32, dim), share_group="all")
    module = CompressedEmbeddingBagCollection(tables, {t.name: robe for t in tables if t.num_embeddings >= min_rows})
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": 0.01})
    return module, rows


def batch(rows: list[int], size: int, pooling: int) -> KeyedJaggedTensor:
    """``size`` bags of ``pooling`` uniform ids for every feature (seeded)."""
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randint(0, n, (size * pooling,), generator=generator) for n in rows])
    return KeyedJaggedTensor(keys=list(DEFAULT_CAT_NAMES), values=values,
                             lengths=torch.full((size * len(rows),), pooling))


def paired_medians(module: CompressedEmbeddingBagCollection, step: Callable[[], Any], iters: int) -> dict[str, float]:
    """Median milliseconds of ``step`` with the checks on and off, measured alternately."""
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * iters + 4):
        checked = i % 2 == 0
        module.validate_inputs = checked
        start = time.perf_counter()
        step()
        if i >= 4:
            times[checked].append((time.perf_counter() - start) * 1e3)
    module.validate_inputs = True
    on, off = statistics.median(times[True]), statistics.median(times[False])
    return {"checked_ms": on, "unchecked_ms": off, "overhead_percent": 100 * (on - off) / off}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--max-rows", type=int, default=1_000_000)
    parser.add_argument("--min-rows", type=int, default=100_000)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/validation_cost"))
    args = parser.parse_args(argv)
    module, rows = build(args.max_rows, args.min_rows, args.dim)
    cells = []
    for pooling in args.pooling:
        kjt = batch(rows, args.batch, pooling)

        def forward() -> None:
            with torch.no_grad():
                module(kjt)

        for name, step in (("forward", forward), ("training step", lambda: module(kjt).values().sum().backward())):
            cell = {"pooling": pooling, "what": name, **paired_medians(module, step, args.iters)}
            print(json.dumps(cell), flush=True)
            cells.append(cell)
    result = {"argv": argv, "batch": args.batch, "dim": args.dim, "features": len(rows),
              "threads": torch.get_num_threads(), "torch": torch.__version__, "cells": cells}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Cost of the input checks (26 Criteo features, B = {args.batch}, d = {args.dim}, CPU)", "",
             "| L | what | checked ms | unchecked ms | overhead |", "|---:|---|---:|---:|---:|"]
    lines += [f"| {c['pooling']} | {c['what']} | {c['checked_ms']:.2f} | {c['unchecked_ms']:.2f} | "
              f"{c['overhead_percent']:+.1f}% |" for c in cells]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    return result


if __name__ == "__main__":
    main()
