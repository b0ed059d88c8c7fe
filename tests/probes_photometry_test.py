"""Photometry probe: aperture colours of known stars; a head that reads colours from
informative tokens, and lands at the median-colour (chance) level otherwise."""

import numpy as np
import pytest

from jaisp_jax.evaluate.probes import photometry
from jaisp_jax.evaluate.probes import synthetic

CFG = photometry.PhotometryConfig(pairs=(('rubin_r', 'rubin_g'),), aperture_arcsec=1.0)


@pytest.fixture(scope='module')
def field():
  return synthetic.star_field(n_chips=12, n_stars=8, snr_range=(50.0, 1000.0),
                              colour_range=(-1.0, 1.0), seed=4)


def test_aperture_colours_of_known_stars(field):
  rows = photometry.select_sources(field, 'rubin_r', 'rubin_g', CFG)
  colour, ok = photometry.aperture_colours(field, 'rubin_r', 'rubin_g', rows, CFG)
  truth = field.truth.colour(field.band_index('rubin_r'), field.band_index('rubin_g'))[rows]
  assert ok.all() and len(rows) > 50
  # Same PSF in both bands: the aperture colour is the true colour up to noise.
  assert np.median(np.abs(colour - truth)) < 0.03
  base = photometry.baselines(field, CFG)['rubin_r-rubin_g']
  assert base['aperture']['scatter_mag'] < 0.05
  assert base['median']['scatter_mag'] > 0.3  # colours spread over 2 mag


def test_head_reads_colours_from_informative_tokens(field):
  base = photometry.baselines(field, CFG)['rubin_r-rubin_g']
  res = photometry.run(synthetic.MomentModel(), field, CFG)['rubin_r-rubin_g']
  assert res['head']['scatter_mag'] < 0.3 * base['median']['scatter_mag']
  assert res['head_shuffled']['scatter_mag'] > 0.7 * base['median']['scatter_mag']
  blind = photometry.run(synthetic.BlindModel(), field, CFG)['rubin_r-rubin_g']
  assert blind['head']['scatter_mag'] > 0.7 * base['median']['scatter_mag']
