"""benchmarks/op_overhead.py on a tiny table: every call and step is timed and written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_op_overhead_benchmark_writes_every_cell(tmp_path: Path) -> None:
    stem = tmp_path / "overhead"
    subprocess.run(
        [sys.executable, "benchmarks/op_overhead.py", "--rows", "5000", "--batch", "4", "16", "--pooling", "2",
         "--calls", "3", "--repeats", "2", "--profile-steps", "4", "--profile-top", "40", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [(c["batch"], c["pooling"]) for c in result["cells"]] == [(4, 2), (16, 2)]
    timed = {"kernel_forward_us", "op_forward_us", "custom_op_forward_us", "kernel_sgd_us", "op_sgd_us",
             "custom_op_sgd_us", "op_forward_autograd_us", "custom_op_forward_autograd_us", "module_step_us",
             "module_forward_us", "embedding_bag_step_us", "embedding_bag_forward_us", "module_step_caller_thread_us",
             "embedding_bag_step_caller_thread_us"}
    for cell in result["cells"]:
        assert timed <= set(cell) and all(cell[name] > 0 for name in timed)
    text = stem.with_suffix(".md").read_text()
    assert "| 16 | 2 | robe_sgd_update_ |" in text and result["argv"][:2] == ["--rows", "5000"]
    assert "## Training step with backward on the calling thread" in text
    for cell in result["cells"]:  # the profile sees the module's own code and the kernels it calls
        profile = cell["host_profile"]
        assert len(profile) == 40 and all(row["calls"] > 0 and row["own_us"] >= 0 for row in profile)
        assert any("robe.py" in row["function"] and "pooled_stacked" in row["function"] for row in profile)
        assert [row["own_us"] for row in profile] == sorted((row["own_us"] for row in profile), reverse=True)
        assert 0 < sum(row["share"] for row in profile) <= 1
    assert "## Host profile of the module's training step" in text and "B = 16, L = 2:" in text
