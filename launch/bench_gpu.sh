#!/usr/bin/env bash
# Train-step benchmark on one GPU: the base config and a ViT-B trunk (D 768, depth 12)
# in bfloat16, plus the attention A/B (XLA vs cuDNN fused) and a cuDNN-vs-XLA accuracy
# check. Figures go to OUTDIR/*.json and *.log; the table docs/performance.md quotes
# is the last lines of each log.
# Usage: bash launch/bench_gpu.sh [OUTDIR] [PER_RUN_TIMEOUT_S]
# CHECKS=0 skips both accuracy checks, ATTN_CHECK=0 the attention one only.
# Needs the JAX stack, grain and ml_collections only (jaisp_jax/train/trainer.py imports
# no TensorFlow / clu), so it runs on a bare accelerator image with a few wheels.
set -uo pipefail
OUT_DIR=${1:-bench_gpu}; T=${2:-200}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2

BUDGET=${BUDGET:-100000}  # seconds: later runs are skipped once this much has passed
harness() {  # harness COMMAND NAME ARGS...: one `bench COMMAND` run, own process and timeout
  local command=$1 name=$2; shift 2
  if (( SECONDS > BUDGET )); then echo "=== $name: skipped (budget ${BUDGET} s spent)"; return; fi
  echo "=== $name: $*"
  timeout "$T" "$PY" -m jaisp_jax.bench "$command" "$@" --out "$OUT_DIR/$name.json" \
    > "$OUT_DIR/$name.log" 2>&1
  echo "rc=$?"; grep -v '^[WI][0-9]\{4\}\|^WARNING: All log' "$OUT_DIR/$name.log" | tail -n 16
}
step() { harness step "$@"; }  # step NAME ARGS...
ab() { harness ab "$@"; }      # ab NAME ARGS...: variants interleaved in one process

"$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/env.log"
import importlib, jax
print('jax', jax.__version__, jax.devices())
for m in ('flax', 'optax', 'orbax.checkpoint', 'chex', 'grain', 'ml_collections', 'numpy'):
  try:
    print(m, importlib.import_module(m).__version__)
  except Exception as e:  # noqa
    print(m, 'missing:', e)
PY
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv

[ "${ATTN_CHECK:-${CHECKS:-1}}" = 1 ] && "$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/attention_check.log"
# cuDNN fused attention against XLA's and a float32 reference, forward and gradient.
import jax, jax.numpy as jnp
from jaisp_jax.models import vit
for b, n, h, hd in ((64, 64, 8, 32), (256, 65, 12, 64)):
  ks = jax.random.split(jax.random.key(b + n), 4)
  q, k, v, g = (jax.random.normal(kk, (b, n, h, hd)) for kk in ks)
  ref = vit.attention(q, k, v, 'xla')
  ref_g = jax.jit(jax.grad(lambda q, k, v, g: (vit.attention(q, k, v, 'xla') * g).sum()))(
      q, k, v, g)
  bf = lambda x: x.astype(jnp.bfloat16)
  rel = lambda a, r: float(jnp.linalg.norm(a.astype(jnp.float32) - r) / jnp.linalg.norm(r))
  for impl in ('xla', 'cudnn', 'cudnn_padded'):
    try:
      out = jax.jit(lambda q, k, v: vit.attention(q, k, v, impl))(bf(q), bf(k), bf(v))
      dq = jax.jit(jax.grad(lambda q, k, v, g: (vit.attention(q, k, v, impl).astype(
          jnp.float32) * g).sum()))(bf(q), bf(k), bf(v), g)
      print(f'B{b} N{n} H{h} hd{hd} bf16 {impl:5s}: rel err out {rel(out, ref):.2e}, '
            f'dq {rel(dq, ref_g):.2e}')
    except Exception as e:  # noqa
      print(f'B{b} N{n} H{h} hd{hd} bf16 {impl:5s}: failed: {type(e).__name__}: {e}'[:300])
PY
[ "${CHECKS:-1}" = 1 ] && "$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/pallas_check.log"
# The Pallas (Triton) per-sample convolution against im2col at the Euclid stems' shape,
# bf16, forward and both gradients, relative to a float32 im2col reference; then timed,
# interleaved over 3 rounds: im2col, the Pallas kernels reading the unpadded input (the
# default since session 12) and the former form reading a jnp.pad-ded copy.
import statistics, time, jax, jax.numpy as jnp
from jaisp_jax.models import pallas_conv, sample_conv
ks = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(ks[0], (64, 256, 256, 32))
k = 0.1 * jax.random.normal(ks[1], (64, 3, 3, 32, 64))
ct = jax.random.normal(ks[2], (64, 256, 256, 64))
def fn(impl):
  def f(x, k):
    with sample_conv.implementation(impl):
      y = sample_conv.conv3x3(x, k)
    return jnp.sum(y.astype(jnp.float32) * ct), y
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))
ref = fn('im2col')(x, k)
rel = lambda a, r: float(jnp.linalg.norm(a.astype(jnp.float32) - r) / jnp.linalg.norm(r))
bf = lambda a: a.astype(jnp.bfloat16)
forms, times = {}, {}
for name, impl, pad_free in (('im2col', 'im2col', True), ('pallas', 'pallas', True),
                             ('padded', 'pallas', False)):
  try:
    pallas_conv._PAD_FREE = pad_free  # read when the kernels are traced: the first call
    f = fn(impl)
    (_, y), (dx, dk) = f(bf(x), bf(k))
    print(f'{name:7s} bf16 rel err: out {rel(y, ref[0][1]):.2e} dx {rel(dx, ref[1][0]):.2e} '
          f'dk {rel(dk, ref[1][1]):.2e}', flush=True)
    jax.block_until_ready(f(bf(x), bf(k)))
    forms[name], times[name] = f, []
  except Exception as e:  # noqa
    print(f'{name}: failed: {type(e).__name__}: {e}'[:2000], flush=True)
