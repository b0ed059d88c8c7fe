"""Information-weighted token JEPA loss and token_similarity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaisp_jax.objectives import jepa


def _tokens(seed, b=2, n=6, d=8):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, n, d)), jnp.float32)


def _np_loss(pred, target, w):
  p = pred / np.linalg.norm(pred, axis=-1, keepdims=True)
  t = target / np.linalg.norm(target, axis=-1, keepdims=True)
  cos = np.sum(p * t, -1)
  return np.sum(w * (1 - cos)) / np.sum(w)


def test_zero_for_identical_online_and_target():
  x, y = _tokens(0), _tokens(1)
  w = jnp.abs(_tokens(2)[..., 0])
  loss, m = jepa.jepa_loss(x, y, y, x, w, w)  # pred_a == target_b, pred_b == target_a
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  np.testing.assert_allclose(m['token_similarity'], 1.0, atol=1e-6)
  loss_other, _ = jepa.jepa_loss(x, y, x, y, w, w)
  assert loss_other > 0.1


@pytest.mark.parametrize('mode', jepa.WEIGHT_MODES)
def test_matches_numpy_formula(mode):
  pa, pb, ta, tb = (_tokens(s) for s in range(4))
  rng = np.random.default_rng(9)
  wa, wb = rng.random((2, 2, 6)).astype(np.float32)
  loss, m = jepa.jepa_loss(pa, pb, ta, tb, jnp.asarray(wa), jnp.asarray(wb),
                           weight_mode=mode)
  combine = dict(max=np.maximum, min=np.minimum, mean=lambda a, b: (a + b) / 2)
  if mode == 'context':
    w_ab, w_ba = wa, wb
  else:
    w_ab = w_ba = combine[mode](wa, wb)
  want_ab = _np_loss(np.asarray(pa), np.asarray(tb), w_ab)
  want_ba = _np_loss(np.asarray(pb), np.asarray(ta), w_ba)
  np.testing.assert_allclose(m['jepa_ab'], want_ab, rtol=1e-5)
  np.testing.assert_allclose(m['jepa_ba'], want_ba, rtol=1e-5)
  np.testing.assert_allclose(loss, (want_ab + want_ba) / 2, rtol=1e-5)


@pytest.mark.parametrize('sky_weight', [0.0, 1e-9])
def test_pure_sky_tokens_do_not_change_the_loss(sky_weight):
  pa, pb, ta, tb = (_tokens(s) for s in range(4))
  sky = np.zeros((2, 6), bool)
  sky[:, 3:] = True  # last three tokens of every sample are sky in both views
  w = jnp.asarray(np.where(sky, sky_weight, 0.8), jnp.float32)
  loss, _ = jepa.jepa_loss(pa, pb, ta, tb, w, w)
  noise = _tokens(7) * 10.0
  s = jnp.asarray(sky)[..., None]
  changed = [jnp.where(s, x + noise, x) for x in (pa, pb, ta, tb)]
  loss2, _ = jepa.jepa_loss(*changed, w, w)
  np.testing.assert_allclose(loss2, loss, atol=1e-6)
  # ... while changing a source token does change it.
  loss3, _ = jepa.jepa_loss(pa.at[0, 0].add(5.0), pb, ta, tb, w, w)
  assert abs(float(loss3) - float(loss)) > 1e-3


def test_context_mode_keeps_dropout_in_one_direction_only():
  # Token 0 is a source seen only in A (a dropout in B); the rest is sky everywhere.
  pa, pb, ta, tb = (_tokens(s, b=1, n=3) for s in range(4))
  wa = jnp.array([[1.0, 0.0, 0.0]])
  wb = jnp.zeros((1, 3))
  _, m = jepa.jepa_loss(pa, pb, ta, tb, wa, wb, weight_mode='context')
  assert float(m['jepa_ab']) > 0  # A -> B learns that B shows nothing there
  assert float(m['jepa_ba']) == 0.0  # B (noise) is not asked to predict A's source
  _, m = jepa.jepa_loss(pa, pb, ta, tb, wa, wb, weight_mode='max')
  assert float(m['jepa_ba']) > 0
  _, m = jepa.jepa_loss(pa, pb, ta, tb, wa, wb, weight_mode='min')
  assert float(m['jepa_ab']) == float(m['jepa_ba']) == 0.0


def test_target_coverage_masks_the_direction_into_a_hole():
  pa, pb, ta, tb = (_tokens(s, b=1, n=2) for s in range(4))
  w = jnp.ones((1, 2))
  valid_b = jnp.array([[1.0, 0.0]])  # token 1 of B is unobserved
  _, m = jepa.jepa_loss(pa, pb, ta, tb, w, w, valid_b=valid_b)
  np.testing.assert_allclose(
      m['jepa_ab'], _np_loss(np.asarray(pa[:, :1]), np.asarray(tb[:, :1]),
                             np.ones((1, 1))), rtol=1e-5)


def test_gradient_flows_to_predictions_and_never_to_targets():
  pa, pb, ta, tb = (_tokens(s) for s in range(4))
  w = jnp.abs(_tokens(5)[..., 0])

  def f(pa, pb, ta, tb):
    return jepa.jepa_loss(pa, pb, ta, tb, w, w)[0]

  g = jax.grad(f, argnums=(0, 1, 2, 3))(pa, pb, ta, tb)
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0
  assert np.all(np.asarray(g[2]) == 0) and np.all(np.asarray(g[3]) == 0)


def test_zero_weight_sum_gives_zero_loss_and_finite_gradient():
  pa, pb, ta, tb = (_tokens(s) for s in range(4))
  w = jnp.zeros((2, 6))
  loss, m = jax.jit(lambda *a: jepa.jepa_loss(*a, w, w))(pa, pb, ta, tb)
  assert float(loss) == 0.0 and np.isfinite(float(m['token_similarity']))
  g = jax.grad(lambda p: jepa.jepa_loss(p, pb, ta, tb, w, w)[0])(pa)
  assert np.all(np.isfinite(np.asarray(g)))
  # Zero-norm embeddings do not produce NaN either.
  z = jnp.zeros_like(pa)
  loss, _ = jepa.jepa_loss(z, z, z, z, w + 1.0, w + 1.0)
  assert np.isfinite(float(loss))


def test_token_similarity():
  x = _tokens(0)
  np.testing.assert_allclose(jepa.token_similarity(x, 3.0 * x), 1.0, atol=1e-6)
  np.testing.assert_allclose(jepa.token_similarity(x, -x), -1.0, atol=1e-6)
  y = x.at[:, 0].multiply(-1.0)
  w = jnp.zeros((2, 6)).at[:, 0].set(1.0)
  np.testing.assert_allclose(jepa.token_similarity(x, y, w), -1.0, atol=1e-6)
  assert float(jepa.token_similarity(x, y, jnp.zeros((2, 6)))) == 0.0
