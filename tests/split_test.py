"""Sky-region split: overlapping tiles (by WCS or by identical pixels) stay together."""

import numpy as np

from jaisp_jax.data import split


def _wcs(center_deg, size_px, scale_arcsec):
  from astropy.wcs import WCS
  w = WCS(naxis=2)
  w.wcs.ctype = ['RA---TAN', 'DEC--TAN']
  w.wcs.crval = list(center_deg)
  w.wcs.crpix = [(size_px + 1) / 2] * 2
  w.wcs.cd = np.diag([-scale_arcsec / 3600, scale_arcsec / 3600])
  return w


def _tile(name, image, wcs=None, scale=0.2):
  valid = np.ones(image.shape, bool)
  return split.tile_sky(name, 4, image, valid, np.ones(image.shape[0], bool), scale, wcs)


def test_pixel_identical_overlap_links_tiles_without_wcs():
  rng = np.random.default_rng(0)
  mosaic = rng.normal(size=(2, 100, 300)).astype(np.float32)
  tiles = [_tile('a', mosaic[:, :, 0:100]),
           _tile('b', mosaic[:, :, 55:155]),   # overlaps a by 45 px
           _tile('c', mosaic[:, :, 190:290]),  # overlaps nothing
           _tile('d', rng.normal(size=(2, 100, 100)).astype(np.float32))]
  regions = split.sky_regions(tiles)
  assert regions[0] == regions[1]
  assert len({regions[0], regions[2], regions[3]}) == 3


def test_masked_or_flat_areas_do_not_link_tiles():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(1, 64, 64)).astype(np.float32)
  b = rng.normal(size=(1, 64, 64)).astype(np.float32)
  a[:, :40, :40] = 0.0   # identical flat (e.g. masked) areas
  b[:, :40, :40] = 0.0
  regions = split.sky_regions([_tile('a', a), _tile('b', b)])
  assert regions[0] != regions[1]


def test_wcs_footprints_link_overlapping_tiles_only():
  rng = np.random.default_rng(2)
  img = lambda: rng.normal(size=(1, 100, 100)).astype(np.float32)  # noqa: E731
  dec0 = -27.8
  step = 20.0 / 3600 / np.cos(np.radians(dec0))  # 20" in RA
  # 100 px of 0.2" = 20" tiles: b is shifted by 10" (overlap), c abuts b exactly.
  a = _tile('a', img(), _wcs((53.0, dec0), 100, 0.2))
  b = _tile('b', img(), _wcs((53.0 - 0.5 * step, dec0), 100, 0.2))
  c = _tile('c', img(), _wcs((53.0 - 1.5 * step, dec0), 100, 0.2))
  far = _tile('far', img(), _wcs((60.0, dec0), 100, 0.2))
  assert split.footprints_overlap(a, b) and not split.footprints_overlap(b, c)
  regions = split.sky_regions([a, b, c, far])
  assert regions[0] == regions[1] and len({regions[1], regions[2], regions[3]}) == 3


def test_assign_splits_moves_whole_regions():
  regions = np.array([0, 0, 1, 2, 2, 2, 3, 4])
  n_chips = np.array([4, 4, 4, 4, 4, 4, 4, 4])
  out = split.assign_splits(regions, n_chips, val_fraction=0.25, seed=3)
  for r in np.unique(regions):
    assert len(set(out[regions == r])) == 1
  n_val = n_chips[out == 'validation'].sum()
  assert 0 < n_val <= 0.25 * 1.5 * n_chips.sum() and (out == 'train').any()
  assert (split.assign_splits(np.zeros(3, int), np.ones(3), 0.5) == 'train').all()
