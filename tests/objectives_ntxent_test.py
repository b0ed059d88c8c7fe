"""Symmetric NT-Xent vs NumPy, global negatives under sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaisp_jax.objectives import ntxent


def _np_logsumexp(x, axis):
  mx = np.max(x, axis=axis, keepdims=True)
  return np.squeeze(mx, axis) + np.log(np.sum(np.exp(x - mx), axis=axis))


def _np_ntxent(a, b, t, intra):
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  n = len(a)
  if not intra:
    s = a @ b.T / t
    pos = np.diag(s)
    return 0.5 * (np.mean(_np_logsumexp(s, 1) - pos) + np.mean(_np_logsumexp(s, 0) - pos))
  # SimCLR: 2n samples, each with 2n - 1 candidates (self excluded).
  z = np.concatenate([a, b])
  s = z @ z.T / t
  np.fill_diagonal(s, -np.inf)
  partner = np.concatenate([np.arange(n, 2 * n), np.arange(n)])
  return np.mean(_np_logsumexp(s, 1) - s[np.arange(2 * n), partner])


@pytest.mark.parametrize('intra', [False, True])
@pytest.mark.parametrize('temperature', [0.07, 0.5])
def test_matches_numpy(intra, temperature):
  rng = np.random.default_rng(0)
  a = rng.normal(size=(12, 6))
  b = a + 0.5 * rng.normal(size=(12, 6))
  loss, m = ntxent.nt_xent(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                           temperature, intra_view_negatives=intra)
  np.testing.assert_allclose(loss, _np_ntxent(a, b, temperature, intra), rtol=1e-4)
  assert 0.0 <= float(m['retrieval_top1']) <= 1.0
  assert float(m['pos_similarity']) > float(m['neg_similarity'])


def test_symmetric_and_metrics():
  rng = np.random.default_rng(1)
  a = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  np.testing.assert_allclose(ntxent.nt_xent(a, b)[0], ntxent.nt_xent(b, a)[0], rtol=1e-6)
  _, m = ntxent.nt_xent(a, a)
  assert float(m['retrieval_top1']) == 1.0
  np.testing.assert_allclose(m['pos_similarity'], 1.0, atol=1e-6)


def test_negatives_span_the_global_batch_when_sharded():
  rng = np.random.default_rng(2)
  a = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  want = ntxent.nt_xent(a, b)[0]
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  sh = NamedSharding(mesh, P('data'))
  got = jax.jit(lambda x, y: ntxent.nt_xent(x, y)[0])(jax.device_put(a, sh),
                                                      jax.device_put(b, sh))
  np.testing.assert_allclose(got, want, rtol=1e-5)
  np.testing.assert_allclose(want, _np_ntxent(np.asarray(a), np.asarray(b), 0.1, False),
                             rtol=1e-4)
