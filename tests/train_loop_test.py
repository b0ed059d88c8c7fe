"""The training system end to end, through the real command line.

One tiny JEPA config (a few seconds per run once compiled) on an on-the-fly simulated
field. Checked here: kill -9 and SIGTERM at arbitrary steps then resuming gives
parameters bitwise equal to an uninterrupted run; a shape-changing config on an old
workdir fails with a clear one-line error and leaves the checkpoint alone; the export
bundle restores in a fresh process with the same representation; divergence stops the
run with the last good checkpoint kept; 1 device and 8 devices give the same losses.
"""

import functools
import glob
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaisp_jax.cli import ConfigError
from jaisp_jax.train import checkpoint as ckpt_lib
from jaisp_jax.train import loop
from jaisp_jax.train import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 12
TINY = [
    '--config=configs/jepa.py:smoke',
    f'--config.total_steps={TOTAL}', '--config.checkpoint_every=3', '--config.log_every=3',
    '--config.keep_checkpoints=10', '--config.eval.every=0', '--config.eval.max_chips=8',
    '--config.model.trunk.embed_dim=32', '--config.model.trunk.depth=1',
    '--config.model.trunk.num_heads=2', '--config.model.predictor.hidden=64',
    '--config.data.crop_arcsec=6.4', '--config.data.pairs_per_batch=8',
    '--config.data.simulate.n_tiles=4', '--config.data.simulate.size=64',
    '--config.data.simulate.chip_px=32', '--config.optim.warmup_steps=2',
]


def tiny_config(**overrides):
  from configs import jepa  # pylint: disable=import-outside-toplevel
  c = jepa.get_config('smoke')
  for flag in TINY[1:]:
    key, value = flag[len('--config.'):].split('=')
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(float(value) if isinstance(node[leaf], float) else int(value))
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return c


def env(devices=1):
  e = dict(os.environ)
  e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  e['JAX_PLATFORMS'] = 'cpu'
  e['PYTHONPATH'] = ROOT
  return e


def main_cmd(workdir, *extra):
  return [sys.executable, '-m', 'jaisp_jax.main', *TINY, f'--workdir={workdir}', *extra]


def run_main(workdir, *extra, check=True):
  p = subprocess.run(main_cmd(workdir, *extra), cwd=ROOT, env=env(), capture_output=True,
                     text=True, timeout=600)
  if check and p.returncode != 0:
    raise AssertionError(f'exit {p.returncode}\n{p.stderr[-3000:]}')
  return p


def run_until_checkpoint(workdir, step, sig):
  """Starts a run and sends `sig` once the checkpoint of `step` exists."""
  p = subprocess.Popen(main_cmd(workdir), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  target = os.path.join(workdir, 'checkpoints', str(step))
  deadline = time.time() + 600
  while not os.path.isdir(target) and p.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert p.poll() is None, f'run ended before step {step}: {p.communicate()[1][-2000:]}'
  p.send_signal(sig)
  out, err = p.communicate(timeout=300)
  return p.returncode, err


def _long_run_at_checkpoint(workdir: str, step: int) -> subprocess.Popen:
  """A long training run, returned once its checkpoint of `step` exists (so it is surely
  inside the training loop), still running."""
  cmd = main_cmd(workdir, '--config.total_steps=100000', '--config.log_every=1000')
  p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while (not os.path.isdir(os.path.join(workdir, 'checkpoints', str(step)))
         and p.poll() is None and time.time() < deadline):
    time.sleep(0.05)
  assert p.poll() is None, p.communicate()[1][-2000:]
  return p


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_stops_cleanly(tmp_path):
  # Interrupted inside the training loop: Ctrl-C (SIGINT) is as polite as SIGTERM.
  workdir = str(tmp_path / 'w')
  p = _long_run_at_checkpoint(workdir, 9)
  p.send_signal(signal.SIGINT)
  _, err = p.communicate(timeout=300)
  assert p.returncode == 0 and 'Traceback' not in err, err[-2000:]
  saved = re.search(r'SIGINT: saved a checkpoint at step (\d+) and stopped', err)
  assert saved and int(saved.group(1)) >= 9
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', saved.group(1)))


def final_params(workdir, step=TOTAL):
  config = tiny_config()
  trainer = loop.Trainer(config, mesh=sharding.make_mesh(config, jax.devices()[:1]))
  abstract, _ = trainer.abstract_state()
  ck = ckpt_lib.Checkpointer(workdir, save_every=1, keep=10)
  state = ck.restore(abstract, None, step)
  ck.close()
  return jax.device_get(state)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('uninterrupted'))
  p = run_main(workdir)
  return workdir, p


