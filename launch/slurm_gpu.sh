#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task per GPU; jax.distributed.initialize() reads the
# SLURM environment (coordinator = first node), so every task runs the same command.
# Usage: bash launch/slurm_gpu.sh [--dry-run] NODES GPUS_PER_NODE CONFIG[:ARG] WORKDIR [--config.x=y ...]
#   e.g. bash launch/slurm_gpu.sh --dry-run 4 8 configs/jepa.py:base /shared/runs/jepa_base
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")
NODES=${args[0]:-1}; GPUS=${args[1]:-8}
CONFIG=${args[2]:-configs/jepa.py:base}; WORKDIR=${args[3]:?workdir on a shared filesystem}
SCRIPT=$(mktemp /tmp/jaisp_slurm.XXXXXX.sbatch)
cat > "$SCRIPT" <<SB
#!/usr/bin/env bash
#SBATCH --job-name=jaisp
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=$WORKDIR/slurm-%j.out
srun python -m jaisp_jax.main --config=$CONFIG --workdir=$WORKDIR --distributed=auto ${args[@]:4}
SB
echo "# sbatch script $SCRIPT:"; cat "$SCRIPT"
run sbatch "$SCRIPT"
