"""The generic train step: updates, EMA, skip on non-finite, sharded == unsharded."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaisp_jax.train import sharding
from jaisp_jax.train import state as state_lib
from jaisp_jax.train import step as step_lib


def configs():
  optim = ml_collections.ConfigDict(dict(lr=0.1, warmup_steps=0, min_lr_ratio=1.0, clip_norm=10.0,
                                         b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  ema = ml_collections.ConfigDict(dict(momentum=0.5, momentum_end=0.5, schedule='constant'))
  return optim, ema


def regression_loss(params, ema_params, batch, rng):
  """Plain least squares (the EMA parameters only follow, they do not enter the loss)."""
  del ema_params, rng
  loss = jnp.mean((batch['x'] @ params['w'] - batch['y']) ** 2)
  return loss, {'mse': loss}


def make(total=50):
  optim, ema = configs()
  tx = state_lib.make_optimizer(optim, total)
  sched = state_lib.learning_rate_schedule(optim, total)
  step = functools.partial(step_lib.train_step, loss_fn=regression_loss, tx=tx, schedule=sched,
                           ema=ema, total_steps=total)
  params = {'w': jnp.zeros((4, 1))}
  st = state_lib.create_state(params, tx, jax.random.key_data(jax.random.key(0)))
  return st, step


def data(n=32):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 4)).astype(np.float32)
  y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], np.float32)
  return {'x': x, 'y': y}


def test_loss_decreases_and_ema_follows():
  st, step = make()
  step = jax.jit(step, donate_argnums=0)
  b = data()
  losses = []
  for _ in range(30):
    st, m = step(st, b)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.05 * losses[0]
  assert int(st.step) == 30 and int(st.skipped) == 0
  # momentum 0.5 -> the target trails the online weights but moved away from 0.
  assert 0 < float(jnp.abs(st.ema_params['w']).sum()) < float(jnp.abs(st.params['w']).sum()) * 1.2
  assert float(m['learning_rate']) == np.float32(0.1)


def test_non_finite_batch_skips_the_update():
  st, step = make()
  step = jax.jit(step)
  b = data()
  st, _ = step(st, b)
  bad = dict(b, y=np.full_like(b['y'], np.nan))
  st2, m = step(st, bad)
  assert int(m['skipped']) == 1 and int(st2.skipped) == 1 and int(st2.step) == 2
  jax.tree.map(np.testing.assert_array_equal, (st2.params, st2.ema_params, st2.opt_state),
               (st.params, st.ema_params, st.opt_state))
  st3, m3 = step(st2, b)
  assert int(m3['skipped']) == 0 and int(st3.skipped) == 0


def test_trajectory_identical_on_one_and_eight_devices():
  b = data(32)
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(mesh=dict(data=-1, fsdp=1))),
                              jax.devices()[:n])
    st, step = make()
    st_sh = sharding.state_shardings(st, mesh)
    st = jax.device_put(st, st_sh)
    jstep = jax.jit(step, in_shardings=(st_sh, sharding.batch_sharding(mesh)),
                    out_shardings=(st_sh, sharding.replicated(mesh)), donate_argnums=0)
    gb = sharding.global_batch(b, mesh)
    losses = []
    for _ in range(20):
      st, m = jstep(st, gb)
      losses.append(float(m['loss']))
    results.append(np.asarray(losses))
  np.testing.assert_allclose(results[0], results[1], rtol=1e-5)
