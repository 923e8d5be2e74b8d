"""The Triton kernels compile for a Hopper GPU (sm_90) without one: ``scripts/triton_compile_check.py``.

The other Triton tests run the kernels in Triton's interpreter, which accepts code a GPU build rejects (e.g.
``tl.dot`` on tiles under 16); this one compiles every kernel's main specializations to a cubin.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile_check.py"


def test_every_kernel_compiles_for_sm90() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "0 failures; never launched: none" in result.stdout
