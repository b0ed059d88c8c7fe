"""Tests of the benchmark harness (jaisp_jax.bench): contract line, FLOP counts, scaling.

Tiny configs only (the torch_ref architecture shrunk: 32 px views, D 32, one block);
no timed assertions.
"""

import argparse
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaisp_jax import bands as bands_lib
from jaisp_jax.bench import configs
from jaisp_jax.bench import hardware
from jaisp_jax.bench import matching
from jaisp_jax.bench import profile
from jaisp_jax.bench import scaling
from jaisp_jax.bench import step
from jaisp_jax.cli import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = 'configs/jepa.py:torch_ref'
# The reference architecture (conv stems, learned positions, MLP predictor) at toy sizes:
# 32 x 32 px Rubin views = 2 x 2 tokens of 16 px.
TINY = ['--config.data.crop_arcsec=6.4', '--config.model.trunk.embed_dim=32',
        '--config.model.trunk.depth=1', '--config.model.trunk.num_heads=2',
        '--config.model.trunk.learned_pos_grid=2', '--config.model.predictor.hidden=64',
        '--config.model.stem.hidden=4', '--config.model.stem.channels=8']
CONTRACT = re.compile(r'^steps_per_s=\d+\.\d+ samples_per_s=\d+\.\d+ peak_rss_mb=\d+\.\d+$')


def tiny_config(*extra):
  return configs.load_config(SPEC, TINY + list(extra))


def one_device_mesh():
  return scaling.make_mesh(1, 1)


