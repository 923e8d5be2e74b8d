"""The methods' ``torch.library`` ops (namespace ``torchrec_pss``), FBGEMM style, and which kernels they run.

:func:`define_op` defines an op from its reference implementation (the schema comes from its type hints) and
registers the reference as the default kernel plus CPU / CUDA kernels; :func:`register_autograd` gives an op
its backward. Both register straight on a ``torch.library.Library`` fragment instead of going through
``torch.library.custom_op``, whose per-call Python layers (an autograd wrapper on every op, a version-bump
kernel and argument re-binding for mutating ops, a dynamo guard around every kernel) cost 3–15× a small
batch's kernel time on the host (``benchmarks/op_overhead.py``). Fake kernels come from
``torch.library.register_fake``, so ``torch.compile`` and ``torch.export`` trace the ops as before.

``TORCHREC_PSS_KERNELS=reference`` makes every op run its reference implementation and turns off the
fused backward + optimizer kernels (for debugging and for benchmarks of the reference path).
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch._library.utils import is_tensorlist_like_type

NAMESPACE = "torchrec_pss"
ENVIRONMENT_VARIABLE = "TORCHREC_PSS_KERNELS"

_LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")


def reference_only() -> bool:
    """True when ``TORCHREC_PSS_KERNELS=reference`` (read on every call, so it can be switched at run time)."""
    value = os.environ.get(ENVIRONMENT_VARIABLE, "fast")
    if value not in ("fast", "reference"):
        raise ValueError(f"{ENVIRONMENT_VARIABLE}={value!r}: expected 'fast' or 'reference'")
    return value == "reference"


KernelSource = tuple[Callable[[], ModuleType | None], Callable[..., Any]]
"""``(load, call)``: ``load()`` gives the kernel module (or None when unavailable); ``call(module, *op_args)``."""


def define_op(name: str, *, mutates_args: Sequence[str] = (), cpu: KernelSource | None = None,
              cuda: KernelSource | None = None) -> Callable[[Callable[..., Any]], torch._ops.OpOverload]:
    """Decorator: define ``torchrec_pss::<name>`` with the decorated reference as its default kernel.

    The schema is inferred from the reference's annotations (``mutates_args`` names the arguments it writes
    in place; their version counters are bumped after every call, as for torch's in-place ops). The CPU /
    CUDA kernels run ``call(load(), *args)``, or the reference when ``load()`` gives None,
    :func:`reference_only` is set, a floating-point argument is not float32 (the device kernels' type) or a tensor
    the op writes in place is not contiguous (the device kernels write flat arrays).
    Returns the op (an ``OpOverload``: call it like the reference).
    """

    def define(reference: Callable[..., Any]) -> torch._ops.OpOverload:
        _LIBRARY.define(name + torch.library.infer_schema(reference, mutates_args=tuple(mutates_args)))
        op = getattr(getattr(torch.ops, NAMESPACE), name).default
        mutated = [i for i, arg in enumerate(op._schema.arguments) if arg.alias_info is not None
                   and arg.alias_info.is_write]
        tensors = _tensor_positions(op)
        _LIBRARY.impl(name, _bumping_versions(reference, mutated), "CompositeExplicitAutograd")
        for key, source in (("CPU", cpu), ("CUDA", cuda)):
            if source is not None:
                _LIBRARY.impl(name, _bumping_versions(_device_kernel(reference, tensors, mutated, *source), mutated),
                              key)
        return op

    return define


def _tensor_positions(op: torch._ops.OpOverload) -> list[int]:
    """The positions of ``op``'s ``Tensor`` / ``Tensor?`` / ``Tensor[]`` arguments."""
    return [i for i, arg in enumerate(op._schema.arguments) if "Tensor" in str(arg.type)]


def _device_kernel(reference: Callable[..., Any], tensors: list[int], mutated: list[int],
                   load: Callable[[], ModuleType | None], call: Callable[..., Any]) -> Callable[..., Any]:
    """``tensors``: the positions of the op's ``Tensor`` / ``Tensor?`` / ``Tensor[]`` arguments; ``mutated``: those
    it writes in place."""

    def kernel(*args: Any) -> Any:
        fast = (not reference_only() and _all_float32([args[i] for i in tensors])
                and all(args[i].is_contiguous() for i in mutated))
        kernels = load() if fast else None
        return reference(*args) if kernels is None else call(kernels, *args)

    return kernel


def _bumping_versions(kernel: Callable[..., Any], mutated: list[int]) -> Callable[..., Any]:
    if not mutated:
        return kernel

    def mutating_kernel(*args: Any) -> Any:
        result = kernel(*args)
        torch._C._increment_version([args[i] for i in mutated])
        return result

    return mutating_kernel


def _all_float32(args: list) -> bool:
    """True when no tensor among ``args`` (tensors, None or lists of tensors) is floating point but not float32."""
    for arg in args:
        for value in arg if isinstance(arg, list) else (arg,):
            if value is not None and value.dtype is not torch.float32 and value.is_floating_point():
                return False
    return True


def register_autograd(op: torch._ops.OpOverload, backward: Callable[..., tuple],
                      setup_context: Callable[..., None]) -> None:
    """``op``'s Autograd kernel, with ``torch.library.register_autograd``'s contract: ``setup_context(ctx,
    inputs, output)`` after the forward, ``backward(ctx, grad)`` giving one gradient (or None) per input, a
    list of them for a ``list[Tensor]`` input (whose ``ctx.needs_input_grad`` entry is true when any of its
    tensors needs one). A call that needs no gradient goes straight to the device kernel."""
    lists = [is_tensorlist_like_type(arg.type) for arg in op._schema.arguments]

    def flatten(args: Sequence[Any]) -> tuple[tuple[int, ...], list[Any]]:
        sizes, flat = [], []
        for is_list, arg in zip(lists, args):
            sizes.append(len(arg) if is_list else -1)
            flat.extend(arg if is_list else (arg,))
        return tuple(sizes), flat

    def unflatten(flat: Sequence[Any], sizes: tuple[int, ...], group: Callable[[list[Any]], Any]) -> list[Any]:
        args, start = [], 0
        for size in sizes:
            if size < 0:
                args.append(flat[start])
                start += 1
            else:
                args.append(group(list(flat[start:start + size])))
                start += size
        return args

    class Function(torch.autograd.Function):
        @staticmethod
        def forward(ctx: torch.autograd.function.FunctionCtx, sizes: tuple[int, ...], *flat: Any) -> Any:
            args = unflatten(flat, sizes, list)
            with torch._C._AutoDispatchBelowAutograd():
                output = op(*args)
            ctx.sizes = sizes
            setup_context(ctx, tuple(args), output)
            return output

        @staticmethod
        def backward(ctx: torch.autograd.function.FunctionCtx, *grads: Any) -> tuple:
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = tuple(unflatten(needs[1:], ctx.sizes, any))
            try:
                result = backward(ctx, *grads)
            finally:
                ctx.needs_input_grad = needs
            flat: list[Any] = []
            for size, gradient in zip(ctx.sizes, result):
                flat.extend((gradient,) if size < 0 else ([None] * size if gradient is None else gradient))
            return (None, *flat)

    def autograd_kernel(*args: Any) -> Any:
        if torch.is_grad_enabled():
            sizes, flat = flatten(args)
            if torch._C._any_requires_grad(*flat):
                return Function.apply(sizes, *flat)
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    _LIBRARY.impl(op._schema.name.split("::")[1], autograd_kernel, "Autograd")


def optional_module(name: str) -> Callable[[], ModuleType | None]:
    """A cached loader of module ``name`` that gives None when it cannot be imported (e.g. no Triton)."""

    @functools.cache
    def load() -> ModuleType | None:
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    return load
