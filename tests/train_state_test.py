"""Optimizer, weight-decay mask, EMA schedule and update."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaisp_jax.train import state as state_lib


def optim_config():
  return ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=10, min_lr_ratio=0.01,
                                        clip_norm=1.0, b1=0.9, b2=0.999, eps=1e-8,
                                        weight_decay=0.05))


def test_schedule_warms_up_then_decays():
  sched = state_lib.learning_rate_schedule(optim_config(), total_steps=100)
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(100)) == pytest.approx(1e-5)
  assert float(sched(5)) < float(sched(10)) and float(sched(50)) < float(sched(10))


def test_decay_mask_skips_biases_norms_and_position_tables():
  params = {'dense': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'norm': {'scale': jnp.ones(4)},
            'stems': {'bias': jnp.ones((10, 4)), 'kernel': jnp.ones((10, 3, 3, 2, 4))},
            'pos_embed': jnp.ones((16, 4))}
  mask = state_lib.decay_mask(params)
  assert mask['dense']['kernel'] and mask['stems']['kernel']
  assert not mask['dense']['bias'] and not mask['norm']['scale']
  assert not mask['stems']['bias'] and not mask['pos_embed']


def test_weight_decay_only_moves_masked_leaves():
  cfg = optim_config()
  cfg.weight_decay = 0.5
  tx = state_lib.make_optimizer(cfg, total_steps=100)
  params = {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}
  opt = tx.init(params)
  zero = jax.tree.map(jnp.zeros_like, params)
  for _ in range(12):
    upd, opt = tx.update(zero, opt, params)
    params = optax.apply_updates(params, upd)
  assert float(params['kernel'][0, 0]) < 1.0
  assert float(params['bias'][0]) == 1.0


@pytest.mark.parametrize('schedule', ['linear', 'cosine'])
def test_ema_momentum_rises_to_end(schedule):
  cfg = ml_collections.ConfigDict(dict(momentum=0.996, momentum_end=1.0, schedule=schedule))
  ms = [float(state_lib.ema_momentum(cfg, jnp.asarray(s), 100)) for s in (0, 50, 100, 150)]
  assert ms[0] == pytest.approx(0.996) and ms[2] == pytest.approx(1.0) and ms[3] == ms[2]
  assert ms[0] < ms[1] < ms[2]


def test_ema_update_formula_and_fresh_state():
  params = {'w': jnp.full((2,), 2.0)}
  tx = state_lib.make_optimizer(optim_config(), 10)
  st = state_lib.create_state(params, tx, jax.random.key(0))
  np.testing.assert_array_equal(st.ema_params['w'], params['w'])
  new = state_lib.ema_update({'w': jnp.zeros(2)}, params, jnp.asarray(0.75))
  np.testing.assert_allclose(new['w'], 0.5)
