"""Host overhead of the ROBE ops and of a small training step: what a call costs beyond its kernel.

At small batches a step is bound by the host: the dispatcher and Python layers around the kernels, not
the kernels. Measured in one process at ``--batch`` bags of ``--pooling`` ids, ``d`` = 128, ROBE-32 at 1000×
(``--rows`` logical rows, 4M by default); each figure is the median over ``--repeats`` blocks of the mean time of ``--calls``
back-to-back calls (one device synchronisation per block, so on CUDA a call costs its launch, not a
round trip):

- ``kernel``: the device kernel (the C++ extension on CPU, Triton on CUDA) called through the adapter the op's
  kernel calls (``ops._pooled_kernel`` / ``ops._sgd_cpu`` / ``ops._sgd_cuda``), so ``op - kernel`` is the
  registration's own cost;
- ``op``: ``torchrec_pss::robe_pooled`` (:func:`torchrec_pss.kernels.define_op`), without and with autograd
  (``M`` requires grad, so the call records its backward), and ``torchrec_pss::robe_sgd_update_``;
- ``custom_op``: the same kernels registered through ``torch.library.custom_op`` + ``register_autograd``
  (how the ops were registered before), for comparison;
- ``step``: ``CompressedEmbeddingBagCollection`` (input checks off) forward + backward with SGD fused into
  backward, against ``torch.nn.EmbeddingBag(sparse=True)`` with torch's SGD in backward (the GPU baseline of
  ``benchmarks/grid.py``); ``forward``: the same under ``no_grad``. On CUDA also the step's device time
  (its kernels, summed by ``torch.profiler``), so ``step - device`` shows the host's share;
- ``caller-thread step``: both steps again with backward on the calling thread
  (``torch.autograd.set_multithreading_enabled(False)``). By default autograd runs a CUDA backward on its
  device thread, where the module's backward (Python: it launches the fused Triton SGD) must take the GIL
  across threads; ``nn.EmbeddingBag``'s backward is all C++;
- ``host profile``: ``cProfile`` over ``--profile-steps`` module steps with backward on the calling thread (cProfile
  sees one thread), the ``--profile-top`` functions of most own time: where a step's host time goes, per step.
  cProfile adds its own cost to every Python call, so read the shares, not the microseconds.

    python benchmarks/op_overhead.py --out benchmarks/results/op_overhead_cpu

writes ``STEM.json`` and ``STEM.md``.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from run_info import run_header, write_result
from torch.profiler import ProfilerActivity, profile
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.optim import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_pss import CompressedEmbeddingBagCollection, RobeConfig
from torchrec_pss.kernels import _device_kernel, _tensor_positions
from torchrec_pss_plugins.robe import cpu_kernels, ops, reference

DIM, CHUNK, COMPRESSION, LR = 128, 32, 1000, 0.01


def device_loader(device: torch.device) -> Callable[[], Any]:
    """The loader of the ROBE device kernels for ``device`` (the C++ extension or the Triton module)."""
    if device.type == "cuda":
        return lambda: importlib.import_module("torchrec_pss_plugins.robe.triton_kernels")
    return cpu_kernels.load


def sgd_adapter(device: torch.device) -> Callable[..., None]:
    """The adapter ``robe_sgd_update_``'s kernel for ``device`` calls: ``(kernels, *op_args)``."""
    return ops._sgd_cuda if device.type == "cuda" else ops._sgd_cpu


