#!/usr/bin/env bash
# The main job end to end on the built-in simulated sky (README quick start, command 1).
# Usage: bash launch/quickstart.sh [WORKDIR]   (default: ./runs/quickstart)
set -euo pipefail
W=${1:-runs/quickstart}
mkdir -p "$W"
echo "== 1/2 simulate a small field (GalSim) -> $W/sky"
python -m jaisp_jax.data.simulate --out "$W/sky" --field quickstart --n-tiles 8 --seed 0 --size 128 --preview
echo "== 2/2 validate the tiles"
python -m jaisp_jax.data.check --rubin-dir "$W/sky/rubin_tiles_quickstart" --euclid-dir "$W/sky/euclid_tiles_quickstart"
