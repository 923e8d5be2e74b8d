"""What every benchmark result records about its run (the command that produced it, when, and on what), and
how a result is written: ``STEM.json`` and ``STEM.md``."""

from __future__ import annotations

import datetime
import json
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

import torch


def run_header(script: str, argv: list[str] | None, device: torch.device = torch.device("cpu")) -> dict[str, Any]:
    """``argv`` (``sys.argv[1:]`` when None), the ``command`` that reruns ``script`` with them, the date and time,
    the device, torch's version and thread count, and the machine."""
    args = list(sys.argv[1:] if argv is None else argv)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {platform.machine()}"
    return {"argv": args, "command": shlex.join(["python", f"benchmarks/{Path(script).name}", *args]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(device),
            "device_name": name, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "machine": platform.machine()}


def write_result(stem: Path, result: Any, table: str) -> None:
    """``STEM.json`` (``result``) and ``STEM.md`` (``table``); ``stem`` may hold dots (the suffixes are appended)."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    Path(f"{stem}.md").write_text(table)