def custom_op_versions(device: torch.device) -> tuple[Callable[..., Tensor], Callable[..., None]]:
    """``robe_pooled`` and ``robe_sgd_update_`` registered as they were before ``define_op``: through
    ``torch.library.custom_op``, with the same schemas, the same kernel closures (``define_op``'s, calling the
    same device kernels with the same checks) and the same autograd formula."""

    @torch.library.custom_op("torchrec_pss_overhead::robe_pooled", mutates_args=())
    def pooled(memory: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None, coefficients: Tensor,
               keys: Tensor, dim: int, chunk_size: int, use_sign: bool, mean: bool, sparse_grad: bool) -> Tensor:
        return reference.pooled_forward(memory, ids, offsets, weights, coefficients, keys, dim, chunk_size,
                                        use_sign, mean)

    pooled.register_kernel(device.type)(_device_kernel(pooled._init_fn, _tensor_positions(pooled._opoverload), [],
                                                       device_loader(device), ops._pooled_kernel))
    pooled.register_autograd(ops._backward, setup_context=ops._setup_context)

    @torch.library.custom_op("torchrec_pss_overhead::robe_sgd_update_", mutates_args=("memory",))
    def sgd(memory: Tensor, grad: Tensor, ids: Tensor, offsets: Tensor, weights: Tensor | None,
            coefficients: Tensor, keys: Tensor, chunk_size: int, use_sign: bool, mean: bool, lr: float) -> None:
        reference.sgd_update_(memory, grad, ids, offsets, weights, coefficients, keys, chunk_size, use_sign, mean, lr)

    sgd.register_kernel(device.type)(_device_kernel(sgd._init_fn, _tensor_positions(sgd._opoverload), [0],
                                                    device_loader(device), sgd_adapter(device)))
    return pooled, sgd


