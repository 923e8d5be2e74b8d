#!/usr/bin/env bash
# Run the whole test suite (installs what is missing into .venv/ first).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
exec python -m pytest -q "$@"
