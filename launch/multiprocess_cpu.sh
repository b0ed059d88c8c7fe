#!/usr/bin/env bash
# Several JAX processes on this machine, talking over 127.0.0.1 with gloo collectives:
# the same code path as a multi-host pod, for testing on a laptop.
# Usage: bash launch/multiprocess_cpu.sh [--dry-run] NPROC DEVICES_PER_PROC CONFIG[:ARG] WORKDIR [--config.x=y ...]
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")
NPROC=${args[0]:-2}; NDEV=${args[1]:-2}
CONFIG=${args[2]:-configs/jepa.py:smoke}; WORKDIR=${args[3]:-runs/multiprocess}
PORT=${PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < NPROC; i++)); do
  cmd=(env XLA_FLAGS=--xla_force_host_platform_device_count=$NDEV JAX_PLATFORMS=cpu
       python -m jaisp_jax.main --config="$CONFIG" --workdir="$WORKDIR"
       --coordinator_address=127.0.0.1:$PORT --num_processes=$NPROC --process_id=$i
       "${args[@]:4}")
  if [ "$DRY_RUN" = 1 ]; then run "${cmd[@]}"; else
    printf '+'; printf ' %q' "${cmd[@]}"; printf ' &\n'
    "${cmd[@]}" > "${WORKDIR%/}.process_$i.log" 2>&1 &
    pids+=($!)
  fi
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
[ "$DRY_RUN" = 1 ] || echo "logs: ${WORKDIR%/}.process_*.log (exit status $status)"
exit $status
