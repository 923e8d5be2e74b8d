"""Atomics against sorted segments in ROBE's Triton backward (the fused SGD update), on uniform, power-law and
real Criteo ids.

The atomic backward adds every element of every id occurrence to ``M`` with ``tl.atomic_add`` (``N · d`` atomics);
the sorted-segments one (``segments=True``) sorts the occurrences by (table, id), sums each distinct id's gradient
rows in one program and adds each distinct id's elements once (``U · d`` atomics for ``U`` distinct ids, plus a
sort). Which wins depends on how often ids repeat in a batch, so the cells vary that:

- ``uniform``: ``--batch`` bags of ``L`` ids uniform over ``--rows`` (almost no repeats);
- ``zipf``: the same bags with ids drawn from a power law over the rows (rank ``k`` with probability
  ``∝ k^-a``, ``a`` = ``--zipf-exponent``);
- ``criteo``: the 26 categorical features of the first ``min(--batch, 7200)`` rows of the real Criteo sample
  (``../shared/data/criteo/kaggle_8k_train.tsv``, raw 32-bit hashes), each feature a table sharing one ``M``:
  bags of one id with per-bag table keys, as a compressed DLRM's step sees them.

``M`` holds ``rows · d / compression`` floats, d = 128, SUM pooling with signs, SGD. Per cell: wall microseconds per
call (median over ``--repeats`` blocks of ``--calls`` back-to-back calls), on CUDA also the kernels' device time
(``torch.profiler``), the share of distinct ids ``U / N``, and the largest difference between the two updates of
the same ``M``. Without CUDA the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``): a check of the
script on small inputs, not a timing.

    python benchmarks/robe_scatter.py --device cuda --out benchmarks/results/robe_scatter_h200

writes ``STEM.json`` and ``STEM.md``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from op_overhead import device_us_per_call, per_call_us
from run_info import run_header, write_result
from torchrec.datasets.criteo import DEFAULT_CAT_NAMES
from torchrec_pss.datasets import read_criteo_rows
from torchrec_pss.hashing import hash_coefficients, table_key
from torchrec_pss_plugins.robe.triton_kernels import robe_sgd_update_

DIM = 128
LR = 0.01
CRITEO_FILE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "criteo" / "kaggle_8k_train.tsv"


def zipf_ids(rows: int, count: int, exponent: float, generator: torch.Generator) -> torch.Tensor:
    """``count`` ids in ``[0, rows)``: rank ``k`` (id ``k - 1``) with probability ``∝ k^-exponent`` (inverse CDF of
    the continuous power law, floored); ``exponent != 1``."""
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    power = 1.0 - exponent
    ranks = ((rows ** power - 1.0) * u + 1.0) ** (1.0 / power)
    return (ranks.floor().to(torch.int64) - 1).clamp_(0, rows - 1)


def criteo_bags(path: Path, batch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [26 R], offsets [26 R + 1], keys [26 R])``: feature-major bags of one id each of the first
    ``R = min(batch, rows in the file)`` rows, every bag keyed by its feature's table."""
    rows = []
    for row in read_criteo_rows(str(path), [1 << 62] * len(DEFAULT_CAT_NAMES)):
        rows.append(row[2])
        if len(rows) == batch:
            break
    ids = torch.tensor(rows, dtype=torch.int64).t().reshape(-1)
    keys = torch.tensor([table_key(name) for name in DEFAULT_CAT_NAMES]).repeat_interleave(len(rows))
    return ids, torch.arange(ids.numel() + 1), keys


def distinct_share(ids: torch.Tensor, keys: torch.Tensor) -> float:
    """Distinct (table key, id) pairs over occurrences."""
    pairs = torch.stack([keys.expand_as(ids) if keys.numel() == 1 else keys, ids], dim=1)
    return torch.unique(pairs, dim=0).shape[0] / max(ids.numel(), 1)


