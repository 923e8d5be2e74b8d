#!/usr/bin/env bash
# The main job: `torchx run dlrm_pss` — the small DLRM preset with ROBE-compressed tables, 2 gloo ranks on
# this machine, the embedded synthetic Criteo-like data; prints and writes the JSON summary.
# (Installs .venv/ first.) Extra arguments go to the component, e.g. --steps 1000 --pss "robe:compression=1000".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
exec torchx run -s local_cwd dlrm_pss --nproc_per_node 2 --steps 300 --summary dlrm_pss_summary.json "$@"
