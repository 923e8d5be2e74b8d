#!/usr/bin/env bash
# Create or update the project's virtual environment at .venv/ (CPU working set of requirements/cpu.txt).
# Sourced by scripts/demo.sh and scripts/test.sh; re-installs only when the pins or pyproject.toml change.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
STAMP="$VENV/.torchrec-pss-installed"
WANT="$(cat "$ROOT/requirements/cpu.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[venv] installing the CPU working set into $VENV" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    "${PIP[@]}" -r <(grep -v '^torchrec==' "$ROOT/requirements/cpu.txt")
    # torchrec declares the CUDA fbgemm-gpu, which cannot load without an NVIDIA driver: no deps.
    "${PIP[@]}" --no-deps "$(grep '^torchrec==' "$ROOT/requirements/cpu.txt")"
    "${PIP[@]}" --no-deps -e "$ROOT"
    echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
