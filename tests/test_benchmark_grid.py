"""benchmarks/grid.py --quick on a 10k-row table: every (method, compression) cell is recorded and written out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RATIOS = (10.0, 1000.0)
LABELS = ("robe Z=1", "robe Z=32", "qr", "tt", "hashing", "mlet")
UNREACHABLE = {("qr", 1000.0), ("mlet", 1000.0)}


def test_quick_grid_writes_every_cell(tmp_path: Path) -> None:
    stem = tmp_path / "grid"
    subprocess.run(
        [sys.executable, "benchmarks/grid.py", "--quick", "--rows", "10000", "--steps", "2", "--batch", "512",
         "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # one thread: no OpenMP spin-waits when the CPUs are busy
    )
    results = json.loads(stem.with_suffix(".json").read_text())["results"]
    for method in ("baseline", "ebc"):
        (row,) = [r for r in results if r["method"] == method]
        assert row["status"] == "ok" and row["forward_ms"] > 0 and row["step_ms"] > 0
    (ebc,) = [r for r in results if r["method"] == "ebc"]  # a 10k-row table fits beside the baseline's: paired
    assert ebc["paired"] is True and ebc["step_ratio"] == ebc["step_ms"] / ebc["baseline_step_ms"]
    cells = {(r["label"], r["asked"]): r for r in results if r["method"] not in ("baseline", "ebc")}
    assert len(cells) == len(results) - 2 == len(LABELS) * len(RATIOS)
    assert set(cells) == {(label, ratio) for label in LABELS for ratio in RATIOS}
    for key, row in cells.items():
        if key in UNREACHABLE:
            assert row["status"] == "unreachable", key
            continue
        assert row["status"] == "ok", (key, row.get("reason"))
        for field in ("forward_ms", "step_ms", "forward_ratio", "step_ratio", "compression", "baseline_step_ms"):
            assert row[field] > 0, (key, field)
        # the ratio is over the baseline timed in the cell's own rounds
        assert row["step_ratio"] == row["step_ms"] / row["baseline_step_ms"], key
        assert row["forward_ratio"] == row["forward_ms"] / row["baseline_forward_ms"], key
        assert row["paired"] is True, key
    markdown = stem.with_suffix(".md").read_text()
    paired = [r["baseline_step_ms"] for r in results if r.get("paired")]
    assert f"| {min(paired):.2f}–{max(paired):.2f} | {ebc['forward_ms']:.2f} |" in markdown  # the baselines table
    assert "| rows | L | method | 10x | 1000x |" in markdown and "| 10,000 | 1 | robe Z=32 |" in markdown
    assert (tmp_path / "grid_n10000_L1.png").stat().st_size > 0


def test_caller_thread_backward_is_recorded(tmp_path: Path) -> None:
    stem = tmp_path / "grid"
    subprocess.run(
        [sys.executable, "benchmarks/grid.py", "--rows", "10000", "--methods", "robe", "--chunk-sizes", "32",
         "--compressions", "100", "--pooling", "1", "--steps", "2", "--warmup", "1", "--batch", "64",
         "--caller-thread-backward", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    written = json.loads(stem.with_suffix(".json").read_text())
    assert written["meta"]["caller_thread_backward"] is True
    (cell,) = [r for r in written["results"] if r["method"] == "robe"]
    assert cell["status"] == "ok" and cell["step_ratio"] > 0
    assert "backward on the calling thread" in stem.with_suffix(".md").read_text()


def test_methods_are_timed_where_the_baseline_does_not_fit(tmp_path: Path) -> None:
    """100k x 128 floats (49 MB) over a 0.01 GiB cap: no baseline, ROBE at 1000x still timed (no ratio), ROBE at
    10x (3 x 4.9 MB over the cap) skipped with the reason."""
    stem = tmp_path / "grid"
    subprocess.run(
        [sys.executable, "benchmarks/grid.py", "--rows", "100000", "--methods", "robe", "--chunk-sizes", "32",
         "--compressions", "10", "1000", "--pooling", "1", "--steps", "2", "--warmup", "1", "--batch", "64",
         "--max-table-gib", "0.01", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    written = json.loads(stem.with_suffix(".json").read_text())
    assert written["meta"]["max_table_gib"] == 0.01
    rows = {(r["method"], r["asked"]): r for r in written["results"]}
    for name in ("baseline", "ebc"):
        assert rows[(name, 1.0)]["status"] == "skipped" and "0.01 GiB of --max-table-gib" in rows[(name, 1.0)]["reason"]
    small, large = rows[("robe", 1000.0)], rows[("robe", 10.0)]
    assert small["status"] == "ok" and small["step_ms"] > 0 and small["forward_ms"] > 0
    assert small["step_ratio"] is None and small["forward_ratio"] is None
    assert large["status"] == "skipped" and "robe Z=32 at 10x" in large["reason"]
    markdown = stem.with_suffix(".md").read_text()
    assert f"| 100,000 | 1 | robe Z=32 | skipped | n/a ({small['step_ms']:.2f} ms) |" in markdown
    assert (tmp_path / "grid_n100000_L1.png").stat().st_size > 0


def test_ebc_is_timed_alone_where_it_does_not_fit_beside_the_baseline(tmp_path: Path) -> None:
    """10k x 128 floats (4.9 MB) under a 0.012 GiB cap: the EBC's table and gradient (9.8 MB) fit, not beside the
    baseline's table (14.6 MB), so the EBC is timed alone and divided by the baseline alone; ROBE stays paired."""
    stem = tmp_path / "grid"
    subprocess.run(
        [sys.executable, "benchmarks/grid.py", "--rows", "10000", "--methods", "robe", "--chunk-sizes", "32",
         "--compressions", "100", "--pooling", "1", "--steps", "2", "--warmup", "1", "--batch", "64",
         "--max-table-gib", "0.012", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    rows = {r["method"]: r for r in json.loads(stem.with_suffix(".json").read_text())["results"]}
    base, ebc, robe = rows["baseline"], rows["ebc"], rows["robe"]
    assert ebc["status"] == "ok" and ebc["paired"] is False and "baseline_step_ms" not in ebc
    assert ebc["step_ratio"] == ebc["step_ms"] / base["step_ms"]
    assert robe["paired"] is True and robe["step_ratio"] == robe["step_ms"] / robe["baseline_step_ms"]
    assert f"| {ebc['step_ratio']:.2f} (alone) |" in stem.with_suffix(".md").read_text()
