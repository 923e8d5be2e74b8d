"""ROBE training step on the CPU: the fused C++ kernels against FBGEMM's CPU TBE and the pure-torch path.

One step = forward + backward + SGD, batch ``B`` bags of ``L`` uniform random ids of one table of ``n`` rows
and ``d`` columns, the loss ``out.sum()``. Three ways, in the same process on the same batch:

- ``tbe``: FBGEMM's ``SplitTableBatchedEmbeddingBagsCodegen`` with ``EXACT_SGD`` fused into backward
  (``tbe_step`` of ``benchmarks/lookup.py``) on the uncompressed ``n x d`` table;
- ``robe c++``: ``robe_pooled_forward`` then ``robe_sgd_update_`` (backward fused with SGD) of
  ``torchrec_pss_plugins.robe.cpu_kernels``;
- ``robe module``: what a user runs, ``CompressedEmbeddingBagCollection`` (input checks off, as torchrec's EBC
  checks nothing) with ``apply_optimizer_in_backward(torch.optim.SGD)``, so the same kernels behind the ops, the
  KJT split, autograd and the KeyedTensor;
- ``robe torch``: the pure-torch path, ``CompressedEmbeddingBagCollection`` with ``RobeConfig(gradient="auto")``
  and ``torch.optim.SGD`` (as ``benchmarks/lookup.py`` runs it) under ``TORCHREC_PSS_KERNELS=reference``, so its
  ops run their PyTorch references rather than these kernels.

    python benchmarks/robe_cpu_step.py --rows 1000000 4000000 --pooling 1 20 --compression 100 1000

times the four in interleaved rounds, prints a markdown table (medians in ms, ratios to TBE) and with ``--out``
writes it and a JSON file.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from lookup import LR, collection_step, interleaved_medians, tbe_step
from run_info import run_header, write_result
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec_pss_plugins.robe import RobeMemory
from torchrec_pss_plugins.robe.cpu_kernels import load

from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.kernels import ENVIRONMENT_VARIABLE


class _RobeSGD(torch.autograd.Function):
    """Pooled ROBE lookup (SUM) whose backward applies SGD to the memory in place (no memory gradient)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, weight: torch.Tensor, memory: RobeMemory, ids: torch.Tensor,
                offsets: torch.Tensor, kernels: ModuleType) -> torch.Tensor:
        config, table = memory.config, next(iter(memory.tables.values()))
        ctx.args = (memory.weight.detach(), ids, offsets, memory.hash_coefficients, memory.table_keys[:1],
                    config.chunk_size, config.use_sign)
        ctx.kernels = kernels
        weight, ids, offsets, coefficients, key, chunk, use_sign = ctx.args
        return kernels.robe_pooled_forward(weight, ids, offsets, None, coefficients, key, table.embedding_dim, chunk,
                                           use_sign, False)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[None, ...]:
        weight, ids, offsets, coefficients, key, chunk, use_sign = ctx.args
        ctx.kernels.robe_sgd_update_(weight, grad, ids, offsets, None, coefficients, key, chunk, use_sign, False, LR)
        return None, None, None, None, None


