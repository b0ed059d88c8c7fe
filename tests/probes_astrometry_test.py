"""Astrometry probe: classical baselines recover injected shifts; the probe has a known
right answer on toy representations (and fails, as it must, on a blind one)."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import simulate
from jaisp_jax.data import sky
from jaisp_jax.evaluate.probes import astrometry
from jaisp_jax.evaluate.probes import classical
from jaisp_jax.evaluate.probes import features
from jaisp_jax.evaluate.probes import synthetic

REG = bands_lib.default_registry()


def test_fourier_shift_matches_scipy_and_moves_the_centroid():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(2, 31, 33)).astype(np.float32)
  got = features.fourier_shift(a, np.array([0.3, -1.2]), np.array([-0.7, 0.25]))
  for k, (dx, dy) in enumerate([(0.3, -0.7), (-1.2, 0.25)]):
    want = np.fft.ifft2(ndimage.fourier_shift(np.fft.fft2(a[k]), (dy, dx))).real
    np.testing.assert_allclose(got[k], want, atol=1e-4)
  yy, xx = np.mgrid[:64, :64]
  star = np.exp(-((xx - 30.0)**2 + (yy - 33.0)**2) / (2 * 2.0**2)).astype(np.float32)
  moved = features.fourier_shift(star, 0.37, -0.21)
  assert np.sum(moved * xx) / moved.sum() == pytest.approx(30.37, abs=1e-3)
  assert np.sum(moved * yy) / moved.sum() == pytest.approx(32.79, abs=1e-3)


@pytest.fixture(scope='module')
def star_tile():
  """A simulated 64 px tile with a bright (mag 18) star injected at its centre."""
  star = sky.make_stars(31.3, 32.6, 18.0, 5800.0)
  tile = simulate.simulate_tile(3, 11, simulate.SimConfig(size=64), REG, extra_sources=star)
  return tile


@pytest.mark.parametrize('band', ['rubin_r', 'euclid_vis'])
def test_centroid_and_xcorr_recover_a_40_mas_shift(star_tile, band):
  b = REG[band]
  image = star_tile.images[b.instrument][b.index] / np.median(star_tile.rms[b.instrument][b.index])
  scale = b.pixel_scale
  shifted = features.fourier_shift(image, 40.0 / (1000 * scale), -25.0 / (1000 * scale))
  f = 2 if b.instrument == 'euclid' else 1
  x0, y0 = (31.3 + 0.5) * f - 0.5, (32.6 + 0.5) * f - 0.5
  sigma = 0.7 / 2.355 / scale if b.instrument == 'rubin' else 0.17 / 2.355 / scale
  xa, ya, oka = classical.windowed_centroids(image, [x0], [y0], sigma)
  xb, yb, okb = classical.windowed_centroids(shifted, [x0], [y0], sigma)
  assert oka[0] and okb[0]
  assert abs((xb[0] - xa[0]) * scale * 1000 - 40.0) < 5.0
  assert abs((yb[0] - ya[0]) * scale * 1000 + 25.0) < 5.0
  dx, dy = classical.xcorr_shift(shifted, image)
  assert abs(dx * scale * 1000 - 40.0) < 5.0
  assert abs(dy * scale * 1000 + 25.0) < 5.0


def test_centroid_baseline_recovers_known_band_offsets():
  """Bright isolated stars: windowed centroids give the injected offsets (< 10 mas),
  far better than the zero estimate (offsets up to 80 mas)."""
  field = synthetic.star_field(n_chips=4, snr_range=(300.0, 1000.0), seed=1)
  cfg = astrometry.AstrometryConfig(bands=('rubin_g',), train_fraction=0.5)
  base = astrometry.baselines(field, cfg)
  assert base['chip_level']['centroid']['rms_mas'] < 10.0
  assert base['chip_level']['xcorr']['rms_mas'] < 10.0
  assert base['chip_level']['zero']['rms_mas'] > 30.0
  assert base['per_source']['centroid']['all']['median_mas'] < 10.0
  # Bright stars: the noise floor of the per-chip centroid is far below the offsets.
  assert base['chip_level']['centroid']['formal_rms_mas'] < 0.3 * base['chip_level']['zero'][
      'rms_mas']


SMALL = astrometry.AstrometryConfig(
    bands=('rubin_g',), n_train_shifts=3, register_half_mas=100.0, register_step_mas=50.0,
    register_fine_mas=12.5, register_max_chips=3, sensitivity_bands=('rubin_r',),
    sensitivity_max_chips=3, train_fraction=0.6)


@pytest.fixture(scope='module')
def field():
  # Bright stars: the toy tokens then carry the offsets almost without noise.
  return synthetic.star_field(n_chips=12, n_stars=8, snr_range=(100.0, 1000.0), seed=2)


def test_head_learns_offsets_from_informative_tokens(field):
  res = astrometry.run(synthetic.MomentModel(), field, SMALL)
  zero = astrometry.baselines(field, SMALL)['per_source']['zero']['all']['rms_mas']
  assert res['per_source']['head']['all']['rms_mas'] < 0.4 * zero
  # The same head on shuffled labels cannot beat doing nothing by much.
  assert res['per_source']['head_shuffled']['all']['rms_mas'] > 0.8 * zero
  # The head moved off its initial (constant) state and its predictions vary.
  assert res['head_fit']['head']['best_step'] > 0
  assert res['head_fit']['head']['prediction_std_mas'] > 10.0
  assert res['tile_level']['head']['rms_mas'] < res['tile_level']['head_shuffled']['rms_mas']


def test_blind_representation_is_at_chance_and_flat(field):
  res = astrometry.run(synthetic.BlindModel(), field, dataclasses.replace(
      SMALL, register_max_chips=1))
  base = astrometry.baselines(field, SMALL)
  zero = base['per_source']['zero']['all']['rms_mas']
  assert res['per_source']['head']['all']['rms_mas'] > 0.8 * zero
  # Tokens that ignore the image: whatever step early stopping keeps, the predictions
  # cannot depend on the source (constant up to float noise).
  assert res['head_fit']['head']['prediction_std_mas'] < 1.0
  sens = res['shift_sensitivity']
  assert sens['drop_at_100mas'] == pytest.approx(0.0, abs=1e-6)
  pixels = astrometry.shift_sensitivity(None, field, SMALL)
  assert pixels['drop_at_100mas'] > 0.01
  assert pixels['cosine'][0] == pytest.approx(1.0, abs=1e-6)


def test_registration_without_a_head_recovers_offsets(field):
  res = astrometry.run(synthetic.PixelModel(), field, SMALL)
  reg = res['chip_level']['register']
  assert reg['n'] >= 3
  assert reg['rms_mas'] < 0.3 * reg['zero_same_chips']['rms_mas']
  sens = res['shift_sensitivity']
  # Raw pixels are the most shift-sensitive representation: the curve falls with shift.
  assert np.all(np.diff(sens['cosine']) < 0)