def test_progress_lines_and_tensorboard(reference_run):
  workdir, p = reference_run
  assert f'step {TOTAL}/{TOTAL} | loss' in p.stderr
  assert 'Traceback' not in p.stderr
  events = glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0})
  acc.Reload()
  tags = set(acc.Tags()['tensors'])
  assert {'train/loss', 'train/grad_norm', 'train/ema_momentum', 'train/band_usage/euclid_h',
          'train/band_usage/rubin_u'} <= tags, sorted(tags)
  assert os.path.exists(os.path.join(workdir, 'config.json'))


@pytest.mark.slow
def test_kill_and_sigterm_then_resume_is_bitwise_identical(reference_run, tmp_path):
  workdir = str(tmp_path / 'interrupted')
  # SIGKILL right after step 4's... checkpoint 3 exists; the run is somewhere past it.
  rc, _ = run_until_checkpoint(workdir, 3, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  # Resume, then a polite preemption: it must save where it is and exit 0.
  rc, err = run_until_checkpoint(workdir, 6, signal.SIGTERM)
  assert rc == 0, err[-2000:]
  assert 'SIGTERM: saved a checkpoint at step' in err
  run_main(workdir)
  a = final_params(reference_run[0])
  b = final_params(workdir)
  assert int(a.step) == int(b.step) == TOTAL
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_shape_changing_config_on_old_workdir_fails_cleanly(reference_run):
  workdir, _ = reference_run
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  config_json = open(os.path.join(workdir, 'config.json')).read()
  p = run_main(workdir, '--config.model.trunk.embed_dim=48', check=False)
  assert p.returncode == 2
  # The refused config does not replace the run's own (which matches its checkpoints).
  assert open(os.path.join(workdir, 'config.json')).read() == config_json
  assert 'Traceback' not in p.stderr
  assert 'does not fit this config' in p.stderr and 'checkpoint has shape' in p.stderr
  assert len([l for l in p.stderr.splitlines() if 'error' in l]) == 1
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


@pytest.mark.parametrize('flag,match', [
    ('--config.log_every=0', 'config.log_every must be an integer >= 1, got 0'),
    ('--config.total_steps=-3', 'config.total_steps must be an integer >= 0, got -3'),
    ('--config.data.pairs_per_batch=0', 'config.data.pairs_per_batch must be an integer >= 1'),
    ('--config.data.chips_per_batch=-1', 'config.data.chips_per_batch must be an integer >= 0'),
])
def test_unusable_config_values_are_one_line_errors_before_anything_is_written(
    tmp_path, flag, match):
  workdir = tmp_path / 'w'
  p = run_main(str(workdir), flag, check=False)
  assert p.returncode == 2 and match in p.stderr and 'Traceback' not in p.stderr
  assert not workdir.exists()


@pytest.mark.parametrize('overrides,match', [
    ({'model.trunk.num_heads': 3}, 'cannot build the model: width 32 is not divisible by 3 heads'),
    ({'model.stem.kind': 'nosuch'}, "cannot build the model: unknown stem kind 'nosuch'"),
    ({'eval.query_band': 'nosuch'}, "config.eval: band 'nosuch' is not in the band registry"),
    ({'loss.weight_mode': 'nosuch'}, 'cannot build the train step: weight_mode must be one of'),
])
def test_config_values_the_model_or_step_cannot_use_are_config_errors(tmp_path, overrides, match):
  # Raised as ValueErrors inside the trace (a traceback on the command line) or, for the
  # eval band, only by the final evaluation, after all the training.
  workdir = tmp_path / 'w'
  with pytest.raises(ConfigError, match=re.escape(match)):
    loop.train_and_evaluate(tiny_config(**overrides), str(workdir))
  if 'loss.weight_mode' in overrides:  # traced by the first step: nothing was saved
    assert not os.listdir(workdir / 'checkpoints')
  else:  # found before the run directory is made
    assert not workdir.exists()


def test_a_batch_that_does_not_split_over_the_devices_is_a_one_line_error(tmp_path):
  # 8 simulated devices: 12 pairs do not split over them.
  p = subprocess.run(main_cmd(str(tmp_path / 'w'), '--config.data.pairs_per_batch=12'),
                     cwd=ROOT, env=env(devices=8), capture_output=True, text=True, timeout=600)
  assert p.returncode == 2 and 'Traceback' not in p.stderr
  assert 'must be a positive multiple of the data-parallel size' in p.stderr


@pytest.mark.parametrize('args,match', [
    (['--config=configs/nosuch.py'], "no config file 'configs/nosuch.py'"),
    (['--config=configs/jepa.py:nosuch'], "unknown size 'nosuch'; choose one of smoke"),
    (['--config=configs/jepa.py:smoke', '--config.model.nosuch=1'],
     'no such field (config.model has: clip, detr'),
    (['--config=configs/jepa.py:smoke', '--config.total_steps=abc'], 'expected an integer'),
    (['--config=SYNTAX'], 'cannot load the config file (line 1): SyntaxError'),
])
def test_config_file_and_flag_errors_are_one_line(tmp_path, args, match):
  bad = tmp_path / 'bad.py'
  bad.write_text('def get_config(:\n')
  args = [a.replace('SYNTAX', str(bad)) for a in args]
  cmd = [sys.executable, '-m', 'jaisp_jax.main', *args, f'--workdir={tmp_path / "w"}']
  p = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
  lines = [l for l in p.stderr.splitlines() if 'jaisp_jax.main: error' in l]
  assert p.returncode == 2 and len(lines) == 1 and match in lines[0], p.stderr[-1500:]
  assert 'Traceback' not in p.stderr and not (tmp_path / 'w').exists()


def test_misspelt_config_key_fails_with_valid_keys(tmp_path):
  p = run_main(str(tmp_path), '--config.total_stepz=3', check=False)
  assert p.returncode != 0 and 'total_stepz' in p.stderr and 'total_steps' in p.stderr


def test_export_refuses_the_workdir_and_a_folder_that_is_not_a_bundle(reference_run, tmp_path):
  workdir, _ = reference_run
  before = sorted(os.listdir(workdir))
  p = run_main(workdir, '--mode=export', f'--export_dir={workdir}', check=False)
  assert p.returncode == 2 and 'is the run directory itself' in p.stderr
  assert 'Traceback' not in p.stderr and sorted(os.listdir(workdir)) == before
  other = tmp_path / 'notes'
  other.mkdir()
  (other / 'precious.txt').write_text('keep me')
  p = run_main(workdir, '--mode=export', f'--export_dir={other}', check=False)
  assert p.returncode == 2 and 'not a jaisp-jax bundle' in p.stderr
  assert os.listdir(other) == ['precious.txt']


def test_export_dir_under_a_file_is_a_one_line_error(reference_run, tmp_path):
  (tmp_path / 'notes').write_text('keep me')
  p = run_main(reference_run[0], '--mode=export', f'--export_dir={tmp_path / "notes" / "b"}',
               check=False)
  assert p.returncode == 2 and 'Traceback' not in p.stderr, p.stderr[-1500:]
  assert f'{tmp_path / "notes"} is not a folder' in p.stderr
  assert os.listdir(tmp_path) == ['notes']


@pytest.mark.slow
def test_second_ctrl_c_stops_without_a_traceback_and_the_run_resumes(tmp_path):
  workdir = str(tmp_path / 'w')
  p = _long_run_at_checkpoint(workdir, 6)
  p.send_signal(signal.SIGINT)
  time.sleep(0.05)  # the first one is handled (a checkpoint is being saved) ...
  p.send_signal(signal.SIGINT)  # ... and the second stops at once, save or no save
  _, err = p.communicate(timeout=300)
  assert 'Traceback' not in err and 'Error' not in err, err[-2000:]
  assert (p.returncode == 130 and 'jaisp_jax.main: interrupted' in err) or (
      p.returncode == 0 and 'SIGINT: saved a checkpoint' in err), (p.returncode, err[-2000:])
  # Whatever the second Ctrl-C cut short, the run resumes, and no partial save is left.
  run_main(workdir, '--config.total_steps=20')
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints')), key=int)[-1] == '20'


def test_export_restores_in_a_fresh_process(reference_run, tmp_path):
  workdir, _ = reference_run
  export_dir = str(tmp_path / 'export')
  run_main(workdir, '--mode=export', f'--export_dir={export_dir}')
  rng = np.random.default_rng(0)
  image = rng.normal(size=(2, 1, 32, 32)).astype(np.float32)
  image[:, :, 10:13, 20:23] += 50.0
  rms = np.ones_like(image)
  np.save(tmp_path / 'image.npy', image)
  script = (
      'import sys, numpy as np; from jaisp_jax import inference\n'
      f'm = inference.load({export_dir!r})\n'
      f'img = np.load({str(tmp_path / "image.npy")!r})\n'
      'out = m.get_representation(img, np.ones_like(img), "rubin_r")\n'
      f'np.savez({str(tmp_path / "out.npz")!r}, **{{k: out[k] for k in ("tokens", "global", "weights")}})\n')
  subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env(), check=True, timeout=300,
                 capture_output=True)
  fresh = np.load(tmp_path / 'out.npz')
  from jaisp_jax.models import jaisp  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  state = final_params(workdir)
  here = jaisp.get_representation({'params': state.ema_params}, image, rms, 'rubin_r',
                                  config.model)
  assert fresh['tokens'].shape == (2, 4, 32) and fresh['weights'].shape == (2, 1, 32, 32)
  for k in ('tokens', 'global', 'weights'):
    np.testing.assert_allclose(fresh[k], np.asarray(here[k]), rtol=1e-5, atol=1e-6)


