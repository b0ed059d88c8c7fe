"""DETR-JEPA matched-slot loss: matching recovers permutations, weights, gradients."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax.objectives import slots


def _slots(seed, b=3, q=6, d=8):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(b, q, d)), jnp.float32)


def _permute(x, perm):  # x[b, perm[b, q]]
  return jnp.take_along_axis(x, jnp.asarray(perm)[..., None], axis=1)


def test_permuted_identical_slots_match_exactly_and_give_zero_loss():
  rng = np.random.default_rng(0)
  x, y = _slots(1), _slots(2)
  perm = np.stack([rng.permutation(6) for _ in range(3)])
  sigma = jax.jit(slots.match_slots)(x, _permute(x, perm))
  # pred slot q matches target slot k with target[k] = x[perm[k]] = x[q].
  np.testing.assert_array_equal(np.take_along_axis(perm, np.asarray(sigma), axis=1),
                                np.tile(np.arange(6), (3, 1)))
  loss, m = jax.jit(slots.matched_slot_loss)(x, y, _permute(y, perm), _permute(x, perm))
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  np.testing.assert_allclose(m['matched_similarity'], 1.0, atol=1e-6)


def test_matching_minimises_total_cosine_cost():
  x, t = _slots(3), _slots(4)
  sigma = np.asarray(jax.jit(slots.match_slots)(x, t))
  xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  tn = t / jnp.linalg.norm(t, axis=-1, keepdims=True)
  cost = 1 - np.asarray(jnp.einsum('bqd,bkd->bqk', xn, tn))
  for b in range(3):
    best = min(sum(cost[b, q, p[q]] for q in range(6))
               for p in itertools.permutations(range(6)))
    np.testing.assert_allclose(cost[b, np.arange(6), sigma[b]].sum(), best, rtol=1e-5)


def test_objectness_weights_and_metrics():
  pa, pb, ta, tb = (_slots(s) for s in range(4))
  obj = np.zeros((3, 6), np.float32)
  obj[:, :2] = 1.0  # two active slots per view
  loss, m = jax.jit(slots.matched_slot_loss)(pa, pb, ta, tb, obj, obj)
  np.testing.assert_allclose(m['active_slots'], 2.0)
  # Context weights: only A's active slots count in A -> B.
  sigma = np.asarray(jax.jit(slots.match_slots)(pa, tb))
  matched = np.asarray(_permute(tb, sigma))
  cos = np.sum(np.asarray(pa) * matched, -1) / (
      np.linalg.norm(np.asarray(pa), axis=-1) * np.linalg.norm(matched, axis=-1))
  want = np.sum(obj * (1 - cos)) / obj.sum()
  np.testing.assert_allclose(m['slot_jepa_ab'], want, rtol=1e-5)
  assert np.isfinite(float(loss))


def test_gradient_reaches_predictions_not_targets_or_objectness():
  pa, pb, ta, tb = (_slots(s) for s in range(4))
  oa = jnp.full((3, 6), 0.7)
  ob = jnp.full((3, 6), 0.4)
  f = lambda *a: slots.matched_slot_loss(*a)[0]  # noqa: E731
  g = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3, 4, 5)))(pa, pb, ta, tb, oa, ob)
  assert float(jnp.abs(g[0]).sum()) > 0 and float(jnp.abs(g[1]).sum()) > 0
  for k in (2, 3, 4, 5):
    assert np.all(np.asarray(g[k]) == 0)


def test_objectness_targets_and_loss():
  attn = jnp.array([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])  # (1, 2, 3)
  w = jnp.array([[0.5, 0.0, 0.02]])
  target = slots.slot_information(attn, w, scale=0.5)
  np.testing.assert_allclose(target, [[1.0, 0.02]], rtol=1e-6)
  # BCE is minimised at sigmoid(logit) == target.
  logits = jnp.linspace(-6, 6, 241)
  t = 0.3
  vals = jax.vmap(lambda l: slots.objectness_loss(l[None, None], jnp.full((1, 1), t)))(
      logits)
  best = jax.nn.sigmoid(logits[jnp.argmin(vals)])
  np.testing.assert_allclose(best, t, atol=0.02)
