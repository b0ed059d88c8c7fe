#!/usr/bin/env bash
# The main job end to end on the built-in simulated sky (README quick start, command 1):
# simulate -> validate -> build the TFDS dataset -> train (smoke config) -> checkpoint
# -> export -> embed held-out sky and say whether anything was learned, next to the
# untrained encoder, chance and a classical (non-learned) baseline on the same held-out
# chips. About 2-4 min on 2 cores (docs/experiments/smoke_learning.md).
# Usage: bash launch/quickstart.sh [WORKDIR] [--config.x=y ...]   (default WORKDIR: runs/quickstart)
# Re-running resumes training from WORKDIR/train (delete WORKDIR to start over).
set -euo pipefail
W=${1:-runs/quickstart}
shift || true
FIELD=quickstart
# 96 tiles: ~250 training chips and 132 held-out chips (chance top-1 1/132, resolved in
# steps of 0.008 instead of the 0.031 of 32 chips).
N_TILES=96
mkdir -p "$W"
t0=$(date +%s)
stage() { echo; echo "== [$(( $(date +%s) - t0 ))s] $*"; }

stage "1/6 simulate a field of Rubin + Euclid tile pairs with GalSim -> $W/sky"
if [ ! -f "$W/sky/truth_$FIELD.ecsv" ]; then
  python -m jaisp_jax.data.simulate --out "$W/sky" --field "$FIELD" --n-tiles "$N_TILES" --seed 0 \
    --size 128 --preview
fi

stage "2/6 validate the tiles"
python -m jaisp_jax.data.check --rubin-dir "$W/sky/rubin_tiles_$FIELD" \
  --euclid-dir "$W/sky/euclid_tiles_$FIELD"

stage "3/6 build the TFDS (array_record) dataset, split by sky region -> $W/tfds"
if [ ! -d "$W/tfds/jaisp_chips" ]; then
  python -m jaisp_jax.data.build --rubin-dir "$W/sky/rubin_tiles_$FIELD" \
    --euclid-dir "$W/sky/euclid_tiles_$FIELD" --data-dir "$W/tfds" --chip-px 64 \
    --val-fraction 0.34 --no-progress
fi

stage "4/6 train the smoke config (JEPA) on CPU -> $W/train"
python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir="$W/train" \
  --config.data.data_dir="$W/tfds" "$@"

stage "5/6 export the EMA target encoder -> $W/export"
python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir="$W/train" \
  --config.data.data_dir="$W/tfds" "$@" --mode=export --export_dir="$W/export"

stage "6/6 embed held-out sky with the exported model (trained vs untrained vs classical)"
python -m jaisp_jax.evaluate.embed --export_dir "$W/export" --data_dir "$W/tfds" \
  --out "$W/embed_summary.json"

echo
echo "done in $(( $(date +%s) - t0 ))s: TensorBoard: tensorboard --logdir $W/train; preview: $W/sky/preview_$FIELD.png"
