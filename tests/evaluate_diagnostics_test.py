"""Collapse diagnostics against values computed by hand on constructed embeddings."""

import numpy as np
import pytest

from jaisp_jax.evaluate import diagnostics


def _isotropic(n=4000, d=16, seed=0):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def test_effective_dim_collapsed_isotropic_and_k_directions():
  rng = np.random.default_rng(1)
  line = rng.normal(size=(500, 1)) * rng.normal(size=(1, 16))          # rank one
  assert diagnostics.effective_dim(line) == pytest.approx(1.0, abs=1e-3)
  assert diagnostics.effective_dim(_isotropic()) == pytest.approx(16.0, rel=0.05)
  # Three orthogonal directions of equal variance: participation ratio 3.
  basis = np.linalg.qr(rng.normal(size=(16, 3)))[0].T                  # (3, 16)
  signs = np.array([[1, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], float)
  z = np.repeat(signs, 50, axis=0) @ basis                              # (200, 16)
  assert diagnostics.effective_dim(z) == pytest.approx(3.0, rel=1e-3)


def test_rankme_bounds():
  rng = np.random.default_rng(2)
  line = rng.normal(size=(300, 1)) * rng.normal(size=(1, 32))
  assert diagnostics.rankme(line) == pytest.approx(1.0, abs=0.05)
  assert diagnostics.rankme(_isotropic(4000, 32)) > 0.9 * 32


def test_variance_stats_by_hand():
  z = np.array([[0., 0.], [2., 1.], [4., 2.]])      # per-dim unbiased variance 4 and 1
  s = diagnostics.variance_stats(z, gamma=1.0, eps=0.0)
  assert s['var_min'] == pytest.approx(1.0)
  assert s['var_mean'] == pytest.approx(2.5)
  assert s['var_loss'] == pytest.approx(0.0)         # std 2 and 1: hinge inactive
  const = np.ones((10, 4))
  s = diagnostics.variance_stats(const, gamma=1.0, eps=1e-4)
  assert s['var_min'] == 0.0
  assert s['var_loss'] == pytest.approx(1.0 - 0.01)


def test_token_similarity_weights_select_tokens():
  a = np.zeros((1, 2, 3))
  a[0, 0] = [1, 0, 0]
  a[0, 1] = [0, 1, 0]
  b = np.zeros((1, 2, 3))
  b[0, 0] = [1, 0, 0]      # same direction: cos 1
  b[0, 1] = [0, -1, 0]     # opposite: cos -1
  assert diagnostics.token_similarity(a, b) == pytest.approx(0.0)
  assert diagnostics.token_similarity(a, b, np.array([[1.0, 0.0]])) == pytest.approx(1.0)
  assert diagnostics.token_similarity(a, b, np.array([[0.0, 2.0]])) == pytest.approx(-1.0)
  assert diagnostics.token_similarity(a, b, np.zeros((1, 2))) == 0.0


def test_token_similarity_pair_shuffled_control():
  rng = np.random.default_rng(3)
  t = rng.normal(size=(20, 4, 8))
  w = np.ones((20, 4))
  out = diagnostics.token_similarity_pair(t, t, w, w)
  assert out['token_similarity'] == pytest.approx(1.0)
  assert abs(out['token_similarity_shuffled']) < 0.2   # other chips: unrelated tokens


def test_cross_band_similarity_constructed():
  eye = np.eye(6)                                      # 6 chips, orthogonal embeddings
  same = {'a': eye, 'b': eye}
  out = diagnostics.cross_band_similarity(same, ['a', 'b'])
  np.testing.assert_allclose(out['matrix'], np.ones((2, 2)))
  np.testing.assert_allclose(out['contrast'], np.ones((2, 2)))   # other chips: cos 0
  collapsed = {'a': np.ones((6, 3)), 'b': np.ones((6, 3))}
  out = diagnostics.cross_band_similarity(collapsed, ['a', 'b'])
  np.testing.assert_allclose(out['matrix'], np.ones((2, 2)))
  np.testing.assert_allclose(out['contrast'], np.zeros((2, 2)), atol=1e-12)
  # Invalid chips are left out; fewer than two valid chips gives NaN.
  valid = {'a': np.array([1, 1, 0, 0, 0, 0], bool), 'b': np.array([0, 1, 1, 0, 0, 0], bool)}
  out = diagnostics.cross_band_similarity(same, ['a', 'b'], valid)
  assert np.isnan(out['matrix'][0][1]) and out['matrix'][0][0] == pytest.approx(1.0)


def test_activation_weight_correlation():
  rng = np.random.default_rng(4)
  w = rng.uniform(size=(4, 16))
  direction = rng.normal(size=8)
  direction /= np.linalg.norm(direction)
  tokens = (1.0 + 3.0 * w)[..., None] * direction                  # norm = 1 + 3 w
  out = diagnostics.activation_weight_correlation(tokens, w)
  assert out['pearson'] == pytest.approx(1.0)
  assert out['spearman'] == pytest.approx(1.0)
  assert out['n_tokens'] == 64
  # LayerNorm-like tokens: constant norm, but the deviation from the mean token (mostly
  # sky, as in real chips) grows with the weight as a source direction is mixed in:
  # only the centred measure sees it.
  u = rng.uniform(size=(40, 50))
  w = np.where(rng.uniform(size=u.shape) < 0.9, 0.02 * u, u)
  sky, src = np.eye(8)[0], np.eye(8)[1]
  mixed = (np.cos(w)[..., None] * sky + np.sin(w)[..., None] * src) * np.sqrt(8)
  out = diagnostics.activation_weight_correlation(mixed, w)
  assert out['pearson'] == 0.0 and out['pearson_centred'] > 0.9
  noise = diagnostics.activation_weight_correlation(rng.normal(size=(40, 50, 8)),
                                                    rng.uniform(size=(40, 50)))
  assert abs(noise['pearson']) < 0.1


def test_per_band_collapse_flags_constant_band():
  z = {'good': _isotropic(200, 16), 'dead': np.ones((200, 16)) + 1e-5 *
       np.random.default_rng(5).normal(size=(200, 16))}
  out = diagnostics.per_band_collapse(z)
  assert not out['good']['collapsed']
  assert out['dead']['collapsed']
  assert out['good']['effective_dim'] > 12


def test_numpy_ranks_equal_the_training_metrics():
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jaisp_jax.objectives import vicreg  # pylint: disable=import-outside-toplevel
  z = np.random.default_rng(6).normal(size=(64, 12)) * np.linspace(0.1, 3, 12)
  assert diagnostics.effective_dim(z) == pytest.approx(
      float(vicreg.effective_dim(jnp.asarray(z, jnp.float32))), rel=1e-4)
  assert diagnostics.rankme(z) == pytest.approx(float(vicreg.rankme(jnp.asarray(z, jnp.float32))),
                                                rel=1e-4)
