"""Real pixels: sep's ground-based field fetched from the package registry at test time,
scored against its SExtractor catalogue (nothing is committed)."""

import numpy as np
import pytest

from jaisp_jax.evaluate.probes import realdata
from jaisp_jax.evaluate.probes import synthetic


def test_read_catalog_makes_positions_zero_based(tmp_path):
  path = tmp_path / 'image.cat'
  path.write_text('#   1 NUMBER   Running object number\n'
                  '#   2 X_IMAGE  Object position along x  [pixel]\n'
                  '#   3 Y_IMAGE  Object position along y  [pixel]\n'
                  '#   4 FLUX_RADIUS  Fraction-of-light radii  [pixel]\n'
                  '#   7 FLAGS  Extraction flags\n'
                  '         1    1.0000     10.5000   0.1 0.2 0.3  0\n'
                  '         2   20.2500      3.0000   0.4 0.5 0.6  2\n')
  cat = realdata.read_catalog(str(path))
  np.testing.assert_allclose(cat['X_IMAGE'], [0.0, 19.25])  # FITS pixel 1 is numpy pixel 0
  np.testing.assert_allclose(cat['Y_IMAGE'], [9.5, 2.0])
  np.testing.assert_allclose(cat['FLAGS'], [0, 2])  # vector column FLUX_RADIUS(3) spans 4-6
  np.testing.assert_allclose(cat['FLUX_RADIUS_2'], [0.2, 0.5])


@pytest.fixture(scope='module')
def sep_data(tmp_path_factory):
  ok, reason = realdata.registry_reachable()
  if not ok:
    pytest.skip(f'package registry unreachable, real image unavailable: {reason}')
  # A fresh cache folder: the sdist is downloaded from the registry in this test.
  return realdata.fetch_sep_data(str(tmp_path_factory.mktemp('sep-data')))


def test_real_field_classical_detector_and_infomap(sep_data):
  field = realdata.load_field(sep_data)
  assert field['image'].shape == (256, 256) and field['rms'].shape == (256, 256)
  cat = field['catalog']
  assert len(cat['X_IMAGE']) == 65
  assert cat['X_IMAGE'].min() >= -0.5 and cat['X_IMAGE'].max() <= 255.5
  res = realdata.run({'pixels': synthetic.PixelModel()}, paths=sep_data)
  # sep implements SExtractor's algorithm: with the catalogue's settings it finds the
  # catalogue's objects (a few differ: deblending, cleaning).
  assert res['sep']['completeness']['snr>10'] > 0.9
  assert res['sep']['purity'] > 0.7
  assert res['n_catalog'] == 65
  info = res['models']['pixels']['infomap']
  assert info['auc'] > 0.9 and info['mean_weight_sources'] > 5 * info['mean_weight_sky']
  assert 'head' not in res['models']['pixels']  # no simulated held-out data given