def measure(ids: torch.Tensor, offsets: torch.Tensor, keys: torch.Tensor, memory_size: int, chunk_size: int,
            calls: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Both backwards on the same bags: wall (and on CUDA device) microseconds per call, the largest difference."""
    generator = torch.Generator().manual_seed(0)
    memory = (torch.randn(memory_size, generator=generator) * 0.01).to(device)
    grad = torch.randn(offsets.numel() - 1, DIM, generator=generator).to(device)
    coefficients = hash_coefficients(7, 2).to(device)
    ids_d, offsets_d, keys_d = ids.to(device), offsets.to(device), keys.to(device)

    def update(target: torch.Tensor, segments: bool) -> torch.Tensor:
        return robe_sgd_update_(target, grad, ids_d, offsets_d, None, coefficients, keys_d, DIM, chunk_size, True,
                                False, LR, segments=segments)

    atomic, sorted_ = update(memory.clone(), False), update(memory.clone(), True)
    result = {"distinct_share": distinct_share(ids, keys), "max_abs_diff": float((atomic - sorted_).abs().max()),
              "atomic_us": per_call_us(lambda: update(memory, False), calls, repeats, device),
              "sorted_us": per_call_us(lambda: update(memory, True), calls, repeats, device)}
    if device.type == "cuda":
        result["atomic_device_us"] = device_us_per_call(lambda: update(memory, False), calls)
        result["sorted_device_us"] = device_us_per_call(lambda: update(memory, True), calls)
    return result


def cells(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (distribution, L) input of the run, on the CPU."""
    generator = torch.Generator().manual_seed(1)
    inputs = []
    for distribution in args.distributions:
        if distribution == "criteo":
            ids, offsets, keys = criteo_bags(args.criteo_file, args.batch)
            inputs.append({"distribution": "criteo", "pooling": 1, "ids": ids, "offsets": offsets, "keys": keys})
            continue
        for pooling in args.pooling:
            count = args.batch * pooling
            ids = (torch.randint(0, args.rows, (count,), generator=generator) if distribution == "uniform"
                   else zipf_ids(args.rows, count, args.zipf_exponent, generator))
            inputs.append({"distribution": distribution, "pooling": pooling, "ids": ids,
                           "offsets": torch.arange(0, count + 1, pooling), "keys": torch.tensor([table_key("t")])})
    return inputs


def markdown(result: dict[str, Any]) -> str:
    has_device = all("atomic_device_us" in cell for cell in result["cells"])
    head = "| ids | L | N | distinct / N | compression | Z | atomic us | sorted us | sorted / atomic |"
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    if has_device:
        head += " atomic device us | sorted device us | device sorted / atomic |"
        rule += "---:|---:|---:|"
    lines = [f"# ROBE backward: atomics against sorted segments ({result['device_name']})", "",
             f"Generated by `{result['command']}` on {result['date']}: fused "
             f"SGD update of M = {result['rows']:,} x {DIM} / compression floats, B = {result['batch']} bags "
             f"(criteo: 26 x rows), per-call microseconds (median over {result['repeats']} blocks of "
             f"{result['calls']} back-to-back calls), torch {result['torch']}."
             + (" Triton interpreter: a check of the script, not a timing." if result["interpreted"] else ""),
             "", head, rule]
    for cell in result["cells"]:
        line = (f"| {cell['distribution']} | {cell['pooling']} | {cell['num_ids']:,} | {cell['distinct_share']:.3f} | "
                f"{cell['compression']}x | {cell['chunk_size']} | {cell['atomic_us']:.1f} | {cell['sorted_us']:.1f} | "
                f"{cell['sorted_us'] / cell['atomic_us']:.2f} |")
        if has_device:
            line += (f" {cell['atomic_device_us']:.1f} | {cell['sorted_device_us']:.1f} | "
                     f"{cell['sorted_device_us'] / cell['atomic_device_us']:.2f} |")
        lines.append(line)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--distributions", nargs="+", choices=["uniform", "zipf", "criteo"],
                        default=["uniform", "zipf", "criteo"])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--batch", type=int, default=10240)
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--compressions", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--zipf-exponent", type=float, default=1.05)
    parser.add_argument("--criteo-file", type=Path, default=CRITEO_FILE)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/robe_scatter"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    interpreted = device.type != "cuda"
    if interpreted and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("without CUDA the Triton kernels need TRITON_INTERPRET=1 (a check, not a timing)")
    results = []
    for cell in cells(args):
        for compression in args.compressions:
            for chunk_size in args.chunk_sizes:
                memory_size = max(1, args.rows * DIM // compression)
                times = measure(cell["ids"], cell["offsets"], cell["keys"], memory_size, chunk_size, args.calls,
                                args.repeats, device)
                row = {"distribution": cell["distribution"], "pooling": cell["pooling"],
                       "num_ids": cell["ids"].numel(), "compression": compression, "chunk_size": chunk_size, **times}
                print(json.dumps(row), flush=True)
                results.append(row)
    result = {**run_header(__file__, argv, device), "interpreted": interpreted, "rows": args.rows, "batch": args.batch,
              "calls": args.calls, "repeats": args.repeats, "cells": results}
    write_result(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
