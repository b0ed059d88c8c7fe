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

from jaisp_jax.cli import UserError
from jaisp_jax.models import jaisp
from jaisp_jax.train import checkpoint as ckpt_lib

FORMAT_VERSION = 1


def write_bundle(export_dir: str, params, config: ml_collections.ConfigDict, registry,
                 step: int) -> str:
  """Writes a bundle of `params` (host or device arrays) atomically; returns its path."""
  export_dir = os.path.abspath(export_dir)
  parent = os.path.dirname(export_dir)
  os.makedirs(parent, exist_ok=True)
  host_params = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
  tmp = tempfile.mkdtemp(prefix='.export-tmp-', dir=parent)
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
