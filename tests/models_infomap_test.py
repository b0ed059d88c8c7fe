"""Information map: high on sources, ~0 on sky, exactly 0 where masked."""

import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import infomap

REG = bands.default_registry()


def _sky(seed, n, size):
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(n, size, size)).astype(np.float32)
  return image, np.ones_like(image), np.ones_like(image)


def test_pure_noise_gets_near_zero_weight_at_the_expected_false_positive_rate():
  image, rms, mask = _sky(0, 8, 128)
  pw, tw = infomap.information_map(image, rms, mask, stride=16)
  assert tw.shape == (8, 64)
  assert float(tw.mean()) < 0.02
  # With unit-variance Sobel components, |grad| of white noise is Rayleigh(1):
  # P(> 3.5) = exp(-3.5^2 / 2) = 2.2e-3; |S/N| > 3.5 adds 4.7e-4. A mis-scaled Sobel
  # (e.g. unnormalised, std sqrt(12)) would flag most of the image.
  frac = float((pw > 0.5).mean())
  assert 1.5e-3 < frac < 4.5e-3, frac


def test_sources_get_high_weight_and_the_noise_scale_does_not_matter():
  image, rms, mask = _sky(1, 2, 64)
  yy, xx = np.mgrid[0:64, 0:64]
  src = 50.0 * np.exp(-((yy - 20) ** 2 + (xx - 40) ** 2) / (2 * 2.0 ** 2))
  image = image + src.astype(np.float32)
  pw, tw = infomap.information_map(image, rms, mask, stride=8)
  assert float(pw[0, 20, 40]) > 0.99
  tw = tw.reshape(2, 8, 8)
  assert float(tw[0, 2, 5]) > 0.3  # the token holding the source
  assert float(tw[0, 6, 1]) < 0.05  # a sky token
  # Weights depend on S/N only: scaling image and rms together changes nothing.
  pw2, _ = infomap.information_map(7.0 * image, 7.0 * rms, mask, stride=8)
  np.testing.assert_allclose(pw, pw2, atol=1e-5)


def test_masked_pixels_get_exactly_zero_and_mask_edges_are_not_sources():
  image, rms, mask = _sky(2, 1, 64)
  mask[0, :, 32:] = 0
  image, rms = image * mask, rms * mask
  pw = np.asarray(infomap.pixel_weights(image, rms, mask))
  assert (pw[0, :, 32:] == 0).all()
  # The zero-filled half would look like a strong edge to a naive Sobel filter.
  assert float(pw[0, :, 28:32].mean()) < 0.02
  # Not differentiable: the map is data, not part of the graph.
  g = jax.grad(lambda x: infomap.pixel_weights(x, rms, mask).sum())(jnp.asarray(image))
  assert float(jnp.abs(g).max()) == 0.0


def test_rubin_and_euclid_views_of_the_same_sky_agree_on_the_informative_tokens():
  pairs = batch_lib.synthetic_pairs_batch(3, REG, {'rubin-euclid': 4}, crop_arcsec=12.8)
  a, b = pairs['rubin-euclid']['a'], pairs['rubin-euclid']['b']
  _, wa = infomap.information_map(a['image'], a['rms'], a['mask'],
                                  REG.stride('rubin_r', 1.6))
  _, wb = infomap.information_map(b['image'], b['rms'], b['mask'],
                                  REG.stride('euclid_vis', 1.6))
  assert wa.shape == wb.shape == (4, 64)
  # Tokens that hold a source in one view hold it in the other.
  top_a = np.asarray(wa) > 0.2
  top_b = np.asarray(wb) > 0.2
  assert top_a.sum() > 0 and (top_a & top_b).sum() >= 0.7 * top_a.sum()
