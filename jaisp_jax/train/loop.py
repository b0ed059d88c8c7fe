"""train_and_evaluate(config, workdir): the training loop users run.

Order of events:
  1. mesh, model, loss, optimizer and data iterator from the config;
  2. the train state built abstractly (`jax.eval_shape`), its shardings derived from
     shapes, then either restored from the latest checkpoint in `workdir` (state and
     data iterator together) or materialised sharded with `jit(init, out_shardings)`;
  3. the jitted step (explicit in/out shardings, state donated) runs until
     `config.total_steps`; metrics are fetched one step late, averaged, written to
     TensorBoard and printed; every `config.eval.every` steps the EMA target is
     evaluated on held-out chips (retrieval vs chance, RankMe);
  4. checkpoints every `config.checkpoint_every` steps and at the end; SIGTERM
     (preemption) or a first Ctrl-C saves and exits cleanly (a second Ctrl-C stops at
     once); a run killed outright resumes from the
     last checkpoint and ends bitwise equal (on CPU) to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from clu import periodic_actions

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import ConfigError, UserError
from jaisp_jax.data import pipeline
from jaisp_jax.models import jaisp
from jaisp_jax.train import checkpoint as ckpt_lib
from jaisp_jax.train import online_eval
from jaisp_jax.train import reporting
from jaisp_jax.train import trainer as trainer_lib
from jaisp_jax.train.trainer import Trainer  # also reached as loop.Trainer by callers


class TrainingDiverged(UserError):
  """Too many consecutive non-finite steps: stopped, last good checkpoint kept."""


def _log(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


def band_usage_fn(registry: bands_lib.BandRegistry):
  """Jitted batch -> {'band_usage/<band>': share of the batch's views in that band}.

  Logged beside the loss so that a band the pairing neglects (or never finds valid)
  is visible in TensorBoard.
  """
  n = len(registry)

  def usage(batch):
    ids = [g[side]['band'].reshape(-1) for g in batch.get('pairs', {}).values()
           for side in ('a', 'b')]
    if not ids:
      return {}
    counts = jnp.bincount(jnp.concatenate(ids), length=n).astype(jnp.float32)
    share = counts / jnp.maximum(counts.sum(), 1.0)
    return {f'band_usage/{name}': share[i] for i, name in enumerate(registry.names)}

  return jax.jit(usage)


def _save_config(config: ml_collections.ConfigDict, workdir: str):
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  os.replace(tmp, path)


class _Preemption:
  """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop polls, so it can save
  before exiting. A second Ctrl-C interrupts at once (Python's default handler is back
  after the first)."""

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = None  # the name of the signal that asked to stop
    self._previous = {}

  def __enter__(self):
    for sig in self._SIGNALS:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. inside some test runners)
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    self.requested = signal.Signals(signum).name
    if signum == signal.SIGINT and signal.SIGINT in self._previous:
      signal.signal(signal.SIGINT, self._previous[signal.SIGINT])

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


# Fields that must be at least this (a zero log_every used to crash after the first
# step, a negative total_steps to "finish" at once).
_MINIMA = {'total_steps': 0, 'log_every': 1, 'checkpoint_every': 1, 'keep_checkpoints': 1,
           'max_consecutive_skips': 1, 'profile_steps': 0, 'eval.every': 0,
           'eval.max_chips': 1, 'data.pairs_per_batch': 1, 'data.chips_per_batch': 0}


def check_config(config: ml_collections.ConfigDict):
  """ConfigError naming the first field of `_MINIMA` below its minimum."""
  for field, low in _MINIMA.items():
    node = config
    for part in field.split('.'):
      node = node[part]
    if not isinstance(node, int) or node < low:
      raise ConfigError(f'config.{field} must be an integer >= {low}, got {node!r}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it has a checkpoint); returns final figures."""
  check_config(config)
  # The model is traced (abstract_state) and the eval bands checked before the workdir
  # is made: a config that cannot build its model leaves nothing behind, and one whose
  # held-out evaluation cannot run fails now, not after the training it would end.
  trainer = Trainer(config)
  registry = trainer.registry
  abstract, shardings = trainer.abstract_state()
  for band in (config.eval.query_band, config.eval.gallery_band):
    if band not in registry:
      raise ConfigError(f'config.eval: band {band!r} is not in the band registry '
                        f'({", ".join(registry.names)})')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:  # a regular file, or a path under one
    raise UserError(f'--workdir {workdir}: cannot use it as the run directory '
                    f'({e.strerror or e})') from None
  _log(f'jaisp-jax: variant={config.model.variant} devices={jax.device_count()} '
       f'processes={jax.process_count()} mesh={dict(trainer.mesh.shape)} workdir={workdir}')

  data_iter = pipeline.make_iterator(config.data, registry, trainer.batch_sharding)
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=config.checkpoint_every,
                               keep=config.keep_checkpoints, cleanup_tmp=True)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(abstract, data_iter, start)
    _log(f'resumed from {ckpt.directory}/{start}')
  else:
    state = trainer.fresh_state(shardings)
    start = 0
  # Only now: a resume refused for another architecture must not leave the run's
  # config.json describing parameters its checkpoints do not hold.
  _save_config(config, workdir)
  n_params = jaisp.count_params(state.params)
  _log(f'parameters: {n_params:,} trainable')

  train_step = trainer.jitted_step(shardings)
  usage = band_usage_fn(registry)
  writer = reporting.create_writer(workdir)
  if start == 0:
    writer.write_hparams({k: v for k, v in _flat(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})
  logger = reporting.MetricsLogger(writer, log_every=config.log_every,
                                   total_steps=config.total_steps, print_fn=_log)
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_secs=None, every_steps=config.log_every)]
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                          first_profile=10, logdir=workdir))

  eval_chips = None
  figures: dict[str, Any] = {}

  def run_eval(step: int, params) -> dict[str, float]:
    nonlocal eval_chips
    if eval_chips is None:
      eval_chips = online_eval.collect_chips(config, registry, trainer.batch_sharding)
    res = online_eval.evaluate(online_eval.params_embed_fn(params, config.model, registry),
                               eval_chips, config, registry)
    writer.write_scalars(step, {f'eval/{k}': v for k, v in res.items()})
    _log(f'eval @ {step}: retrieval top-1 {res["retrieval_top1"]:.3f} (chance '
         f'{res["chance_top1"]:.3f}, {int(res["n_chips"])} held-out chips), RankMe '
         f'{res["rankme"]:.1f}/{int(res["embed_dim"])}, effective dim {res["effective_dim"]:.1f}')
    warning = online_eval.collapse_warning(res, config.eval.collapse_rank_fraction)
    if warning:
      _log(warning)
    return res

  if start == 0 and config.eval.every > 0:
    figures['eval_init'] = run_eval(0, state.ema_params)

  step = start
  with _Preemption() as preempt:
    while step < config.total_steps:
      batch = next(data_iter)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        # Traced at the first call: a ValueError there is the config's (one line).
        with (trainer_lib.config_errors('the train step') if step == start
              else contextlib.nullcontext()):
          state, metrics = train_step(state, batch)
        metrics = {**metrics, **usage(batch)}
      step += 1
      host = logger.push(step, metrics)
      for hook in hooks:
        hook(step)
      if host is not None and host['consecutive_skips'] >= config.max_consecutive_skips:
        ckpt.wait()
        raise TrainingDiverged(
            f'{int(host["consecutive_skips"])} consecutive steps had a non-finite loss or '
            f'gradient (last at step {step - 1}); stopped. The last good checkpoint in '
            f'{ckpt.directory} is intact; lower config.optim.lr or check the data.')
      ckpt.save(step, state, data_iter)
      if config.eval.every > 0 and step % config.eval.every == 0 and step < config.total_steps:
        run_eval(step, state.ema_params)
      if preempt.requested:
        ckpt.save(step, state, data_iter, force=True)
        ckpt.close()
        logger.flush()
        _log(f'{preempt.requested}: saved a checkpoint at step {step} and stopped; run the '
             'same command to resume.')
        return figures

  final = logger.flush()
  writer.flush()  # an interrupted final evaluation loses none of the training's metrics
  ckpt.save(step, state, data_iter, force=True)
  ckpt.close()
  figures['train'] = final or logger.last
  figures['eval_final'] = run_eval(step, state.ema_params)
  writer.flush()
  writer.close()
  # Every process reports a digest of ITS copy of the replicated parameters, so a
  # multi-host run can be checked for agreement from the logs.
  print(f'process {jax.process_index()}/{jax.process_count()}: step {step} params digest '
        f'{params_digest(state.params)}', file=sys.stderr, flush=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'train_summary.json'), 'w') as f:
      json.dump(figures, f, indent=2, sort_keys=True)
  return figures


def params_digest(params: Any) -> str:
  """sha256 (16 hex) of this process's local copy of the fully replicated leaves."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    if leaf.is_fully_replicated:
      h.update(np.ascontiguousarray(np.asarray(leaf.addressable_data(0))).tobytes())
  return h.hexdigest()[:16]


def _flat(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out
