"""VICReg terms vs NumPy, global statistics under sharding, collapse diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaisp_jax.objectives import vicreg


def _np_vicreg(z, var_w=1.0, cov_w=0.04, gamma=1.0, eps=1e-4):
  z = np.asarray(z, np.float64)
  b, d = z.shape
  var = z.var(axis=0, ddof=1)
  v = np.mean(np.maximum(0.0, gamma - np.sqrt(var + eps)))
  zc = z - z.mean(0)
  cov = zc.T @ zc / (b - 1)
  c = (np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / d
  return var_w * v + cov_w * c, v, c, var.min()


def test_matches_numpy_on_random_inputs():
  rng = np.random.default_rng(0)
  for b, d, scale in [(16, 8, 0.3), (32, 24, 2.0), (5, 3, 1.0)]:
    z = rng.normal(size=(b, d)) * scale + rng.normal(size=(1, d))
    z[:, 0] *= 0.01  # one nearly dead dimension
    loss, m = vicreg.vicreg_loss(jnp.asarray(z, jnp.float32), 1.0, 0.04)
    want, v, c, vmin = _np_vicreg(z)
    np.testing.assert_allclose(loss, want, rtol=1e-4)
    np.testing.assert_allclose(m['var_loss'], v, rtol=1e-4)
    np.testing.assert_allclose(m['cov_loss'], c, rtol=1e-4)
    np.testing.assert_allclose(m['var_min'], vmin, rtol=1e-3)
    np.testing.assert_allclose(vicreg.variance_loss(jnp.asarray(z, jnp.float32)), v,
                               rtol=1e-4)
    np.testing.assert_allclose(vicreg.covariance_loss(jnp.asarray(z, jnp.float32)), c,
                               rtol=1e-4)


def test_weights_scale_the_terms():
  z = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float32)
  _, m = vicreg.vicreg_loss(z)
  loss, _ = vicreg.vicreg_loss(z, var_weight=2.0, cov_weight=0.5)
  np.testing.assert_allclose(loss, 2.0 * m['var_loss'] + 0.5 * m['cov_loss'], rtol=1e-6)


def test_identical_on_one_device_and_with_batch_sharded_over_eight():
  devices = jax.devices()[:8]
  assert len(devices) == 8
  z = jnp.asarray(np.random.default_rng(2).normal(size=(32, 16)), jnp.float32)

  def f(z):
    loss, m = vicreg.vicreg_loss(z)
    return loss, m, vicreg.rankme(z)

  with jax.default_device(jax.devices()[0]):
    want = jax.jit(f)(z)
  mesh = Mesh(np.array(devices), ('data',))
  zs = jax.device_put(z, NamedSharding(mesh, P('data')))
  assert len(zs.sharding.device_set) == 8
  got = jax.jit(f)(zs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               got, want)
  # A per-device (4-sample) statistic would differ: the check is meaningful.
  local, _ = vicreg.vicreg_loss(z[:4])
  assert abs(float(local) - float(want[0])) > 1e-3


def test_effective_dim_and_rankme():
  rng = np.random.default_rng(3)
  iso = jnp.asarray(rng.normal(size=(4000, 8)), jnp.float32)
  line = jnp.asarray(rng.normal(size=(500, 1)) * rng.normal(size=(1, 8)), jnp.float32)
  two = jnp.asarray(np.concatenate([rng.normal(size=(4000, 2)), np.zeros((4000, 6))], 1),
                    jnp.float32)
  np.testing.assert_allclose(vicreg.effective_dim(iso), 8.0, rtol=0.05)
  np.testing.assert_allclose(vicreg.effective_dim(line), 1.0, rtol=1e-4)
  np.testing.assert_allclose(vicreg.effective_dim(two), 2.0, rtol=0.05)
  # Participation ratio = (sum l)^2 / sum l^2 of the covariance eigenvalues.
  z = rng.normal(size=(50, 6)) * np.arange(1, 7)
  lam = np.linalg.eigvalsh(np.cov(z, rowvar=False))
  np.testing.assert_allclose(vicreg.effective_dim(jnp.asarray(z, jnp.float32)),
                             lam.sum() ** 2 / np.sum(lam**2), rtol=1e-4)
  # RankMe vs NumPy SVD.
  s = np.linalg.svd(z, compute_uv=False)
  p = s / s.sum() + 1e-7
  np.testing.assert_allclose(vicreg.rankme(jnp.asarray(z, jnp.float32)),
                             np.exp(-np.sum(p * np.log(p))), rtol=1e-4)
  np.testing.assert_allclose(vicreg.rankme(line), 1.0, atol=1e-3)
  assert float(vicreg.effective_dim(jnp.ones((5, 3)))) == 0.0


def test_weighted_vicreg_reduces_to_vicreg_and_ignores_zero_weights():
  rng = np.random.default_rng(4)
  z = rng.normal(size=(24, 6)) * np.arange(1, 7) * 0.3 + 2.0
  zj = jnp.asarray(z, jnp.float32)
  want, wm = vicreg.vicreg_loss(zj, 1.0, 0.04)
  got, gm = vicreg.weighted_vicreg_loss(zj, jnp.ones(24), 1.0, 0.04)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4), gm, wm)
  # Rows of weight 0 (sky tokens) change nothing, whatever they hold; the weights'
  # overall scale does not matter either (reliability weights).
  junk = jnp.asarray(np.concatenate([z, rng.normal(size=(10, 6)) * 50.0]), jnp.float32)
  w = jnp.concatenate([jnp.full(24, 0.3), jnp.zeros(10)])
  got2, _ = vicreg.weighted_vicreg_loss(junk, w, 1.0, 0.04)
  np.testing.assert_allclose(got2, want, rtol=1e-5)
  # Non-uniform weights vs NumPy's weighted covariance (aweights: the same normalisation).
  wr = rng.random(24) + 0.1
  cov = np.cov(z, rowvar=False, aweights=wr)
  v = np.mean(np.maximum(0.0, 1.0 - np.sqrt(np.diag(cov) + 1e-4)))
  c = (np.sum(cov**2) - np.sum(np.diag(cov) ** 2)) / 6
  got3, m3 = vicreg.weighted_vicreg_loss(zj, jnp.asarray(wr, jnp.float32), 2.0, 0.5)
  np.testing.assert_allclose(got3, 2.0 * v + 0.5 * c, rtol=1e-4)
  np.testing.assert_allclose(m3['var_min'], np.diag(cov).min(), rtol=1e-4)
  # No gradient flows into the weights.
  g = jax.grad(lambda w: vicreg.weighted_vicreg_loss(zj, w)[0])(jnp.asarray(wr, jnp.float32))
  assert float(jnp.abs(g).max()) == 0.0


def test_invariance_loss():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
  np.testing.assert_allclose(vicreg.invariance_loss(jnp.asarray(a), jnp.asarray(b)),
                             np.mean((a - b) ** 2), rtol=1e-5)
  assert float(vicreg.invariance_loss(jnp.asarray(a), jnp.asarray(a))) == 0.0
