"""Masked-band reconstruction learns: on a simulated chip the loss falls within a few steps.

A real check that gradients reach every part of the reconstruction path (stems, trunk,
pixel decoder): an untrained model is optimised on one simulated batch and its
reconstruction loss must drop well below where it started.
"""

import jax
import numpy as np

from jaisp_jax.data import pipeline
from jaisp_jax.objectives import losses
from jaisp_jax.train import loop
from jaisp_jax.train import sharding

from train_loop_test import tiny_config


def test_masked_band_loss_decreases_on_a_simulated_chip():
  config = tiny_config(**{'model.variant': 'masked_band', 'model.recon.enabled': True,
                          'data.chips_per_batch': 4, 'optim.warmup_steps': 0,
                          'optim.lr': 1e-2})
  trainer = loop.Trainer(config, mesh=sharding.make_mesh(config, jax.devices()[:1]))
  batch = next(iter(pipeline.make_dataset(config.data, trainer.registry, data_parallel=1)))
  assert batch['chips']['euclid']['image'].std() > 0
  _, shardings = trainer.abstract_state()
  state = trainer.fresh_state(shardings)
  step = trainer.jitted_step(shardings)
  gb = sharding.global_batch(batch, trainer.mesh)
  loss_fn = jax.jit(losses.make_loss_fn(trainer.model, config, trainer.registry))
  # The hidden band is drawn per step; score with a fixed set of draws so the
  # before/after comparison is of the same task.
  keys = [jax.random.key(100 + i) for i in range(6)]

  def held_loss(st):
    return float(np.mean([loss_fn(st.params, st.ema_params, gb, k)[0] for k in keys]))

  before = held_loss(state)
  for _ in range(30):
    state, m = step(state, gb)
    assert np.isfinite(float(m['loss']))
  after = held_loss(state)
  # Charbonnier of pure unit noise is ~0.4 (the floor), so a 10% drop is most of what
  # 30 steps can give; a broken gradient path leaves the loss where it was.
  assert after < 0.9 * before, (before, after)
