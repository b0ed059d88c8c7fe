"""Tests of `python -m jaisp_jax.bench versus` (ours against the PyTorch reference).

The reference is replaced by a stand-in folder whose bench.py prints the contract line
(torch is not installed in CI); ours is the real `bench step` at a toy size of the
reference architecture. No timed assertions: the ratios are checked against the
figures the two programs printed.
"""

import json
import os
import subprocess
import sys

import pytest

from jaisp_jax.bench import versus
from jaisp_jax.cli import UserError

from bench_test import TINY  # the torch_ref architecture at toy sizes (tests/bench_test.py)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for shared/bench/torch_ref/bench.py: records its arguments and environment,
# prints some output and then the contract line (compile faster than eager, as torch's).
STAND_IN = r'''
import json, os, sys
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'calls.jsonl'), 'a') as f:
  f.write(json.dumps({'argv': sys.argv[1:], 'tunables': os.environ.get('GLIBC_TUNABLES')}) + '\n')
compiled = '--compile' in sys.argv
print('reference step timings ...')
sps = 0.75 if compiled else 0.5
print(f'steps_per_s={sps:.4f} samples_per_s={sps * 2:.4f} peak_rss_mb=100.0')
'''


def test_schedule_alternates_the_order_between_rounds():
  assert versus.schedule(2) == [(1, 'ours'), (1, 'eager'), (1, 'compile'),
                                (2, 'compile'), (2, 'eager'), (2, 'ours')]
  assert versus.schedule(1, with_compile=False) == [(1, 'ours'), (1, 'eager')]


def test_parse_contract_reads_the_last_line_and_rejects_anything_else():
  out = 'warm-up ...\nsteps_per_s=0.5000 samples_per_s=8.0000 peak_rss_mb=2300.5\n\n'
  assert versus.parse_contract(out, 'x') == {'steps_per_s': 0.5, 'samples_per_s': 8.0,
                                             'peak_rss_mb': 2300.5}
  for bad in ('', 'Traceback (most recent call last):\n  ...',
              'steps_per_s=0.5 samples_per_s=8.0 peak_rss_mb=1\ndone',
              'steps_per_s=nan samples_per_s=nan peak_rss_mb=1',
              'steps_per_s=0 samples_per_s=0 peak_rss_mb=1'):
    with pytest.raises(UserError, match='contract line'):
      versus.parse_contract(bad, 'the reference')


def test_summary_ratios_and_goal_per_round():
  runs = [dict(round=1, program='ours', samples_per_s=8.0),
          dict(round=1, program='eager', samples_per_s=5.0),
          dict(round=1, program='compile', samples_per_s=8.5),
          dict(round=2, program='compile', samples_per_s=7.5),
          dict(round=2, program='eager', samples_per_s=5.0),
          dict(round=2, program='ours', samples_per_s=7.6)]
  s = versus.summarize(runs)
  assert [r['vs_eager'] for r in s['rounds']] == pytest.approx([1.6, 1.52])
  assert [r['vs_compile'] for r in s['rounds']] == pytest.approx([8.0 / 8.5, 7.6 / 7.5])
  assert s['vs_eager']['met_every_round'] and s['vs_eager']['met_rounds'] == 2
  assert s['vs_eager']['median'] == pytest.approx(1.56)
  assert not s['vs_compile']['met_every_round'] and s['vs_compile']['met_rounds'] == 1
  assert s['vs_compile']['min'] == pytest.approx(8.0 / 8.5)
  lines = versus.report_lines(s)
  assert 'goal >= 1.5x met in 2 of 2' in lines[-2] and 'met in 1 of 2' in lines[-1]


def _stand_in(tmp_path):
  ref = tmp_path / 'torch_ref'
  ref.mkdir()
  (ref / 'bench.py').write_text(STAND_IN)
  return ref


def test_versus_runs_both_programs_alternating_and_saves_the_ratios(tmp_path):
  ref = _stand_in(tmp_path)
  out = tmp_path / 'versus.json'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  env.pop('GLIBC_TUNABLES', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'jaisp_jax.bench', 'versus', '--reference', str(ref),
       '--reference-python', sys.executable, '--rounds', '1', '--steps', '2', '--warmup', '1',
       '--threads', '3', '--quotas', 'rubin-rubin=2', '--out', str(out)] + TINY,
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  fig = json.loads(out.read_text())
  runs = {r['program']: r for r in fig['runs']}
  assert [r['program'] for r in fig['runs']] == ['ours', 'eager', 'compile']
  # The ratio is ours / reference from the figures each program printed.
  ours = runs['ours']['samples_per_s']
  assert ours == pytest.approx(2 * runs['ours']['steps_per_s'], rel=1e-3)  # 2 pairs / step
  assert fig['rounds'][0]['vs_eager'] == pytest.approx(ours / 1.0)
  assert fig['rounds'][0]['vs_compile'] == pytest.approx(ours / 1.5)
  assert fig['vs_eager']['met_every_round'] == (ours / 1.0 >= 1.5)
  # The reference got the same timing and the thread count; the compile run --compile.
  calls = [json.loads(line) for line in (ref / 'calls.jsonl').read_text().splitlines()]
  assert [c['argv'] for c in calls] == [
      ['--threads', '3', '--steps', '2', '--warmup', '1'],
      ['--threads', '3', '--steps', '2', '--warmup', '1', '--compile']]
  # ... and the environment the user gave, not our own huge-page restart's tunable.
  assert all(c['tunables'] is None for c in calls)
  assert 'ours / eager: median' in proc.stdout and 'ours / compile: median' in proc.stdout


def test_versus_reports_a_failing_reference_without_a_traceback(tmp_path):
  ref = tmp_path / 'torch_ref'
  ref.mkdir()
  (ref / 'bench.py').write_text('import torch_is_not_here\n')
  with pytest.raises(UserError, match=r"(?s)eager: .*exited with status 1:\n.*torch_is_not_here"):
    versus.run_one('eager', [sys.executable, str(ref / 'bench.py')], str(ref), None, 60)
  proc = subprocess.run(
      [sys.executable, '-m', 'jaisp_jax.bench', 'versus', '--reference', str(tmp_path / 'nope')],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'no bench.py there' in proc.stderr and 'Traceback' not in proc.stderr
