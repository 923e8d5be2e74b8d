#!/usr/bin/env bash
# The main job: build a DLRM, compress its large tables with ROBE-Z, train it (installs .venv/ first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
exec python examples/train_dlrm_robe.py "$@"
