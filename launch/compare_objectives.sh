#!/usr/bin/env bash
# Train every objective on the same simulated field with the same budget, evaluate each
# (--mode=evaluate) and write ONE markdown table of all figures (trained, at init, the
# classical pixel baseline, chance): which objective keeps sub-pixel information?
#
# Usage: bash launch/compare_objectives.sh [--dry-run] [WORKDIR] [options] [--config.x=y ...]
#   WORKDIR            default runs/compare
#   --steps N          optimizer steps per variant (default 600, the smoke budget)
#   --size S           config size preset (default smoke)
#   --tiles N          simulated tile pairs of the shared field (default 48)
#   --variants a,b,..  subset of: jepa two_view detr_jepa clip masked_band jepa_recon jepa_shift
#   --max-chips N      held-out chips per evaluation (default 64)
#   --similarity       also compare the variants' embeddings of the same chips (CKA)
# Extra --config.x=y flags go to every training and evaluation command.
# Output: WORKDIR/comparison.md (and each WORKDIR/<variant>/eval/report.json + plots).
# Re-running resumes: finished variants are not retrained (training resumes from the
# checkpoint, which is a no-op at the last step) and the dataset is not rebuilt.
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")

W=runs/compare
STEPS=600
SIZE=smoke
TILES=48
MAX_CHIPS=64
SIMILARITY=()
VARIANTS=(jepa two_view detr_jepa clip masked_band jepa_recon jepa_shift)
EXTRA=()
positional=0
i=0
while [ $i -lt ${#args[@]} ]; do
  a=${args[$i]}
  case "$a" in
    --steps) i=$((i + 1)); STEPS=${args[$i]} ;;
    --steps=*) STEPS=${a#*=} ;;
    --size) i=$((i + 1)); SIZE=${args[$i]} ;;
    --size=*) SIZE=${a#*=} ;;
    --tiles) i=$((i + 1)); TILES=${args[$i]} ;;
    --tiles=*) TILES=${a#*=} ;;
    --max-chips) i=$((i + 1)); MAX_CHIPS=${args[$i]} ;;
    --max-chips=*) MAX_CHIPS=${a#*=} ;;
    --variants) i=$((i + 1)); IFS=, read -r -a VARIANTS <<< "${args[$i]}" ;;
    --variants=*) IFS=, read -r -a VARIANTS <<< "${a#*=}" ;;
    --similarity) SIMILARITY=(--similarity) ;;
    --config.*) EXTRA+=("$a") ;;
    *)
      if [ $positional = 0 ]; then W=$a; positional=1
      else echo "compare_objectives.sh: unexpected argument $a" >&2; exit 2; fi ;;
  esac
  i=$((i + 1))
done

pairs_per_batch() {  # config[:size] -> its data.pairs_per_batch
  if [ "$DRY_RUN" = 1 ]; then echo PAIRS; return; fi
  python - "$1" <<'EOF'
import importlib.util, sys
path, _, size = sys.argv[1].partition(':')
spec = importlib.util.spec_from_file_location('cfg', path)
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
print(mod.get_config(size or None).data.pairs_per_batch)
EOF
}

# variant -> config file and the flags that make it (hybrids are jepa + an auxiliary).
config_of() {
  case "$1" in
    jepa|jepa_recon|jepa_shift) echo configs/jepa.py ;;
    two_view|detr_jepa|clip|masked_band) echo "configs/$1.py" ;;
    *) echo "compare_objectives.sh: unknown variant $1" >&2; exit 2 ;;
  esac
}
flags_of() {
  case "$1" in
    # The hybrid reconstructs hidden bands of all-band chips: one chip per pair.
    jepa_recon) echo --config.model.recon.enabled=True \
                  --config.data.chips_per_batch="$(pairs_per_batch configs/jepa.py:"$SIZE")" ;;
    jepa_shift) echo --config.model.shift.enabled=True ;;
    *) echo ;;
  esac
}
for v in "${VARIANTS[@]}"; do config_of "$v" > /dev/null; done

DATA="$W/tfds"
# `build --simulate` keeps the truth catalogue beside the records: the probes score
# against it (a build from tile folders would have none).
if [ "$DRY_RUN" = 1 ] || [ ! -d "$DATA/jaisp_chips" ]; then
  run python -m jaisp_jax.data.build --simulate "$TILES" --seed 0 --size 128 \
    --data-dir "$DATA" --chip-px 64 --val-fraction 0.2 --no-progress
fi

COMMON=(--config.data.data_dir="$DATA" --config.total_steps="$STEPS"
        --config.eval.max_chips="$MAX_CHIPS")
RUNS=()
for v in "${VARIANTS[@]}"; do
  cfg="$(config_of "$v"):$SIZE"
  read -r -a vflags <<< "$(flags_of "$v")"
  run python -m jaisp_jax.main --config="$cfg" --workdir="$W/$v" "${COMMON[@]}" \
    ${vflags[@]+"${vflags[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  run python -m jaisp_jax.main --config="$cfg" --workdir="$W/$v" "${COMMON[@]}" \
    ${vflags[@]+"${vflags[@]}"} ${EXTRA[@]+"${EXTRA[@]}"} --mode=evaluate
  RUNS+=("$v=$W/$v")
done

run python -m jaisp_jax.evaluate.compare --out "$W/comparison.md" \
  --budget "$STEPS steps of configs/*:$SIZE each, $TILES simulated tiles" \
  --max_chips "$MAX_CHIPS" ${SIMILARITY[@]+"${SIMILARITY[@]}"} "${RUNS[@]}"
