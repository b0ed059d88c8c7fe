"""A real multi-process run: 2 processes x 2 CPU devices on 127.0.0.1 with gloo collectives.

Trains a few steps, checkpoints, stops; resumes to a later step; both processes must end
with bit-identical local copies of the parameters, and the resumed run must start from
the checkpoint (not from scratch).
"""

import os
import re
import subprocess
import sys

import portpicker

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_loop_test import ROOT, TINY  # pylint: disable=wrong-import-position


def launch(workdir, total_steps):
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
               JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
    cmd = [sys.executable, '-m', 'jaisp_jax.main', *TINY, f'--workdir={workdir}',
           f'--config.total_steps={total_steps}', '--config.data.pairs_per_batch=8',
           f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    outs.append(err)
  return outs


def digests(outs, step):
  found = []
  for i, err in enumerate(outs):
    m = re.search(rf'process {i}/2: step {step} params digest ([0-9a-f]+)', err)
    assert m, err[-2000:]
    found.append(m.group(1))
  return found


def test_two_processes_train_checkpoint_resume_and_agree(tmp_path):
  workdir = str(tmp_path / 'run')
  first = launch(workdir, 6)
  assert 'devices=4 processes=2' in first[0]
  d6 = digests(first, 6)
  assert d6[0] == d6[1]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints'))
                if s.isdigit())[-1] == 6
  second = launch(workdir, 9)
  assert 'resumed from' in second[0] and '/checkpoints/6' in second[0]
  d9 = digests(second, 9)
  assert d9[0] == d9[1] and d9[0] != d6[0]
