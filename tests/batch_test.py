"""The synthetic batch generators follow the documented batch format."""

import numpy as np

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib


def test_pairs_batch_shapes_and_same_sky():
  reg = bands.default_registry()
  quotas = {'rubin-euclid': 4, 'rubin-rubin': 2, 'euclid-euclid': 2}
  b = batch_lib.synthetic_pairs_batch(0, reg, quotas, crop_arcsec=12.8)
  assert set(b) == set(quotas)
  re = b['rubin-euclid']
  assert re['a']['image'].shape == (4, 64, 64) and re['b']['image'].shape == (4, 128, 128)
  assert all(reg.bands[i].instrument == 'rubin' for i in re['a']['band'])
  assert all(reg.bands[i].instrument == 'euclid' for i in re['b']['band'])
  # Same sky: the brightest Rubin pixel maps to (about) the brightest Euclid pixel / 2.
  for i in range(4):
    ya, xa = np.unravel_index(np.argmax(re['a']['image'][i]), (64, 64))
    yb, xb = np.unravel_index(np.argmax(re['b']['image'][i]), (128, 128))
    assert abs(yb / 2 - ya) <= 2 and abs(xb / 2 - xa) <= 2


def test_chips_batch_has_every_band_in_order():
  reg = bands.default_registry()
  c = batch_lib.synthetic_chips_batch(1, reg, n=2, crop_arcsec=6.4)
  assert c['rubin']['image'].shape == (2, 6, 32, 32)
  assert c['euclid']['rms'].shape == (2, 4, 64, 64)
  assert c['euclid']['band_valid'].all() and c['rubin']['mask'].dtype == np.float32
