"""Export: the inference bundle of a trained run.

    <export_dir>/
      params/          orbax checkpoint of the EMA target parameters (the encoder
                       used downstream; the online predictor is not needed)
      config.json      the full experiment config
      bands.json       the band registry (band ids index the stacked stems)
      manifest.json    format version, variant, training step, parameter count

The bundle is written to a temporary folder beside `export_dir` and renamed into
place when complete, so an interrupted export never leaves a bundle that looks
valid. `jaisp_jax.inference.load(export_dir)` reads it in a fresh process.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaisp_jax.cli import UserError, check_output_folder
from jaisp_jax.models import jaisp
from jaisp_jax.train import checkpoint as ckpt_lib

FORMAT_VERSION = 1


def check_target(export_dir: str):
  """Refuses an `export_dir` that writing a bundle would destroy: a file, or a folder that
  is neither empty nor a previous bundle (a bundle is replaced; anything else is kept)."""
  if not os.path.lexists(export_dir):
    check_output_folder(export_dir, '--export_dir')  # e.g. a path under a regular file
    return
  if not os.path.isdir(export_dir) or os.path.islink(export_dir):
    raise UserError(f'{export_dir}: exists and is not a folder; refusing to replace it with '
                    'the bundle (remove it or choose another --export_dir)')
  entries = os.listdir(export_dir)
  if entries and 'manifest.json' not in entries:
    raise UserError(f'{export_dir}: exists and is not a jaisp-jax bundle ({len(entries)} '
                    'entries, no manifest.json); refusing to replace it (remove it or choose '
                    'another --export_dir)')


def write_bundle(export_dir: str, params, config: ml_collections.ConfigDict, registry,
                 step: int) -> str:
  """Writes a bundle of `params` (host or device arrays) atomically; returns its path.

  An existing bundle at `export_dir` is replaced; any other existing content is refused
  (`check_target`), never deleted.
  """
  export_dir = os.path.abspath(export_dir)
  check_target(export_dir)
  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  tmp = tempfile.mkdtemp(prefix='.export-tmp-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it 0700: a bundle is meant to be shared
  try:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, 'params'), host_params)
    ckptr.wait_until_finished()
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    with open(os.path.join(tmp, 'bands.json'), 'w') as f:
      json.dump(registry.to_dicts(), f, indent=2)
    with open(os.path.join(tmp, 'manifest.json'), 'w') as f:
      json.dump({'format_version': FORMAT_VERSION, 'variant': config.model.variant,
                 'step': int(step), 'n_params': jaisp.count_params(host_params)}, f, indent=2)
    if os.path.exists(export_dir):
      old = export_dir + '.old'
      shutil.rmtree(old, ignore_errors=True)
      os.replace(export_dir, old)
      os.replace(tmp, export_dir)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, export_dir)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return export_dir


def export(config: ml_collections.ConfigDict, workdir: str, export_dir: str) -> str:
  """Exports the latest checkpoint of `workdir` (its EMA target) to `export_dir`."""
  from jaisp_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):  # (the Checkpointer would
    raise UserError(f'{workdir}: no checkpoint to export; train first')  # create it)
  if os.path.abspath(export_dir) == os.path.abspath(workdir):
    raise UserError(f'--export_dir {export_dir} is the run directory itself; give another '
                    'folder (e.g. <workdir>/export)')
  check_target(export_dir)  # before the restore: a refused target costs nothing
  trainer = trainer_lib.Trainer(config)
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=1, keep=config.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise UserError(f'{workdir}: no checkpoint to export; train first')
  abstract, _ = trainer.abstract_state()
  state = ckpt.restore(abstract, None, step)
  ckpt.close()
  path = write_bundle(export_dir, state.ema_params, config, trainer.registry, step)
  if jax.process_index() == 0:
    print(f'exported step {step} ({config.model.variant}) to {path}', flush=True)
  return path