pallas_conv._PAD_FREE = True
for r in range(3):
  for name, f in (forms.items() if r % 2 == 0 else reversed(forms.items())):
    t = time.perf_counter()
    for _ in range(10):
      out = f(bf(x), bf(k))
    jax.block_until_ready(out)
    times[name].append((time.perf_counter() - t) * 100)
for name, ts in times.items():
  print(f'{name:7s} forward + both gradients, 64 x 256 x 256 x 32 -> 64: median '
        f'{statistics.median(ts):.2f} ms (rounds: {", ".join(f"{t:.2f}" for t in ts)})',
        flush=True)
PY
BASE=(--config=configs/jepa.py:base --config.model.dtype=bfloat16)
VITB=(--config=configs/jepa.py:pod --config.mesh.fsdp=1 --config.model.trunk.remat=False)
B256=(--config.data.pairs_per_batch=256 --steps 20 --warmup 5)
# A larger trunk: ViT-L (D 1024, depth 24, 16 heads, predictor 4096).
VITL=("${VITB[@]}" --config.model.trunk.embed_dim=1024 --config.model.trunk.depth=24
      --config.model.trunk.num_heads=16 --config.model.predictor.hidden=4096)
# The trunk's GEMMs and their epilogues, interleaved in one process, dispatched back to
# back as the training loop: Triton for every GEMM, the tanh GELU. (Session 10 on an
# H100: xla_gpu_enable_cublaslt=true compiled to the same program as the baseline, and
# the tanh GELU with it was 1.004x the baseline's time.) A ViT-B variant costs ~50 s
# (compile 13-33 s, the FLOP count, init): give an ab run T >= 60 s per variant.
FLAGS_AB=(--variant base= --variant tga=--xla=xla_gpu_triton_gemm_any=true
          --variant tanh=--config.model.trunk.gelu=tanh
          --pipelined --rounds 6 --steps 5 --warmup 3)
# RUNS (space-separated names) picks runs; default: all, in this order of priority.
# 'vitb_bf16_b256' and 'base_bf16' take the stems' 'auto' form, which is 'pallas' on CUDA
# since session 8, so the explicit '_pallas' runs repeat them there and are left out of
# the default list; 'vitb_bf16_b256_im2col' is the form 'pallas' replaced.
ALL="vitb_bf16_b256 vitb_bf16_b256_im2col vitb_bf16_b256_patchstem_attnpad
     vitb_bf16_b256_pallas_attnpad base_bf16_xla base_bf16 vitb_bf16_b256_patchstem
     vitb_bf16_b512_patchstem vitb_bf16_b256_shift
     vitb_bf16_b256_sconv vitb_bf16_b256_shift_sconv vitb_bf16_b256_grouped base_bf16_grouped
     vitb_bf16_b512 vitb_bf16_b256_xla vitb_bf16_b256_remat base_f32"
