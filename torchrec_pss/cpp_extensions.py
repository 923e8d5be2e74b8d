"""C++ CPU kernels of the methods: ``torch.utils.cpp_extension`` builds compiled on first use.

:func:`extension_loader` gives a cached ``load()`` that builds one source file with ``-O3``, OpenMP (through
``at::parallel_for``) and ``-march=native`` (one build directory per CPU model and feature set) into
``$TORCHREC_PSS_EXTENSIONS_DIR`` (default ``~/.cache/torchrec_pss/extensions``) and returns the module, or
None — with a logged warning — when it cannot be built, so the ops fall back to their pure-torch references.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from torch.utils import cpp_extension

logger = logging.getLogger(__name__)

CFLAGS = ["-O3", "-march=native", "-fopenmp"]
INCLUDE = Path(__file__).parent / "csrc"
"""Headers shared by the extensions (``bags.h``: the checked batch of bags)."""


def build_directory() -> Path:
    """The cache of compiled extensions: ``$TORCHREC_PSS_EXTENSIONS_DIR``, else ``~/.cache/torchrec_pss/extensions``."""
    root = os.environ.get("TORCHREC_PSS_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torchrec_pss" / "extensions"


def cpu_fingerprint() -> str:
    """A short hash of this CPU's model and features, so a ``-march=native`` build is reused on the same CPUs only."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    lines = sorted({line for line in info.splitlines() if line.startswith(("model name", "flags"))})
    text = "\n".join(lines) or platform.processor() or platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


STALE_LOCK_SECONDS = 600
"""A build lock older than this is left by a killed build (a build takes a minute or two) and is removed."""


def wait_for_lock(directory: Path, poll_seconds: float = 1.0) -> None:
    """Return once ``directory`` holds no build ``lock``: wait while another build holds it, and delete it once it
    is older than :data:`STALE_LOCK_SECONDS`. torch itself waits for a lock forever, and a build killed mid-way
    (e.g. a timed-out process) never releases its lock."""
    lock = directory / "lock"
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:
            return
        if age > STALE_LOCK_SECONDS:
            logger.warning("removing the stale build lock %s (%.0f s old, left by a killed build)", lock, age)
            lock.unlink(missing_ok=True)
            return
        time.sleep(poll_seconds)


def extension_loader(name: str, source: Path) -> Callable[[], ModuleType | None]:
    """A cached ``load()`` of the extension ``name`` compiled from ``source``: the module, or None (warned)."""

    @functools.cache
    def load() -> ModuleType | None:
        try:
            directory = build_directory() / f"{name}-{cpu_fingerprint()}"
            directory.mkdir(parents=True, exist_ok=True)
            wait_for_lock(directory)
            return cpp_extension.load(name=name, sources=[str(source)], extra_cflags=CFLAGS,
                                      extra_ldflags=["-fopenmp"], extra_include_paths=[str(INCLUDE)],
                                      build_directory=str(directory))
        except Exception as error:  # noqa: BLE001 - any build or load failure means: use the pure-torch path
            logger.warning("%s unavailable (%s: %s); using the pure-torch path", name, type(error).__name__, error)
            return None

    return load