def test_divergence_stops_with_last_good_checkpoint(tmp_path):
  config = tiny_config(**{'optim.lr': 1e30, 'optim.clip_norm': 1e30, 'optim.warmup_steps': 0,
                          'max_consecutive_skips': 2, 'total_steps': 30,
                          'checkpoint_every': 100})
  with pytest.raises(loop.TrainingDiverged, match='consecutive steps had a non-finite'):
    loop.train_and_evaluate(config, str(tmp_path))
  # Skipped updates never reach the state, so every checkpoint left is finite.
  trainer = loop.Trainer(config)
  abstract, _ = trainer.abstract_state()
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=10)
  assert ck.all_steps(), 'the first step is always checkpointed'
  for step in ck.all_steps():
    state = jax.device_get(ck.restore(abstract, None, step))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
  ck.close()


def test_loss_trajectory_same_on_one_and_eight_devices():
  config = tiny_config()
  trainer8 = loop.Trainer(config, mesh=sharding.make_mesh(config, jax.devices()[:8]))
  from jaisp_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  ds = iter(pipeline.make_dataset(config.data, trainer8.registry, data_parallel=8))
  batches = [next(ds) for _ in range(20)]
  losses = []
  for n in (1, 8):
    trainer = loop.Trainer(config, mesh=sharding.make_mesh(config, jax.devices()[:n]))
    _, shardings = trainer.abstract_state()
    state = trainer.fresh_state(shardings)
    step = trainer.jitted_step(shardings)
    traj = []
    for b in batches:
      state, m = step(state, sharding.global_batch(b, trainer.mesh))
      traj.append(float(m['loss']))
    losses.append(np.asarray(traj))
  assert losses[0][-1] < losses[0][0]
  np.testing.assert_allclose(losses[0], losses[1], rtol=2e-4, atol=2e-5)