for r in ${RUNS:-$ALL}; do
  case $r in
    ab_trunk_flags) ab $r "${VITB[@]}" --config.data.pairs_per_batch=256 \
      --config.model.stem.kind=patch "${FLAGS_AB[@]}" ;;
    ab_vitb_flags) ab $r "${VITB[@]}" --config.data.pairs_per_batch=256 "${FLAGS_AB[@]}" ;;
    vitl_bf16_b256) step $r "${VITL[@]}" --config.data.pairs_per_batch=256 --steps 10 --warmup 3 ;;
    vitl_bf16_b512) step $r "${VITL[@]}" --config.data.pairs_per_batch=512 --steps 8 --warmup 3 ;;
    # 768 pairs: ~115 GB by session 12's 41.9 / 77.1 GB at 256 / 512, so an H200 only.
    # 256 -> 512 pairs took the pipelined MFU 39.2 -> 39.8% (fixed costs per step halved).
    vitl_bf16_b768) step $r "${VITL[@]}" --config.data.pairs_per_batch=768 --steps 6 --warmup 3 ;;
    vitl_bf16_b256_patchstem) step $r "${VITL[@]}" --config.data.pairs_per_batch=256 \
      --config.model.stem.kind=patch --steps 10 --warmup 3 ;;
    vitb_bf16_b256_patchstem_prof) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
      step $r "${VITB[@]}" "${B256[@]}" --config.model.stem.kind=patch \
      --profile /tmp/jaisp_trace_vitb ;;
    base_bf16_xla) step $r "${BASE[@]}" --config.model.trunk.attention=xla --steps 30 --warmup 5 ;;
    base_bf16) step $r "${BASE[@]}" --steps 30 --warmup 5 ;;
    base_bf16_grouped) step $r "${BASE[@]}" --stem-conv grouped --steps 30 --warmup 5 ;;
    # Without command buffers: XLA:GPU otherwise runs the step as one CUDA graph, which
    # the trace shows as a single op (same speed, docs/performance.md session 5).
    vitb_bf16_b256) XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
      step $r "${VITB[@]}" "${B256[@]}" --profile /tmp/jaisp_trace_vitb ;;
    vitb_bf16_b256_grouped) step $r "${VITB[@]}" "${B256[@]}" --stem-conv grouped ;;
    vitb_bf16_b256_pallas) step $r "${VITB[@]}" "${B256[@]}" --stem-conv pallas ;;
    vitb_bf16_b256_im2col) step $r "${VITB[@]}" "${B256[@]}" --stem-conv im2col ;;
    vitb_bf16_b256_pallas_attnpad) step $r "${VITB[@]}" "${B256[@]}" --stem-conv pallas \
      --config.model.trunk.attention=cudnn_padded ;;
    vitb_bf16_b256_patchstem_attnpad) step $r "${VITB[@]}" "${B256[@]}" \
      --config.model.stem.kind=patch --config.model.trunk.attention=cudnn_padded ;;
    vitb_bf16_b512_patchstem) step $r "${VITB[@]}" --config.data.pairs_per_batch=512 \
      --config.model.stem.kind=patch --steps 10 --warmup 3 ;;
    base_bf16_pallas) step $r "${BASE[@]}" --stem-conv pallas --steps 30 --warmup 5 ;;
    vitb_bf16_b256_shift) step $r "${VITB[@]}" "${B256[@]}" --stem-conv shift ;;
    vitb_bf16_b256_sconv) step $r "${VITB[@]}" "${B256[@]}" --stem-embed conv ;;
    vitb_bf16_b256_shift_sconv) step $r "${VITB[@]}" "${B256[@]}" --stem-conv shift --stem-embed conv ;;
    vitb_bf16_b256_patchstem) step $r "${VITB[@]}" "${B256[@]}" --config.model.stem.kind=patch ;;
    vitb_bf16_b512) step $r "${VITB[@]}" --config.data.pairs_per_batch=512 --steps 10 --warmup 3 ;;
    vitb_bf16_b256_xla) step $r "${VITB[@]}" "${B256[@]}" --config.model.trunk.attention=xla ;;
    vitb_bf16_b256_remat) step $r "${VITB[@]}" "${B256[@]}" --config.model.trunk.remat=True ;;
    base_f32) step $r --config=configs/jepa.py:base --steps 30 --warmup 5 ;;
    *) echo "unknown run $r" ;;
  esac
done

if [ -d /tmp/jaisp_trace_vitb ]; then  # device kernels of the profiled run, by HLO op
  "$PY" - <<'PY' 2>&1 | tee "$OUT_DIR/kernels.log"
import collections, glob, gzip, json, os
f = sorted(glob.glob('/tmp/jaisp_trace_vitb/**/*.trace.json.gz', recursive=True),
           key=os.path.getmtime)[-1]
ev = json.load(gzip.open(f))['traceEvents']
pids = {e['pid']: e['args']['name'] for e in ev if e.get('ph') == 'M' and e.get('name') == 'process_name'}
dev = collections.Counter(); n = collections.Counter()
for e in ev:
  if e.get('ph') == 'X' and 'GPU' in pids.get(e.get('pid'), ''):
    k = e.get('args', {}).get('hlo_op', e['name'])
    dev[k] += e['dur'] / 2e3; n[k] += 1
print(f'device time {sum(dev.values()):.1f} ms per step over {len(dev)} ops; args of one '
      f'event: {next((e.get("args") for e in ev if e.get("ph") == "X" and "GPU" in pids.get(e.get("pid"), "")), None)}')
for k, v in dev.most_common(30):
  print(f'{v:8.2f} ms  x{n[k] // 2:<4d} {k[:110]}')
PY
  # The trace itself, flat in OUT_DIR (the device tool returns files 16 folders deep at most).
  find /tmp/jaisp_trace_vitb -name '*.trace.json.gz' -exec cp {} "$OUT_DIR/" \;
fi
echo "=== summary"
for f in "$OUT_DIR"/*.log; do
  printf '%-24s %s\n' "$(basename "$f" .log)" "$(grep -h '^steps_per_s=\|^MFU\|^pipelined\|^memory\|^compile' "$f" | tr '\n' ' ')"
done
