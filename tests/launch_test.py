"""Every launch script has a --dry-run that prints what it would execute, and runs nothing."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(script, *args):
  out = subprocess.run(['bash', os.path.join(ROOT, 'launch', script), '--dry-run', *args],
                       capture_output=True, text=True, cwd=ROOT, check=True, timeout=30,
                       env=dict(os.environ, PATH='/usr/bin:/bin'))  # no gcloud/sbatch on PATH
  return out.stdout


def test_local_cpu():
  out = dry_run('local_cpu.sh', 'configs/jepa.py:smoke', '/tmp/w', '--config.total_steps=3')
  assert 'python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir=/tmp/w --config.total_steps=3' in out


def test_multiprocess_cpu_starts_one_command_per_process():
  out = dry_run('multiprocess_cpu.sh', '3', '2', 'configs/jepa.py:smoke', '/tmp/w')
  lines = [l for l in out.splitlines() if 'jaisp_jax.main' in l]
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert f'--process_id={i}' in line and '--num_processes=3' in line
    assert 'xla_force_host_platform_device_count=2' in line


def test_tpu_pod_runs_the_same_command_on_all_workers():
  out = dry_run('tpu_pod.sh', 'name', 'zone', 'v5litepod-64', 'configs/jepa.py:pod',
                'gs://b/w', 'gs://b/d', '--create')
  assert 'tpu-vm create name' in out
  ssh = [l for l in out.splitlines() if 'tpu-vm ssh' in l]
  assert len(ssh) == 1 and '--worker=all' in ssh[0]
  assert 'gs://b/d' in ssh[0] and 'gs://b/w' in ssh[0]


def test_slurm_prints_the_batch_script():
  out = dry_run('slurm_gpu.sh', '2', '8', 'configs/jepa.py:base', '/tmp/w')
  assert '#SBATCH --nodes=2' in out and '#SBATCH --ntasks-per-node=8' in out
  assert 'srun python -m jaisp_jax.main --config=configs/jepa.py:base' in out
  assert '+ sbatch' in out


def test_bench_gpu_reports_unknown_runs_and_skips_runs_past_its_budget(tmp_path):
  # The GPU script (launch/bench_gpu.sh) on this CPU machine, with no run it knows and a
  # spent budget: it must say so for each run, not fail silently or start a run.
  env = dict(os.environ, CHECKS='0', RUNS='no_such_run base_bf16', BUDGET='-1',
             PYTHON=sys.executable)
  proc = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'bench_gpu.sh'), str(tmp_path)],
                        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert 'unknown run no_such_run' in proc.stdout
  assert '=== base_bf16: skipped (budget -1 s spent)' in proc.stdout
  assert not (tmp_path / 'base_bf16.json').exists()
