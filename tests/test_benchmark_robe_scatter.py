"""benchmarks/robe_scatter.py in the Triton interpreter on tiny inputs: every cell is run, both backwards agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_robe_scatter_benchmark_compares_both_backwards(tmp_path: Path) -> None:
    stem = tmp_path / "scatter"
    subprocess.run(
        [sys.executable, "benchmarks/robe_scatter.py", "--device", "cpu", "--rows", "50", "--batch", "3",
         "--pooling", "2", "--compressions", "10", "--chunk-sizes", "4", "--calls", "1", "--repeats", "1",
         "--out", str(stem)],
        cwd=ROOT, check=True, timeout=600, capture_output=True, text=True,
        env={**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(stem.with_suffix(".json").read_text())
    cells = result["cells"]
    assert [(c["distribution"], c["pooling"], c["num_ids"]) for c in cells] == [
        ("uniform", 2, 6), ("zipf", 2, 6), ("criteo", 1, 26 * 3)]
    for cell in cells:
        assert 0 < cell["distinct_share"] <= 1 and cell["max_abs_diff"] < 1e-6
        assert cell["atomic_us"] > 0 and cell["sorted_us"] > 0
    assert cells[2]["distinct_share"] < 1, "three Criteo rows repeat some feature values"
    text = stem.with_suffix(".md").read_text()
    assert "| criteo | 1 | 78 |" in text and "not a timing" in text and result["interpreted"]


def test_robe_scatter_benchmark_refuses_to_time_the_cpu_without_the_interpreter(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "benchmarks/robe_scatter.py", "--device", "cpu", "--out", str(tmp_path / "x")],
        cwd=ROOT, timeout=300, capture_output=True, text=True,
        env={key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"},
    )
    assert run.returncode != 0 and "TRITON_INTERPRET=1" in run.stderr
