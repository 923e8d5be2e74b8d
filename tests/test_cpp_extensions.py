"""The C++ extension loader: a build lock left by a killed build does not block every later load."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from torchrec_pss.cpp_extensions import STALE_LOCK_SECONDS, remove_stale_lock


@pytest.mark.parametrize("age,removed", [(STALE_LOCK_SECONDS + 60, True), (5, False)])
def test_only_a_stale_lock_is_removed(tmp_path: Path, age: float, removed: bool) -> None:
    lock = tmp_path / "lock"
    lock.touch()
    then = time.time() - age
    os.utime(lock, (then, then))
    remove_stale_lock(tmp_path)
    assert lock.exists() is not removed


def test_no_lock_is_fine(tmp_path: Path) -> None:
    remove_stale_lock(tmp_path)
    assert not (tmp_path / "lock").exists()
