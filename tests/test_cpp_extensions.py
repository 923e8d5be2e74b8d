"""The C++ extension loader: a build lock left by a killed build does not block every later load."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from torchrec_pss.cpp_extensions import STALE_LOCK_SECONDS, wait_for_lock


def aged_lock(directory: Path, age: float) -> Path:
    lock = directory / "lock"
    lock.touch()
    then = time.time() - age
    os.utime(lock, (then, then))
    return lock


def test_a_stale_lock_is_removed_at_once(tmp_path: Path) -> None:
    lock = aged_lock(tmp_path, STALE_LOCK_SECONDS + 60)
    start = time.monotonic()
    wait_for_lock(tmp_path, poll_seconds=0.05)
    assert not lock.exists() and time.monotonic() - start < 1


def test_a_live_lock_is_waited_for_until_its_build_releases_it(tmp_path: Path) -> None:
    lock = aged_lock(tmp_path, 5)
    release = threading.Timer(0.3, lock.unlink)
    release.start()
    start = time.monotonic()
    wait_for_lock(tmp_path, poll_seconds=0.05)
    assert not lock.exists() and time.monotonic() - start >= 0.25


def test_a_young_lock_is_removed_once_it_turns_stale(tmp_path: Path) -> None:
    """A build killed a moment ago: the loader waits, then removes the lock once it is older than a build takes
    (torch alone would wait for ever)."""
    lock = aged_lock(tmp_path, STALE_LOCK_SECONDS - 0.3)
    start = time.monotonic()
    wait_for_lock(tmp_path, poll_seconds=0.05)
    assert not lock.exists() and 0.25 <= time.monotonic() - start < 5


def test_no_lock_is_fine(tmp_path: Path) -> None:
    wait_for_lock(tmp_path)
    assert not (tmp_path / "lock").exists()
