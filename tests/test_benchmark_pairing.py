"""benchmarks/pairing.py on a tiny table: every repeat times TBE and the ROBE module alone and paired, and its
ratios are the medians' quotients."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_pairing_benchmark_reports_alone_and_paired_ratios(tmp_path: Path) -> None:
    stem = tmp_path / "pairing.z1"  # a dot in the stem: the files keep the whole name
    subprocess.run(
        [sys.executable, "benchmarks/pairing.py", "--rows", "20000", "--compression", "10", "--chunk-size", "4",
         "--steps", "2", "--repeats", "2", "--out", str(stem)],
        cwd=ROOT, check=True, timeout=300, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    result = json.loads(Path(f"{stem}.json").read_text())
    assert result["meta"]["argv"][-2:] == ["--out", str(stem)] and len(result["results"]) == 2
    for row in result["results"]:
        assert min(row["tbe_alone_ms"], row["robe_alone_ms"], row["tbe_paired_ms"], row["robe_paired_ms"]) > 0
        assert row["ratio_alone"] == pytest.approx(row["robe_alone_ms"] / row["tbe_alone_ms"])
        assert row["ratio_paired"] == pytest.approx(row["robe_paired_ms"] / row["tbe_paired_ms"])
    table = Path(f"{stem}.md").read_text()
    assert f"| {result['results'][1]['ratio_alone']:.2f} |" in table and "ROBE Z = 4 at 10×" in table
