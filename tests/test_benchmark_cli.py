"""Every benchmark script's command line: ``--help`` prints its usage and exits cleanly (the scripts: the files of
``benchmarks/`` with a ``__main__`` guard; the others are helpers they import)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = sorted(path for path in (Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                    if 'if __name__ == "__main__":' in path.read_text())


@pytest.mark.parametrize("script", BENCHMARKS, ids=[p.stem for p in BENCHMARKS])
def test_help_prints_usage(script: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.syspath_prepend(str(script.parent))
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(script), run_name="__main__")
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: ")