def per_call_us(call: Callable[[], Any], calls: int, repeats: int, device: torch.device) -> float:
    """Median over ``repeats`` blocks of the mean microseconds per call of ``calls`` back-to-back calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(calls):
        call()
    blocks = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        sync()
        blocks.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(blocks)


def device_us_per_call(call: Callable[[], Any], calls: int) -> float:
    """Microseconds of CUDA time (the kernels' own, summed by ``torch.profiler``) per call of ``call``."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / calls


def measure(batch: int, pooling: int, rows: int, calls: int, repeats: int, device: torch.device,
            kernels: Any, custom_ops: tuple[Callable[..., Tensor], Callable[..., None]], profile_steps: int = 0,
            profile_top: int = 12) -> dict[str, Any]:
    table = EmbeddingBagConfig(name="t", embedding_dim=DIM, num_embeddings=rows, feature_names=["f"])
    module = CompressedEmbeddingBagCollection([table], {"t": RobeConfig(compression=COMPRESSION, chunk_size=CHUNK)},
                                              device, validate_inputs=False)
    memory = module.memory_for("t")
    weight, coefficients = memory.weight, memory.hash_coefficients
    keys = memory.table_keys[:1]
    lengths = torch.full((batch,), pooling, device=device)
    ids = torch.randint(0, rows, (batch * pooling,), generator=torch.Generator().manual_seed(0)).to(device)
    offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    grad = torch.randn(batch, DIM, device=device)
    plain = weight.detach()
    update = sgd_adapter(device)
    custom_pooled, custom_sgd = custom_ops
    args = (ids, offsets, None, coefficients, keys, DIM, CHUNK, True, False, False)
    sgd_args = (grad, ids, offsets, None, coefficients, keys, CHUNK, True, False, 0.0)
    times: dict[str, Any] = {}

    def timed(name: str, call: Callable[[], Any]) -> None:
        times[name] = per_call_us(call, calls, repeats, device)

    with torch.no_grad():
        timed("kernel_forward_us", lambda: ops._pooled_kernel(kernels, plain, *args))
        timed("op_forward_us", lambda: ops.robe_pooled(plain, *args))
        timed("custom_op_forward_us", lambda: custom_pooled(plain, *args))
        timed("kernel_sgd_us", lambda: update(kernels, plain, *sgd_args))
        timed("op_sgd_us", lambda: ops.robe_sgd_update_(plain, *sgd_args))
        timed("custom_op_sgd_us", lambda: custom_sgd(plain, *sgd_args))
    timed("op_forward_autograd_us", lambda: ops.robe_pooled(weight, *args))
    timed("custom_op_forward_autograd_us", lambda: custom_pooled(weight, *args))

    kjt = KeyedJaggedTensor(keys=["f"], values=ids, lengths=lengths, offsets=offsets)
    apply_optimizer_in_backward(torch.optim.SGD, module.parameters(), {"lr": LR})
    def module_step() -> None:
        module(kjt).values().sum().backward()

    timed("module_step_us", module_step)
    with torch.autograd.set_multithreading_enabled(False):
        timed("module_step_caller_thread_us", module_step)
    with torch.no_grad():
        timed("module_forward_us", lambda: module(kjt).values())
    bag = torch.nn.EmbeddingBag(rows, DIM, mode="sum", sparse=True, include_last_offset=True, device=device)
    apply_optimizer_in_backward(torch.optim.SGD, bag.parameters(), {"lr": LR})
    def bag_step() -> None:
        bag(ids, offsets).sum().backward()

    timed("embedding_bag_step_us", bag_step)
    with torch.autograd.set_multithreading_enabled(False):
        timed("embedding_bag_step_caller_thread_us", bag_step)
    with torch.no_grad():
        timed("embedding_bag_forward_us", lambda: bag(ids, offsets))
    if device.type == "cuda":
        times["module_step_device_us"] = device_us_per_call(module_step, calls)
        times["embedding_bag_step_device_us"] = device_us_per_call(bag_step, calls)
    if profile_steps > 0:
        times["host_profile"] = host_profile(module_step, profile_steps, profile_top)
    return times


def host_profile(step: Callable[[], None], steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions of most own time over ``steps`` calls of ``step`` (after one warm-up call), backward on
    the calling thread: ``function`` (file:line(name), shortened to the package path), calls and own /
    cumulative microseconds per step, and ``share`` (own time / the profiled total)."""
    step()
    profiler = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        profiler.enable()
        for _ in range(steps):
            step()
        profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    total = sum(entry[2] for entry in stats.values())
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [{"function": _function_name(*key), "calls": entry[1] / steps, "own_us": entry[2] / steps * 1e6,
             "cumulative_us": entry[3] / steps * 1e6, "share": entry[2] / total} for key, entry in rows]


def _function_name(file: str, line: int, name: str) -> str:
    """``file:line(name)``, the file from its package on (from this repository's top folder for its own code);
    a builtin by its name alone."""
    if file == "~":
        return name
    for marker, keep in (("site-packages/", ""), ("/torchrec_pss/", "torchrec_pss/"), ("/plugins/", "plugins/")):
        _, found, tail = file.partition(marker)
        if found:
            return f"{keep}{tail}:{line}({name})"
    return f"{file}:{line}({name})"


OP_ROWS = [
    ("robe_pooled, no autograd", "kernel_forward_us", "op_forward_us", "custom_op_forward_us"),
    ("robe_pooled, with autograd", "kernel_forward_us", "op_forward_autograd_us", "custom_op_forward_autograd_us"),
    ("robe_sgd_update_", "kernel_sgd_us", "op_sgd_us", "custom_op_sgd_us"),
]


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Host overhead of the ROBE ops ({result['device_name']})", "",
             f"Generated by `{result['command']}` on {result['date']}: ROBE-32 "
             f"at {COMPRESSION}x of {result['rows']:,} x {DIM}, per-call microseconds (median over {result['repeats']} blocks of "
             f"{result['calls']} back-to-back calls), {result['threads']} threads, torch {result['torch']}.", "",
             "## Ops: the kernel alone, the op, the same kernel behind `torch.library.custom_op`", "",
             "| B | L | call | kernel us | op us | custom_op us | op - kernel us | custom_op - kernel us |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    for cell in result["cells"]:
        for label, kernel, op, custom in OP_ROWS:
            lines.append(f"| {cell['batch']} | {cell['pooling']} | {label} | {cell[kernel]:.1f} | {cell[op]:.1f} | "
                         f"{cell[custom]:.1f} | {cell[op] - cell[kernel]:.1f} | {cell[custom] - cell[kernel]:.1f} |")
    lines += ["", "## Module against `nn.EmbeddingBag(sparse=True)` + SGD in backward", "",
              "| B | L | module fwd us | EmbeddingBag fwd us | fwd ratio | module step us | EmbeddingBag step us | "
              "step ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in result["cells"]:
        lines.append(f"| {cell['batch']} | {cell['pooling']} | {cell['module_forward_us']:.1f} | "
                     f"{cell['embedding_bag_forward_us']:.1f} | "
                     f"{cell['module_forward_us'] / cell['embedding_bag_forward_us']:.2f} | "
                     f"{cell['module_step_us']:.1f} | {cell['embedding_bag_step_us']:.1f} | "
                     f"{cell['module_step_us'] / cell['embedding_bag_step_us']:.2f} |")
    if all("module_step_caller_thread_us" in cell for cell in result["cells"]):
        lines += ["", "## Training step with backward on the calling thread", "",
                  "`torch.autograd.set_multithreading_enabled(False)`: no hand-over to autograd's device thread.", "",
                  "| B | L | module step us | caller-thread us | EmbeddingBag step us | caller-thread us | "
                  "caller-thread ratio |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for cell in result["cells"]:
            lines.append(f"| {cell['batch']} | {cell['pooling']} | {cell['module_step_us']:.1f} | "
                         f"{cell['module_step_caller_thread_us']:.1f} | {cell['embedding_bag_step_us']:.1f} | "
                         f"{cell['embedding_bag_step_caller_thread_us']:.1f} | "
                         f"{cell['module_step_caller_thread_us'] / cell['embedding_bag_step_caller_thread_us']:.2f} |")
    if all("module_step_device_us" in cell for cell in result["cells"]):
        lines += ["", "## Training step: device (kernel) time against wall time", "",
                  "Device time: the step's kernels as `torch.profiler` sums them; the rest of a back-to-back step's "
                  "wall time is the host's (Python, dispatch, launches) not hidden behind the kernels.", "",
                  "| B | L | module step us | module kernels us | EmbeddingBag step us | EmbeddingBag kernels us |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for cell in result["cells"]:
            lines.append(f"| {cell['batch']} | {cell['pooling']} | {cell['module_step_us']:.1f} | "
                         f"{cell['module_step_device_us']:.1f} | {cell['embedding_bag_step_us']:.1f} | "
                         f"{cell['embedding_bag_step_device_us']:.1f} |")
    if all("host_profile" in cell for cell in result["cells"]):
        lines += ["", "## Host profile of the module's training step", "",
                  f"`cProfile` over {result['profile_steps']} steps, backward on the calling thread: the functions of "
                  "most own time, per step (cProfile's own cost inflates the microseconds; the shares compare).", ""]
        for cell in result["cells"]:
            lines += [f"B = {cell['batch']}, L = {cell['pooling']}:", "",
                      "| function | calls | own us | cumulative us | share of own time |", "|---|---:|---:|---:|---:|"]
            lines += [f"| `{row['function']}` | {row['calls']:g} | {row['own_us']:.1f} | {row['cumulative_us']:.1f} | "
                      f"{100 * row['share']:.0f}% |" for row in cell["host_profile"]]
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[8, 512])
    parser.add_argument("--pooling", type=int, nargs="+", default=[1])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--profile-steps", type=int, default=200,
                        help="module steps profiled with cProfile per cell (0: no host profile)")
    parser.add_argument("--profile-top", type=int, default=12, help="functions listed per host profile")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/op_overhead_cpu"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    kernels = device_loader(device)()
    if kernels is None:
        raise SystemExit("the ROBE device kernels cannot be loaded here; nothing to compare")
    custom_ops = custom_op_versions(device)
    cells = []
    for batch in args.batch:
        for pooling in args.pooling:
            times = measure(batch, pooling, args.rows, args.calls, args.repeats, device, kernels, custom_ops,
                            args.profile_steps, args.profile_top)
            cell = {"batch": batch, "pooling": pooling, **times}
            print(json.dumps({k: v for k, v in cell.items() if k != "host_profile"}), flush=True)
            cells.append(cell)
    result = {**run_header(__file__, argv, device), "rows": args.rows, "calls": args.calls, "repeats": args.repeats,
              "profile_steps": args.profile_steps, "threads": torch.get_num_threads(), "cells": cells}
    write_result(args.out, result, markdown(result))
    return result


if __name__ == "__main__":
    main()
