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
