"""What every benchmark result records about its run: the command that produced it, when, and on what."""

from __future__ import annotations

import datetime
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
