#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: create it (optional), copy the code, and run the SAME
# command on every host (`--worker=all`); JAX finds its peers through the TPU metadata,
# so jax.distributed.initialize() needs no arguments there. Data and workdir must be on a
# bucket every host can read (gs://...).
# Usage: bash launch/tpu_pod.sh [--dry-run] NAME ZONE ACCELERATOR CONFIG[:ARG] GS_WORKDIR GS_DATA_DIR [--create]
#   e.g. bash launch/tpu_pod.sh --dry-run jaisp-v5e us-west4-a v5litepod-64 configs/jepa.py:pod \
#          gs://my-bucket/jaisp/runs/pod1 gs://my-bucket/jaisp/tfds
set -euo pipefail
source "$(dirname "$0")/common.sh"
parse_dry_run "$@"
mapfile -d '' args < <(strip_dry_run "$@")
NAME=${args[0]:?name}; ZONE=${args[1]:?zone}; ACC=${args[2]:?accelerator type}
CONFIG=${args[3]:-configs/jepa.py:pod}; WORKDIR=${args[4]:?gs:// workdir}; DATA=${args[5]:?gs:// data dir}
CREATE=0; for a in "${args[@]}"; do if [ "$a" = "--create" ]; then CREATE=1; fi; done
VERSION=${TPU_SOFTWARE_VERSION:-v2-alpha-tpuv5-lite}
if [ "$CREATE" = 1 ]; then
  run gcloud compute tpus tpu-vm create "$NAME" --zone="$ZONE" --accelerator-type="$ACC" --version="$VERSION"
fi
REPO_TGZ=/tmp/jaisp_jax_src.tgz
run tar czf "$REPO_TGZ" --exclude=.git --exclude=runs -C "$(dirname "$0")/.." .
run gcloud compute tpus tpu-vm scp "$REPO_TGZ" "$NAME":~/jaisp_jax_src.tgz --zone="$ZONE" --worker=all
run gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all --command \
  "mkdir -p ~/jaisp && tar xzf ~/jaisp_jax_src.tgz -C ~/jaisp && cd ~/jaisp && pip install -q -e . 'jax[tpu]' && python -m jaisp_jax.main --config=$CONFIG --workdir=$WORKDIR --config.data.data_dir=$DATA"