def test_step_command_prints_the_contract_line_and_saves_figures(tmp_path):
  out = tmp_path / 'step.json'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  proc = subprocess.run(
      [sys.executable, '-m', 'jaisp_jax.bench', 'step', f'--config={SPEC}', '--steps', '2',
       '--warmup', '1', '--quotas', 'rubin-rubin=2', '--out', str(out)] + TINY,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert CONTRACT.match(lines[-1]), lines[-1]
  fig = json.loads(out.read_text())
  sps = float(re.search(r'steps_per_s=(\S+)', lines[-1]).group(1))
  assert sps == pytest.approx(fig['steps_per_s'], rel=1e-3)
  assert fig['samples_per_s'] == pytest.approx(2 * fig['steps_per_s'])
  assert fig['flops_per_step'] > 0 and fig['steps'] == 2
  assert fig['step_min_s'] <= fig['step_median_s'] <= fig['step_max_s']
  assert fig['tokens_per_step'] == 2 * 2 * 4  # 2 pairs x 2 views x 2 x 2 tokens
  assert any(line.startswith('compile:') for line in lines)
  assert any(line.startswith('MFU') for line in lines)


def test_step_command_rejects_unknown_config_field():
  from jaisp_jax.bench import __main__ as cli_main
  with pytest.raises(UserError, match='no_such_field'):
    cli_main.main(['step', f'--config={SPEC}', '--config.model.no_such_field=1'])


@pytest.fixture(scope='module')
def weak_rows():
  """Weak scaling of the tiny config over 1 and 2 devices, 2 pairs per device."""
  args = argparse.Namespace(config=SPEC, quotas='rubin-rubin=2', steps=0)
  return scaling.weak_scaling(args, TINY, [1, 2], log=lambda *a: None)['rows']


def test_flops_are_positive_and_scale_with_the_batch(weak_rows):
  f2 = weak_rows[0]['gflop_per_device'] * 1e9  # 1 device, 2 pairs
  f4 = step.flops_per_step(tiny_config(), {'rubin-rubin': 4}, mesh=one_device_mesh())
  # Per pair: the two stem convolutions of both views, forward, at the very least twice
  # (online + target branch); backward adds about twice that again.
  px = 32 * 32
  conv_fwd = 2 * px * 9 * (2 * 4 + 4 * 8) * 2  # 2 views x (conv1 + conv2) multiply-adds
  assert f2 >= 2 * 2 * conv_fwd
  # Doubling the batch about doubles the step (the optimizer's cost is batch-free).
  assert 1.6 < f4 / f2 <= 2.0


def test_weak_scaling_keeps_flops_per_device_flat(weak_rows):
  assert [r['global_pairs'] for r in weak_rows] == [2, 4]
  assert [r['pairs_per_device'] for r in weak_rows] == [2, 2]
  assert weak_rows[1]['gflop_per_device'] == pytest.approx(weak_rows[0]['gflop_per_device'],
                                                           rel=0.1)
  assert weak_rows[1]['flops_per_device_vs_first'] == pytest.approx(
      weak_rows[1]['gflop_per_device'] / weak_rows[0]['gflop_per_device'])


def test_fsdp_shards_parameter_and_optimizer_bytes():
  args = argparse.Namespace(config=SPEC, quotas=None, compile=False)
  res = scaling.memory(args, TINY + ['--config.mesh.min_shard_size=1024'], 8,
                       log=lambda *a: None)
  off, on = res['rows']
  assert (off['fsdp'], on['fsdp']) == (1, 8)
  for part in ('params', 'ema_params', 'opt_state'):
    assert off[f'{part}_mb_device'] == pytest.approx(off[f'{part}_mb_total'])
    assert on[f'{part}_mb_device'] < 0.5 * off[f'{part}_mb_device']
  # Adam keeps two moments per parameter.
  assert off['opt_state_mb_total'] == pytest.approx(2 * off['params_mb_total'], rel=0.01)


def test_bench_quotas_of_torch_ref_are_the_reference_batch():
  config = configs.load_config(SPEC)
  registry = bands_lib.BandRegistry.from_config(config.bands)
  assert configs.bench_quotas(config, registry, 1) == {'rubin-rubin': 16}
  assert configs.bench_quotas(config, registry, 2, 'rubin-rubin=4') == {'rubin-rubin': 4}
  with pytest.raises(UserError, match='multiple'):
    configs.bench_quotas(config, registry, 4, 'rubin-rubin=6')


def test_overrides_are_parsed_with_the_field_type():
  config = tiny_config('--config.model.trunk.remat=true', '--config.optim.lr=0.01',
                       '--config.model.dtype=bfloat16')
  assert config.model.trunk.remat is True
  assert config.optim.lr == 0.01
  assert config.model.dtype == 'bfloat16'
  assert config.model.trunk.depth == 1
  with pytest.raises(UserError, match='expected an integer'):
    tiny_config('--config.model.trunk.depth=two')


def test_profile_categories_follow_the_name_stack():
  cat = profile.categorize
  assert cat('ynn_fusion.3', 'jit(train_step)/jvp(JAISP)/JAISP.encode/JAISP._encode_views/'
             'trunk/block_3/attn/qkv/dot_general') == ('fwd online', 'trunk/block/attn', 'matmul')
  assert cat('concatenate.4', 'jit(train_step)/jvp(JAISP.encode)/JAISP._encode_views/stems/'
             'stem_rubin/concatenate')[:3] == ('fwd target', 'stems/stem_rubin', 'other')
  assert cat('fusion.9', 'jit(train_step)/transpose(jvp(JAISP))/JAISP.encode/predictor/mlp/'
             'fc1/dot_general')[0] == 'bwd'
  assert cat('fusion.1', 'jit(train_step)/mul')[0] == 'update'


def test_cpu_peak_is_cores_times_clock_times_vector_width():
  zen4 = {'flags': 'fma avx2 avx512f', 'vendor_id': 'AuthenticAMD', 'cpu family': '25'}
  intel = {'flags': 'fma avx2 avx512f', 'vendor_id': 'GenuineIntel', 'cpu family': '6'}
  avx2 = {'flags': 'fma avx2', 'vendor_id': 'GenuineIntel', 'cpu family': '6'}
  assert hardware.cpu_flops_per_cycle(intel)[0] == 2 * hardware.cpu_flops_per_cycle(zen4)[0]
  assert hardware.cpu_flops_per_cycle(avx2)[0] == hardware.cpu_flops_per_cycle(zen4)[0]
  peak = hardware.cpu_peak(cores=2)
  assert np.isnan(peak.flops_per_s) or peak.flops_per_s == pytest.approx(
      2 * hardware.cpu_peak(cores=1).flops_per_s)


def test_matching_bench_agrees_with_scipy():
  res = matching.run(batch=3, size=6, reps=1, log=lambda *a: None)
  for name in ('jaisp linear_sum_assignment (jit, batched)',
               'optax hungarian_algorithm (jit+vmap)'):
    assert res[name]['max_cost_error'] < 1e-5
    assert res[name]['median_ms'] > 0


def test_profile_summary_reads_gpu_kernel_events_by_their_hlo_op(tmp_path):
  # On GPUs the device's kernel events are named after the kernel and carry the HLO
  # instruction in args.hlo_op; host-side events of the same ops must not count twice.
  import gzip  # pylint: disable=g-import-not-at-top
  hlo = ('  %fusion.7 = f32[8]{0} fusion(f32[8]{0} %p), kind=kLoop, metadata={op_name='
         '"jit(train_step)/jvp(JAISP)/JAISP.encode/trunk/block_0/mlp/fc1/dot_general"}\n'
         '  %custom-call.2 = f32[8]{0} custom-call(f32[8]{0} %p), custom_call_target='
         '"__cublas$gemm", metadata={op_name="jit(train_step)/transpose(jvp(JAISP))/'
         'JAISP.encode/predictor/mlp/fc2/dot_general"}\n')
  events = [
      {'ph': 'X', 'name': 'sm90_xmma_gemm_bf16', 'dur': 3000, 'pid': 2,
       'args': {'hlo_op': 'fusion.7', 'hlo_module': 'jit_train_step'}},
      {'ph': 'X', 'name': 'cutlass_kernel', 'dur': 1000, 'pid': 2,
       'args': {'hlo_op': 'custom-call.2'}},
      {'ph': 'X', 'name': 'fusion.7', 'dur': 50, 'pid': 1},  # host launch event
  ]
  path = tmp_path / 'x.trace.json.gz'
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)
  rows = profile.summarize(str(path), hlo, steps=2)
  assert ('fwd online', 'trunk/block/mlp', 'matmul', 1.5) in rows
  assert ('bwd', 'predictor/mlp/fc2', 'matmul', 0.5) in rows
  assert sum(r[3] for r in rows) == pytest.approx(2.0)


def test_the_step_benchmark_imports_neither_tensorflow_nor_clu():
  # An accelerator image with the JAX stack, grain and ml_collections runs the
  # harness (launch/bench_gpu.sh): the trainer is apart from the training loop.
  code = ('import sys, jaisp_jax.bench.step, jaisp_jax.train.trainer, jaisp_jax.inference; '
          'bad = [m for m in ("tensorflow", "clu", "tensorflow_datasets") if m in sys.modules]; '
          'assert not bad, bad')
  proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_pipelined_steps_advance_the_state_like_blocked_steps():
  bench = step.StepBench(tiny_config(), {'rubin-rubin': 2}, mesh=one_device_mesh(),
                         n_batches=2)
  bench.compile()
  bench.init_state()
  times = bench.run(2)
  assert len(times) == 2 and min(times) > 0 and int(bench.state.step) == 2
  seconds = bench.run_pipelined(3, start=2)
  assert seconds > 0 and int(bench.state.step) == 5
  assert np.isfinite(float(bench.last_metrics['loss']))
