"""benchmarks/robe_calls.py on tiny tables: both groupings are timed in every cell, and "auto" names the
grouping the module picks for that many pooled floats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from torchrec_pss_plugins.robe.robe import ONE_CALL_MAX_FLOATS

ROOT = Path(__file__).resolve().parents[1]


def test_robe_calls_benchmark_writes_every_cell(tmp_path: Path) -> None:
    stem = tmp_path / "calls.v1"  # a dot in the stem: the files keep the whole name (with_suffix had cut it)
    big = ONE_CALL_MAX_FLOATS // (26 * 128) + 1  # 26 tables of d = 128: more floats than one call takes on the CPU
    subprocess.run(
        [sys.executable, "benchmarks/robe_calls.py", "--max-rows", "2000", "--batch", "4", str(big), "--pooling", "1",
         "--compression", "10", "--warmup", "0", "--iters", "1", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(Path(f"{stem}.json").read_text())
    cells = {(c["batch"], c["optimizer"]): c for c in result["cells"]}
    assert set(cells) == {(b, o) for b in (4, big) for o in ("sgd", "adam")}
    for (batch, _), cell in cells.items():
        assert cell["per_table_ms"] > 0 and cell["per_width_ms"] > 0 and cell["bags"] == 26 * batch
        assert cell["auto"] == ("per_width" if batch == 4 else "per_table")
    assert f"| {big} | 1 | {26 * big:,} | adam |" in Path(f"{stem}.md").read_text()
