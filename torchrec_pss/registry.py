"""Registry of compression methods: config class -> :class:`PSSMemory` subclass.

Methods register themselves with :func:`register_method` (the analogue of torchao's
``register_quantize_module_handler``). Installed packages advertise methods through the entry-point
group ``torchrec_pss.methods``; each entry point names a registered ``PSSMemory`` subclass and is
imported the first time the registry is consulted, so third parties add methods without touching
the core.
"""

from __future__ import annotations

import warnings
from importlib.metadata import entry_points
from typing import Callable, TypeVar

from torchrec_pss.contract import MethodConfig, PSSMemory

ENTRY_POINT_GROUP = "torchrec_pss.methods"

_BY_CONFIG: dict[type[MethodConfig], type[PSSMemory]] = {}
_BY_NAME: dict[str, type[PSSMemory]] = {}
_FAILED: dict[str, str] = {}
_entry_points_loaded = False

M = TypeVar("M", bound=type[PSSMemory])


def register_method(config_cls: type[MethodConfig]) -> Callable[[M], M]:
    """Class decorator: ``@register_method(RobeConfig) class RobeMemory(PSSMemory): ...``."""

    def decorate(memory_cls: M) -> M:
        if not (isinstance(memory_cls, type) and issubclass(memory_cls, PSSMemory)):
            raise TypeError(f"{memory_cls!r} is not a PSSMemory subclass")
        if not issubclass(config_cls, MethodConfig):
            raise TypeError(f"{config_cls!r} is not a MethodConfig subclass")
        name = getattr(memory_cls, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{memory_cls.__qualname__} must set the class attribute `name`, the method's name in "
                            f"flags and checkpoints (e.g. name = \"my_method\"), got {name!r}")
        other = _BY_NAME.get(name)
        if other is not None and other is not memory_cls:
            raise ValueError(f"method name {name!r} is registered twice: {other!r} and {memory_cls!r}")
        memory_cls.config_cls = config_cls
        _BY_CONFIG[config_cls] = memory_cls
        _BY_NAME[name] = memory_cls
        return memory_cls

    return decorate


def _load_entry_points() -> None:
    """Import every advertised method once. One that fails to load is reported (a warning, and in
    :func:`failed_entry_points`) and left out; the others still load."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
            if loaded not in _BY_NAME.values():
                raise TypeError("it does not name a PSSMemory subclass decorated with @register_method")
        except Exception as error:  # a third party's import can fail in any way
            _FAILED[ep.name] = f"{ep.name} = {ep.value}: {type(error).__name__}: {error}"
            warnings.warn(f"torchrec_pss: method entry point {_FAILED[ep.name]} (left out)", stacklevel=3)


def failed_entry_points() -> dict[str, str]:
    """Entry points of group ``torchrec_pss.methods`` that failed to load, by name: what failed and why."""
    _load_entry_points()
    return dict(_FAILED)


def method_for_config(config: MethodConfig) -> type[PSSMemory]:
    """The memory class that implements ``config``'s method."""
    _load_entry_points()
    try:
        return _BY_CONFIG[type(config)]
    except KeyError:
        raise TypeError(
            f"{type(config).__name__} is not a registered compression config; registered: "
            f"{sorted(c.__name__ for c in _BY_CONFIG)}"
        ) from None


def method_by_name(name: str) -> type[PSSMemory]:
    """The memory class registered under ``name`` (e.g. ``"robe"``)."""
    _load_entry_points()
    try:
        return _BY_NAME[name]
    except KeyError:
        failed = f"; failed to load: {sorted(_FAILED.values())}" if _FAILED else ""
        raise ValueError(f"unknown compression method {name!r}; registered: {sorted(_BY_NAME)}{failed}") from None


def registered_methods() -> dict[str, type[PSSMemory]]:
    """Every registered method by name."""
    _load_entry_points()
    return dict(_BY_NAME)
