"""benchmarks/robe_cpu_step.py on a small table: TBE, the C++ kernels and the module, timed and written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_way_is_timed_and_written(tmp_path: Path) -> None:
    stem = tmp_path / "step"
    subprocess.run(
        [sys.executable, "benchmarks/robe_cpu_step.py", "--rows", "20000", "--pooling", "2", "--compression", "100",
         "1000", "--batch", "64", "--chunk-size", "1", "--warmup", "1", "--iters", "2", "--no-torch", "--out",
         str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    results = json.loads(stem.with_suffix(".json").read_text())["results"]
    timed = {(r["method"], r["compression"]) for r in results}
    assert timed == {("tbe", 1), *((m, c) for m in ("robe c++", "robe module") for c in (100.0, 1000.0))}
    assert all(r["ms"] > 0 and r["chunk_size"] == 1 and r["rows"] == 20000 for r in results)
    table = stem.with_suffix(".md").read_text()
    assert "ROBE chunk size Z = 1" in table and "| 20,000 | 2 | robe module | 1000x |" in table
