"""benchmarks/run_info.py: the header every benchmark result records reruns the script with the same arguments."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from run_info import run_header, write_result  # noqa: E402


def test_header_records_the_command_date_and_machine() -> None:
    argv = ["--out", "results/a b.v1", "--rows", "10"]
    header = run_header("/somewhere/benchmarks/grid.py", argv)
    assert shlex.split(header["command"]) == ["python", "benchmarks/grid.py", *argv]  # quoted where needed
    assert header["argv"] == argv and header["device"] == "cpu" and header["torch"] == torch.__version__
    assert header["threads"] == torch.get_num_threads()
    age = datetime.datetime.now() - datetime.datetime.fromisoformat(header["date"])
    assert datetime.timedelta(0) <= age < datetime.timedelta(minutes=1)


def test_header_reads_the_command_line_when_called_without_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["benchmarks/pairing.py", "--rows", "20000"])
    header = run_header("pairing.py", None)
    assert header["argv"] == ["--rows", "20000"] and header["command"] == "python benchmarks/pairing.py --rows 20000"


def test_write_result_appends_the_suffixes_to_the_whole_stem(tmp_path: Path) -> None:
    stem = tmp_path / "new" / "grid.z1.v2"
    write_result(stem, {"ratio": 0.5}, "| a |\n")
    assert json.loads(Path(f"{stem}.json").read_text()) == {"ratio": 0.5}
    assert Path(f"{stem}.md").read_text() == "| a |\n" and sorted(p.name for p in stem.parent.iterdir()) == [
        "grid.z1.v2.json", "grid.z1.v2.md"]
