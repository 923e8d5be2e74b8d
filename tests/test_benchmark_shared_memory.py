"""benchmarks/shared_memory.py on tiny tables: every (L, optimizer) cell is measured and written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_shared_memory_benchmark_writes_every_cell(tmp_path: Path) -> None:
    stem = tmp_path / "shared"
    subprocess.run(
        [sys.executable, "benchmarks/shared_memory.py", "--max-rows", "2000", "--dim", "32", "--batch", "64",
         "--pooling", "1", "3", "--compression", "10", "--warmup", "0", "--iters", "1", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(stem.with_suffix(".json").read_text())
    cells = {(c["pooling"], c["optimizer"]): c for c in result["cells"]}
    assert set(cells) == {(p, o) for p in (1, 3) for o in ("sgd", "rowwise_adagrad")}
    logical_bytes = result["rows"] * 32 * 4
    for cell in cells.values():
        assert cell["tbe_ms"] > 0 and cell["robe_shared_ms"] > 0 and cell["robe_per_table_ms"] > 0
        for mode in ("robe_shared_bytes", "robe_per_table_bytes"):  # |M| = logical / 10, plus hash constants
            assert logical_bytes / 10 <= cell[mode] <= logical_bytes / 10 + 26 * 4096
    assert "| 3 | rowwise_adagrad |" in stem.with_suffix(".md").read_text()
