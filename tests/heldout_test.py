"""Held-out data: truth positions land on the sources (sub-pixel, every instrument, with
the per-band offsets), from the simulator in memory and from a built TFDS dataset."""

import os

import numpy as np
import pytest
from scipy import ndimage

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import tfds_builder
from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate.probes import classical
from jaisp_jax.train import config as config_lib

REG = bands_lib.default_registry()


def smoke_config(data_dir=''):
  """configs/jepa.py:smoke (the same skeleton and size preset)."""
  c = config_lib.sized(config_lib.base_config(), 'smoke')
  c.data.data_dir = data_dir
  return c


@pytest.fixture(scope='module')
def simulated():
  return heldout_lib.load_heldout(smoke_config(), max_chips=6, size=64, chip_px=64)


def bright_isolated(h, band, snr=15.0, isolation_arcsec=1.0):
  tr = h.truth
  b = h.band_index(band)
  isolation_px = isolation_arcsec / h.pixel_scale(band)
  rows = []
  for s in np.flatnonzero(tr.in_chip & (tr.snr[:, b] > snr)):
    others = (tr.chip == tr.chip[s]) & (tr.snr[:, b] > 1.0)
    others[s] = False
    d = np.hypot(tr.x[others, b] - tr.x[s, b], tr.y[others, b] - tr.y[s, b])
    size = h.view(band)[0].shape[-1]
    inner = 6 <= tr.x[s, b] <= size - 7 and 6 <= tr.y[s, b] <= size - 7
    if inner and not np.any(d < isolation_px):
      rows.append(s)
  return np.array(rows, int)


def check_truth_on_sources(h, band):
  """Bright isolated sources: the peak of the PSF-smoothed image is within 1 px of the
  truth position, and windowed centroids scatter around it without bias (a convention
  error of a fraction of a pixel would show as a common offset)."""
  tr = h.truth
  b = h.band_index(band)
  rows = bright_isolated(h, band)
  assert len(rows) >= 2, f'too few bright isolated sources in {band}'
  image, _, _ = h.view(band)
  errors = []
  for s in rows:
    k, x, y = tr.chip[s], tr.x[s, b], tr.y[s, b]
    sigma = tr.psf_fwhm_arcsec[k, b] / 2.355 / h.pixel_scale(band)
    smooth = ndimage.gaussian_filter(image[k], sigma)
    ix, iy = int(round(x)), int(round(y))
    win = smooth[iy - 3:iy + 4, ix - 3:ix + 4]
    py, px = np.unravel_index(np.argmax(win), win.shape)
    assert abs(px - 3 + ix - x) <= 1.0 and abs(py - 3 + iy - y) <= 1.0
    cx, cy, ok = classical.windowed_centroids(image[k], [x], [y], sigma)
    if ok[0]:
      errors.append((cx[0] - x, cy[0] - y))
  errors = np.array(errors)
  assert len(errors) >= 4
  assert np.all(np.abs(np.median(errors, axis=0)) < 0.15), errors
  assert np.median(np.hypot(*errors.T)) < 0.4, errors


@pytest.mark.parametrize('band', ['rubin_r', 'euclid_vis'])
def test_simulated_truth_is_on_the_sources(simulated, band):
  assert simulated.truth is not None and simulated.n_chips == 6
  check_truth_on_sources(simulated, band)


def test_band_positions_carry_the_astrometric_offsets(simulated):
  tr = simulated.truth
  r, g, vis = (simulated.band_index(b) for b in ('rubin_r', 'rubin_g', 'euclid_vis'))
  off = tr.offset_mas[tr.chip]  # (S, n_bands, 2)
  np.testing.assert_allclose((tr.x[:, g] - tr.x[:, r]) * 200.0, off[:, g, 0] - off[:, r, 0],
                             atol=1e-6)
  # Euclid pixels: x_euclid = 2 x_rubin + 0.5 at the WCS position.
  wcs_r = tr.x[:, r] - off[:, r, 0] / 200.0
  wcs_vis = tr.x[:, vis] - off[:, vis, 0] / 100.0
  np.testing.assert_allclose(wcs_vis, 2 * wcs_r + 0.5, atol=1e-6)
  assert np.all(np.abs(tr.offset_mas) < 200) and np.any(np.abs(tr.offset_mas) > 5)


def test_units_subset_and_split(simulated):
  img_n, rms_n, _ = simulated.view('rubin_r', 'noise')
  img_p, rms_p, _ = simulated.view('rubin_r', 'physical')
  np.testing.assert_allclose(np.median(rms_n, axis=(1, 2)), 1.0, rtol=1e-5)
  scale = simulated.rms_scale['rubin'][:, REG['rubin_r'].index][:, None, None]
  np.testing.assert_allclose(img_n * scale, img_p, rtol=1e-5, atol=1e-6)
  train, test = simulated.split(0.5, seed=0)
  assert not set(train.region) & set(test.region)
  assert train.n_chips + test.n_chips == simulated.n_chips
  sub = simulated.subset([2, 0])
  k = sub.truth.chip == 0  # chip 2 of the original
  np.testing.assert_array_equal(sub.truth.row[k],
                                simulated.truth.row[simulated.truth.chip == 2])
  np.testing.assert_array_equal(sub.view('rubin_g')[0][0], simulated.view('rubin_g')[0][2])
  np.testing.assert_array_equal(sub.truth.offset_mas[0], simulated.truth.offset_mas[2])


def test_tfds_dataset_with_and_without_truth(tmp_path):
  field = tfds_builder.simulate_field(tmp_path / 'sim', 'probe', 2, 5, 64, REG, workers=1)
  tfds_builder.build_dataset(field.dirs, tmp_path / 'tfds', 'probe', REG,
                             tfds_builder.ChipOptions(chip_px=64, val_fraction=0.5),
                             truth=field.truth, wcs=field.wcs, extra_files=field.extra_files,
                             progress=False)
  c = smoke_config(str(tmp_path / 'tfds'))
  c.data.name = 'probe'
  h = heldout_lib.load_heldout(c, max_chips=4)
  assert h.truth is not None and h.n_chips == 1 and h.pixel_unit == 'nJy per pixel'
  # The same field simulated in memory (same seed and tiles): identical pixels and truth.
  mem = heldout_lib.simulated_heldout(REG, n_tiles=2, seed=5, size=64, chip_px=64)
  k = list(mem.tile).index(h.tile[0])
  ref = mem.subset([k])
  for band in ('rubin_r', 'euclid_h'):
    np.testing.assert_array_equal(h.view(band, 'physical')[0], ref.view(band, 'physical')[0])
  np.testing.assert_array_equal(h.truth.type, ref.truth.type)
  np.testing.assert_allclose(h.truth.x, ref.truth.x, atol=1e-9)
  np.testing.assert_allclose(h.truth.snr, ref.truth.snr, rtol=1e-6)
  np.testing.assert_allclose(h.truth.offset_mas, ref.truth.offset_mas)
  # A dataset without its truth files (e.g. built from user tiles): truth None, a note.
  folder = tmp_path / 'tfds' / 'probe' / tfds_builder.VERSION
  for name in os.listdir(folder):
    if name.startswith(('truth_', 'tiles_')):
      os.remove(folder / name)
  bare = heldout_lib.load_heldout(c, max_chips=4)
  assert bare.truth is None and 'no truth' in bare.notes[0]
  np.testing.assert_array_equal(bare.view('rubin_r')[0], h.view('rubin_r')[0])
