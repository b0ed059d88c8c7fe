"""Masked-band reconstruction loss: formula, robustness, masked pixels ignored."""

import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax.objectives import reconstruction


def _data(seed=0, shape=(2, 1, 8, 8)):
  rng = np.random.default_rng(seed)
  rms = rng.uniform(0.5, 2.0, size=shape).astype(np.float32)
  image = rng.normal(size=shape).astype(np.float32) * rms
  pred = image + rng.normal(size=shape).astype(np.float32) * rms
  w = rng.random(shape).astype(np.float32)
  mask = (rng.random(shape) > 0.2).astype(np.float32)
  return pred, image, rms, mask, w


def test_matches_formula():
  pred, image, rms, mask, w = _data()
  loss, m = reconstruction.masked_band_loss(pred, image, rms, mask, w, delta=1.0,
                                            sky_weight=0.1)
  r = (pred - image) / rms
  rho = np.sqrt(r**2 + 1) - 1
  a = mask * (0.1 + w)
  np.testing.assert_allclose(loss, np.sum(a * rho) / np.sum(a), rtol=1e-5)
  np.testing.assert_allclose(m['recon_chi2'], np.sum(mask * r**2) / mask.sum(), rtol=1e-5)


def test_masked_pixels_are_ignored_even_with_garbage():
  pred, image, rms, mask, w = _data(1)
  loss, _ = reconstruction.masked_band_loss(pred, image, rms, mask, w)
  bad = mask == 0
  garbage = dict(pred=np.where(bad, 1e6, pred), image=np.where(bad, np.nan, image),
                 rms=np.where(bad, 0.0, rms), weights=np.where(bad, 50.0, w))
  loss2, _ = reconstruction.masked_band_loss(garbage['pred'], garbage['image'],
                                             garbage['rms'], mask, garbage['weights'])
  np.testing.assert_allclose(loss2, loss, rtol=1e-6)
  g = jax.grad(lambda p: reconstruction.masked_band_loss(
      p, garbage['image'], garbage['rms'], mask, garbage['weights'])[0])(
          jnp.asarray(garbage['pred']))
  g = np.asarray(g)
  assert np.all(np.isfinite(g)) and np.all(g[bad] == 0) and np.any(g[~bad] != 0)


def test_robust_to_an_outlier():
  pred, image, rms, mask, w = _data(2)
  mask = np.ones_like(mask)
  loss, _ = reconstruction.masked_band_loss(pred, image, rms, mask, w)
  for big in (1e2, 1e4):
    out = pred.copy()
    out[0, 0, 3, 3] = image[0, 0, 3, 3] + big * rms[0, 0, 3, 3]  # one wild pixel
    lo, _ = reconstruction.masked_band_loss(out, image, rms, mask, w)
    a = mask * (0.1 + w)
    # Charbonnier grows linearly: the pixel adds at most a * |r| / sum(a).
    assert float(lo) - float(loss) <= a[0, 0, 3, 3] * big / a.sum() + 1e-3
  # Its gradient is bounded by a / (rms sum a), unlike a squared loss.
  g = jax.grad(lambda p: reconstruction.masked_band_loss(p, image, rms, mask, w)[0])(
      jnp.asarray(out))
  bound = a[0, 0, 3, 3] / (rms[0, 0, 3, 3] * a.sum())
  assert abs(float(g[0, 0, 3, 3])) <= bound * (1 + 1e-5)


def test_zero_for_perfect_reconstruction_and_empty_mask():
  _, image, rms, mask, w = _data(3)
  loss, _ = reconstruction.masked_band_loss(image, image, rms, mask, w)
  assert float(loss) == 0.0
  loss, m = reconstruction.masked_band_loss(image + 1, image, rms, np.zeros_like(mask), w)
  assert float(loss) == 0.0 and float(m['recon_chi2']) == 0.0
  np.testing.assert_allclose(reconstruction.charbonnier(jnp.array([0.0, 1e3])),
                             [0.0, 1e3 - 1.0], rtol=1e-6)
