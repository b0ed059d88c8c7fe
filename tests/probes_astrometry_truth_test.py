"""Astrometry probe against the simulator's truth: a KNOWN offset injected into one band
of simulated chips (Fourier shift + the truth updated to match) must come back out of
the classical baselines with the right sign and scale, within and across instruments."""

import dataclasses

import numpy as np
import pytest

from jaisp_jax import bands as bands_lib
from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate.probes import astrometry
from jaisp_jax.evaluate.probes import features

REG = bands_lib.default_registry()
INJECT_MAS = np.array([150.0, -100.0])  # (dx, dy) added to the band's offset


@pytest.fixture(scope='module')
def chips():
  """Three fresh simulated 64 px chips (one per tile) with their truth."""
  return heldout_lib.simulated_heldout(REG, n_tiles=3, seed=7, size=64, chip_px=64)


def inject(data: heldout_lib.HeldOut, band: str, offset_mas: np.ndarray) -> heldout_lib.HeldOut:
  """`data` with band `band` Fourier-shifted by offset_mas (+x, +y) and its truth moved."""
  b = REG[band]
  scale = b.pixel_scale
  dx, dy = offset_mas / (1000.0 * scale)
  images = {k: np.array(v) for k, v in data.images.items()}
  rms = {k: np.array(v) for k, v in data.rms.items()}
  im, rm = features.shift_view(images[b.instrument][:, b.index], rms[b.instrument][:, b.index],
                               dx, dy)
  images[b.instrument][:, b.index] = im * data.mask[b.instrument][:, b.index]
  rms[b.instrument][:, b.index] = rm
  j = REG.band_id(band)
  tr = data.truth
  x, y, off = tr.x.copy(), tr.y.copy(), tr.offset_mas.copy()
  x[:, j] += dx
  y[:, j] += dy
  off[:, j] += offset_mas
  truth = dataclasses.replace(tr, x=x, y=y, offset_mas=off)
  return dataclasses.replace(data, images=images, rms=rms, truth=truth)


@pytest.mark.parametrize('band', ['rubin_g', 'euclid_vis'])
def test_centroid_and_xcorr_recover_an_injected_offset(chips, band):
  cfg = astrometry.AstrometryConfig(bands=(band,), snr_min=20.0)
  before = astrometry.classical_estimates(chips, cfg)
  after = astrometry.classical_estimates(inject(chips, band, INJECT_MAS), cfg)
  # The truth bookkeeping moved by exactly the injection ...
  np.testing.assert_allclose(after['truth'] - before['truth'], INJECT_MAS[None].repeat(
      len(after['units']), 0), atol=1e-9)
  ok = ~before['centroid_failed'] & ~after['centroid_failed']
  assert ok.sum() >= 2
  # ... and so did the estimates: same sign, within 20% per chip (noise cancels in the
  # difference, so this checks the sign and the pixel-scale / mas conversions).
  for method in ('centroid', 'xcorr'):
    moved = (after[method] - before[method])[ok if method == 'centroid' else slice(None)]
    err = np.hypot(*(moved - INJECT_MAS).T)
    assert np.all(err < 0.2 * np.hypot(*INJECT_MAS)), (method, moved)


def test_baselines_beat_zero_on_an_injected_offset(chips):
  """With a 180 mas offset added to rubin_i the full baseline pipeline (split, source
  selection, per-chip combination) lands far closer to the truth than doing nothing."""
  data = inject(chips, 'rubin_i', INJECT_MAS)
  cfg = astrometry.AstrometryConfig(bands=('rubin_i',), train_fraction=0.34)
  base = astrometry.baselines(data, cfg)
  zero = base['chip_level']['zero']['rms_mas']
  assert zero > 150.0
  assert base['chip_level']['centroid']['rms_mas'] < 0.5 * zero
  assert base['tile_level']['centroid']['rms_mas'] < 0.5 * zero
