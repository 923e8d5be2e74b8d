#!/usr/bin/env bash
# The main job: `torchx run dlrm_pss` — the small DLRM preset with ROBE-compressed tables, 2 gloo ranks on
# this machine, the embedded synthetic Criteo-like data; prints and writes the JSON summary.
# (Installs .venv/ first.) Extra arguments go to the component, e.g. --steps 1000 --pss "robe:compression=1000";
# one of the defaults below given there (as --option value or --option=value) replaces the default.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/venv.sh
defaults=(--nproc_per_node 2 --steps 300 --summary dlrm_pss_summary.json)
chosen=()
for ((i = 0; i < ${#defaults[@]}; i += 2)); do
  option=${defaults[i]}
  given=false
  for arg in "$@"; do
    if [[ $arg == "$option" || $arg == "$option="* ]]; then given=true; fi
  done
  if ! $given; then chosen+=("$option" "${defaults[i + 1]}"); fi
done
exec torchx run -s local_cwd dlrm_pss ${chosen[@]+"${chosen[@]}"} "$@"
