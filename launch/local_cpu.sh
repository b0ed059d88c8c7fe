#!/usr/bin/env bash
# Train on this machine's CPU (one process, all cores).
# Usage: bash launch/local_cpu.sh [--dry-run] [CONFIG[:ARG]] [WORKDIR] [--config.x=y ...]
#   default: configs/jepa.py:smoke  runs/local
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")
CONFIG=${args[0]:-configs/jepa.py:smoke}
WORKDIR=${args[1]:-runs/local}
run python -m jaisp_jax.main --config="$CONFIG" --workdir="$WORKDIR" "${args[@]:2}"