def reference_step(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the methods' ops switched to their pure-PyTorch references while it runs."""

    def run() -> None:
        previous = os.environ.get(ENVIRONMENT_VARIABLE)
        os.environ[ENVIRONMENT_VARIABLE] = "reference"
        try:
            step()
        finally:
            if previous is None:
                del os.environ[ENVIRONMENT_VARIABLE]
            else:
                os.environ[ENVIRONMENT_VARIABLE] = previous

    return run


def cpp_step(memory: RobeMemory, kjt: KeyedJaggedTensor, kernels: ModuleType) -> Callable[[], None]:
    ids, offsets = kjt.values(), kjt.offsets()
    return lambda: _RobeSGD.apply(memory.weight, memory, ids, offsets, kernels).sum().backward()


def module_step(table: EmbeddingBagConfig, config: RobeConfig, kjt: KeyedJaggedTensor) -> Callable[[], None]:
    """The module's training step with SGD fused into backward (the fast kernels' path)."""
    module = CompressedEmbeddingBagCollection([table], {"t": config}, validate_inputs=False)
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": LR})
    return lambda: module(kjt).values().sum().backward()


def run(rows: list[int], poolings: list[int], ratios: list[float], batch: int, dim: int, chunk: int,
        warmup: int, iters: int, with_torch: bool) -> list[dict]:
    kernels = load()
    if kernels is None:
        raise SystemExit("the ROBE C++ extension could not be built (see the warning above)")
    results = []
    for n in rows:
        table = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=n, feature_names=["f"])
        for pooling in poolings:
            lengths = torch.full((batch,), pooling)
            kjt = KeyedJaggedTensor(
                keys=["f"],
                values=torch.randint(0, n, (batch * pooling,), generator=torch.Generator().manual_seed(0)),
                lengths=lengths,
                offsets=torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            )
            common = {"rows": n, "pooling": pooling, "batch": batch, "dim": dim, "chunk_size": chunk}
            steps = {"tbe": tbe_step(n, dim, kjt, EmbOptimType.EXACT_SGD)}
            for ratio in ratios:
                config = RobeConfig(compression=ratio, chunk_size=chunk, gradient="auto")
                steps[f"robe c++ {ratio:g}"] = cpp_step(RobeMemory(config, [table]), kjt, kernels)
                steps[f"robe module {ratio:g}"] = module_step(table, config, kjt)
                if with_torch:
                    module = CompressedEmbeddingBagCollection([table], {"t": config})
                    steps[f"robe torch {ratio:g}"] = reference_step(collection_step(module, kjt))
            medians = dict(zip(steps, interleaved_medians(list(steps.values()), warmup, iters, torch.device("cpu"))))
            results.append({**common, "method": "tbe", "compression": 1, "ms": medians["tbe"]})
            for ratio in ratios:
                for method in ("robe c++", "robe module", "robe torch")[: 2 + with_torch]:
                    ms = medians[f"{method} {ratio:g}"]
                    results.append({**common, "method": method, "compression": ratio, "ms": ms})
            print(f"n={n} L={pooling}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in medians.items()), flush=True)
    return results


def markdown(results: list[dict], meta: dict) -> str:
    caption = (f"Generated by `{meta['command']}` on {meta['date']}. Training step (forward + backward + SGD), "
               f"median ms and ratio to FBGEMM CPU TBE (EXACT_SGD) on the same logical table, all timed in interleaved "
               f"rounds; ROBE chunk size Z = {results[0]['chunk_size']}, batch {results[0]['batch']}, "
               f"d = {results[0]['dim']}; torch {meta['torch']}, {meta['threads']} threads, {meta['machine']}.")
    lines = [
        caption,
        "",
        "| rows | L | method | compression | ms | / TBE |",
        "|---|---|---|---|---|---|",
    ]
    base = {(r["rows"], r["pooling"]): r["ms"] for r in results if r["method"] == "tbe"}
    for r in results:
        ratio = r["ms"] / base[(r["rows"], r["pooling"])]
        lines.append(f"| {r['rows']:,} | {r['pooling']} | {r['method']} | {r['compression']:g}x | {r['ms']:.2f} "
                     f"| {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    parser.add_argument("--pooling", type=int, nargs="+", default=[1, 20])
    parser.add_argument("--compression", type=float, nargs="+", default=[100, 1000])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunk-size", type=int, default=32, help="ROBE chunk size Z")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--no-torch", action="store_true", help="skip the (slow) pure-torch ROBE path")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (TBE and the kernels)")
    parser.add_argument("--out", type=Path, default=None, help="path stem for .json and .md; default: print only")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    results = run(args.rows, args.pooling, args.compression, args.batch, args.dim, args.chunk_size, args.warmup,
                  args.iters, not args.no_torch)
    meta = run_header(__file__, None)
    table = markdown(results, meta)
    if args.out is not None:
        write_result(args.out, {"meta": meta, "results": results}, table)
    print(table)


if __name__ == "__main__":
    main()
