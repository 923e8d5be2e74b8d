"""Compile every Triton kernel of the plugins for a real NVIDIA GPU, on a machine without one.

The tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``), which accepts constructs a GPU build
rejects or reads differently (block shapes, integer widths, API changes). This script imports the kernel modules
*without* the interpreter, calls each op's Triton wrapper on small CPU tensors with the launches replaced by a
compile to a cubin for ``--arch`` (ptxas ships with Triton), and launches nothing. Every ``@triton.jit`` kernel
the modules define must be compiled at least once. The calls cover the main specializations: ROBE Z = 1 / 32 /
2·d, SUM and weighted MEAN, one key and a key per bag, 32- and 64-bit positions, atomics and sorted segments, the
touched-position marks of ``robe_sparse_grad``, Adagrad; QR mult / add / concat; TT with 2–4 cores and ranks up
to 32.

    python scripts/triton_compile_check.py [--arch 90]

prints one line per compiled kernel and exits 1 when a kernel fails to compile or is never launched.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels must be JITFunctions

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from torchrec_pss.triton_launcher import Launcher  # noqa: E402
from torchrec_pss_plugins.qr.qr import part_rows  # noqa: E402

KERNEL_MODULES = (
    "torchrec_pss_plugins.robe.triton_kernels",
    "torchrec_pss_plugins.qr.triton_kernels",
    "torchrec_pss_plugins.tt.triton_kernels",
)


class CompileOnly:
    """Replaces ``JITFunction.run`` (the launch of ``kernel[grid](...)``) by a compile for ``arch``; records
    how many specializations of each kernel compiled (``compiled``, by kernel name) and the failures."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self.compiled: dict[str, int] = {}
        self.failures: list[str] = []
        self._seen: set[tuple[str, str, str]] = set()

    def run(self, kernel: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        binder = create_function_from_signature(kernel.signature, kernel.params, self.backend)
        bound_args, specialization, options = binder(*args, **kwargs)
        name = kernel.fn.__name__
        key = (name, str(specialization), str(options))
        if key in self._seen:
            return
        self._seen.add(key)
        options, signature, constexprs, attrs = kernel._pack_args(self.backend, kwargs, bound_args, specialization,
                                                                  options)
        constants = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
        start = time.perf_counter()
        try:
            triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=self.target,
                           options=options.__dict__)
        except Exception as error:  # noqa: BLE001 - every compile failure is reported, then the script fails
            self.failures.append(f"{name} {constants}: {type(error).__name__}: {error}")
            print(f"FAIL {name} {constants}\n{error}", flush=True)
            return
        self.compiled[name] = self.compiled.get(name, 0) + 1
        print(f"ok   {name} ({time.perf_counter() - start:.1f} s) {constants}", flush=True)

    def install(self) -> None:
        compile_only = self

        def run(kernel: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            compile_only.run(kernel, *args, grid=grid, warmup=warmup, **kwargs)

        def launch(launcher: Launcher, grid: tuple[int, ...], *args: Any, **constants: Any) -> None:
            launcher.kernel[grid](*args, **constants)

        JITFunction.run = run
        Launcher.__call__ = launch


def kernels_of(module: ModuleType) -> set[str]:
    """The names of the ``@triton.jit`` kernels (launched from the host: ``*_kernel``) a module defines."""
    return {name for name, value in vars(module).items() if isinstance(value, JITFunction) and name.endswith("_kernel")}


def bags(num_embeddings: int, lengths: list[int], seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids [N], offsets [B + 1], weights [N])``."""
    generator = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    ids = torch.randint(0, num_embeddings, (int(lengths_t.sum()),), generator=generator)
    return ids, torch.cat([lengths_t.new_zeros(1), lengths_t.cumsum(0)]), torch.rand(ids.numel(), generator=generator)


def robe_calls(robe: ModuleType, chunk_sizes: tuple[int, ...]) -> list[Callable[[], Any]]:
    """Every ROBE wrapper at each chunk size, alternating one key / a key per bag and plain SUM / weighted MEAN."""
    d, memory_size = 128, 4099
    coefficients = torch.randint(1, 2**31 - 1, (2, 4), generator=torch.Generator().manual_seed(0))
    ids, offsets, weights = bags(2**62, [0, 3, 1, 12, 5], seed=1)
    memory = torch.randn(memory_size)
    grad = torch.randn(offsets.numel() - 1, d)
    one_key, key_per_bag = torch.tensor([7]), torch.arange(offsets.numel() - 1)
    calls: list[Callable[[], Any]] = []
    for z in chunk_sizes:
        for keys, w, mean in ((one_key, None, False), (key_per_bag, weights, True)):
            args, options = (ids, offsets, w, coefficients, keys), (z, True, mean)
            calls += [
                lambda a=args, o=options: robe.robe_pooled_forward(memory, *a, d, *o),
                lambda a=args, o=options: robe.robe_pooled_backward(grad, *a, memory_size, d, *o),
                lambda a=args, o=options: robe.robe_pooled_backward(grad, *a, memory_size, d, *o, segments=True),
                lambda a=args, o=options: robe.robe_sparse_grad(grad, *a, memory_size, d, *o),
                lambda a=args, o=options: robe.robe_sgd_update_(memory.clone(), grad, *a, d, *o, 0.1),
                lambda k=keys, o=options: robe.robe_weights_grad(grad, memory, ids, offsets, coefficients, k, d, *o),
            ]
    for block_size in (1, 32):
        calls.append(lambda b=block_size: robe.blockwise_adagrad_update_(
            memory.clone(), torch.zeros(-(-memory_size // b)), torch.randn(memory_size), 0.1, 1e-8, b))
    return calls


def qr_calls(qr: ModuleType) -> list[Callable[[], Any]]:
    """Every QR wrapper for each operation, two and three parts."""
    n, collisions = 1000, 7
    ids, offsets, weights = bags(n, [0, 3, 1, 12, 5], seed=2)
    calls: list[Callable[[], Any]] = []
    for operation, widths in (("mult", (12, 12)), ("add", (160, 160)), ("concat", (40, 40, 40))):
        parts = [torch.randn(r, w) for r, w in zip(part_rows(n, collisions, len(widths)), widths)]
        d = widths[0] if operation != "concat" else sum(widths)
        grad = torch.randn(offsets.numel() - 1, d)
        for w, mean in ((None, False), (weights, True)):
            args = (ids, offsets, w, collisions, operation, mean)
            calls += [
                lambda p=parts, a=args: qr.qr_pooled_forward(p, *a),
                lambda p=parts, a=args, g=grad: qr.qr_pooled_backward(g, p, *a),
                lambda p=parts, a=args, g=grad: qr.qr_grad_rows(g, p, *a),
            ]
        calls.append(lambda p=parts, g=grad, o=operation: qr.qr_weights_grad(g, p, ids, offsets, collisions, o, True))
    return calls


def tt_calls(tt: ModuleType) -> list[Callable[[], Any]]:
    """TT rows and their core gradients: 2, 3 and 4 cores, ranks 3 to 32."""
    calls: list[Callable[[], Any]] = []
    for rows, columns, rank in (((40, 25), (3, 4), 3), ((20, 20, 25), (4, 4, 8), 16), ((20, 20, 25), (4, 4, 8), 32),
                                ((8, 8, 8, 10), (2, 2, 2, 3), 4)):
        ranks = (1, *([rank] * (len(rows) - 1)), 1)
        cores = [torch.randn(rows[j], ranks[j], columns[j], ranks[j + 1]) for j in range(len(rows))]
        ids = bags(math.prod(rows), [6], seed=rank)[0]
        grad = torch.randn(ids.numel(), math.prod(columns))
        calls += [lambda c=cores, i=ids: tt.tt_rows(c, i), lambda c=cores, i=ids, g=grad: tt.tt_rows_backward(g, c, i)]
    return calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90: Hopper)")
    args = parser.parse_args(argv)
    compile_only = CompileOnly(args.arch)
    compile_only.install()
    modules = [importlib.import_module(name) for name in KERNEL_MODULES]
    robe, qr, tt = modules
    for call in robe_calls(robe, (1, 32, 256)) + qr_calls(qr) + tt_calls(tt):
        call()
    narrow_limit, robe.NARROW_LIMIT = robe.NARROW_LIMIT, 0  # int64 positions (|M| >= 2^31) on small tensors
    try:
        for call in robe_calls(robe, (1, 32)):
            call()
    finally:
        robe.NARROW_LIMIT = narrow_limit
    expected = set().union(*(kernels_of(module) for module in modules))
    never = sorted(expected - set(compile_only.compiled))
    print(f"compiled {sum(compile_only.compiled.values())} specializations of {len(compile_only.compiled)} kernels "
          f"for sm_{args.arch}; {len(compile_only.failures)} failures; never launched: {never or 'none'}")
    return 1 if compile_only.failures or never else 0


if __name__ == "__main__":
    sys.exit(main())
