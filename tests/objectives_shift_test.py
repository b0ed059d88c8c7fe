"""Sub-pixel shift regression loss (mas, information-weighted, Huber)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax.objectives import shift


def test_matches_formula_per_sample_and_per_token():
  rng = np.random.default_rng(0)
  for lead in [(6,), (3, 5)]:
    true = rng.uniform(-200, 200, size=lead + (2,)).astype(np.float32)
    pred = true + rng.normal(size=lead + (2,)).astype(np.float32) * 150
    w = rng.random(lead).astype(np.float32)
    loss, m = shift.shift_loss(pred, true, w, scale_mas=100.0)
    e = (pred - true) / 100.0
    h = np.where(np.abs(e) <= 1, 0.5 * e**2, np.abs(e) - 0.5).sum(-1)
    np.testing.assert_allclose(loss, np.sum(w * h) / w.sum(), rtol=1e-5)
    rmse = np.sqrt(np.sum(w * ((pred - true) ** 2).sum(-1)) / w.sum())
    np.testing.assert_allclose(m['shift_rmse_mas'], rmse, rtol=1e-5)


def test_sky_samples_do_not_count_and_zero_weights_are_safe():
  true = jnp.array([[10.0, -20.0], [50.0, 50.0]])
  pred = jnp.array([[12.0, -20.0], [900.0, -900.0]])  # second sample is empty sky
  loss, m = shift.shift_loss(pred, true, jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(m['shift_rmse_mas'], 2.0, rtol=1e-6)
  loss0, _ = shift.shift_loss(pred, true, jnp.zeros(2))
  assert float(loss0) == 0.0
  g = jax.grad(lambda p: shift.shift_loss(p, true, jnp.array([1.0, 0.0]))[0])(pred)
  assert np.all(np.asarray(g[1]) == 0) and np.any(np.asarray(g[0]) != 0)
  gt = jax.grad(lambda t: shift.shift_loss(pred, t, jnp.ones(2))[0])(true)
  assert np.all(np.asarray(gt) == 0)
