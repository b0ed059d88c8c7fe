"""Sky-aligned crops + flips/rot90 keep tokens on the same sky; normalisation is exact."""

import numpy as np
import pytest

from jaisp_jax import bands
from jaisp_jax.data import augment

REG = bands.default_registry()
CHIP_ARCSEC = 8.0   # Rubin 40 x 40 px, Euclid 80 x 80 px
CROP_ARCSEC = 6.4   # Rubin 32 x 32 px, Euclid 64 x 64 px
TOKEN_ARCSEC = 0.8  # Rubin stride 4, Euclid stride 8


def _render(sky_yx, scale, n_px, sigma_arcsec=0.3):
  """A unit Gaussian at sky (y, x) arcsec on a grid whose pixel j spans [j, j+1) * scale."""
  centers = (np.arange(n_px) + 0.5) * scale
  gy = np.exp(-(centers - sky_yx[0]) ** 2 / (2 * sigma_arcsec ** 2))
  gx = np.exp(-(centers - sky_yx[1]) ** 2 / (2 * sigma_arcsec ** 2))
  return (gy[:, None] * gx[None, :]).astype(np.float32)


def _source_chip(sky_yx):
  chip = {}
  for inst in REG.instruments:
    scale = REG.pixel_scale(inst)
    n_px = int(round(CHIP_ARCSEC / scale))
    img = _render(sky_yx, scale, n_px)
    nb = REG.n_bands(inst)
    chip[inst] = dict(image=np.stack([img] * nb), rms=np.ones((nb, n_px, n_px), np.float32))
  return chip


def _expected_in_view(sky_yx, geom):
  """Where a sky position lands in the view (arcsec from the view's corner)."""
  side = geom.size * geom.ref_scale
  y, x = sky_yx[0] - geom.y0 * geom.ref_scale, sky_yx[1] - geom.x0 * geom.ref_scale
  if geom.flip:
    x = side - x
  for _ in range(geom.k):  # np.rot90 moves element (r, c) to (n - 1 - c, r)
    y, x = side - x, y
  return np.array([y, x])


def test_point_source_lands_on_same_token_in_every_view():
  rng = np.random.default_rng(0)
  seen_k, seen_flip = set(), set()
  for _ in range(40):
    # Geometry first, then a source near the centre of a random token of the crop.
    geom = augment.sample_geometry(rng, _source_chip((4.0, 4.0)), REG, CROP_ARCSEC)
    seen_k.add(geom.k)
    seen_flip.add(geom.flip)
    n_tok = int(round(CROP_ARCSEC / TOKEN_ARCSEC))
    ty, tx = rng.integers(1, n_tok - 1, size=2)  # away from the crop edge (truncation)
    in_crop = (np.array([ty, tx]) + 0.5 + rng.uniform(-0.2, 0.2, 2)) * TOKEN_ARCSEC
    sky = in_crop + np.array([geom.y0, geom.x0]) * geom.ref_scale
    chip = _source_chip(sky)
    expected = _expected_in_view(sky, geom)
    expected_token = tuple((expected // TOKEN_ARCSEC).astype(int))
    for band_id, band in enumerate(REG.bands):
      view = augment.make_view(chip, REG, band_id, geom)
      img = view['image']
      stride = REG.stride(band.name, TOKEN_ARCSEC)
      assert img.shape == (n_tok * stride,) * 2
      tokens = img.reshape(n_tok, stride, n_tok, stride).sum(axis=(1, 3))
      assert np.unravel_index(np.argmax(tokens), tokens.shape) == expected_token, band.name
      # Sub-pixel: the flux centroid (in arcsec) is where the sky position should be.
      centers = (np.arange(img.shape[0]) + 0.5) * band.pixel_scale
      centroid = np.array([(img.sum(1) * centers).sum(), (img.sum(0) * centers).sum()]) / img.sum()
      np.testing.assert_allclose(centroid, expected, atol=0.01, err_msg=band.name)
  assert seen_k == {0, 1, 2, 3} and seen_flip == {False, True}


def _noise_chip(rng, with_defects=False):
  chip = {}
  for inst in REG.instruments:
    scale = REG.pixel_scale(inst)
    n_px = int(round(CHIP_ARCSEC / scale))
    nb = REG.n_bands(inst)
    depth = rng.uniform(0.01, 50.0, size=(nb, 1, 1))  # wildly different units per band
    ramp = 1.0 + 0.5 * np.sin(np.linspace(0, 3, n_px))[None, None, :]
    rms = (depth * ramp * np.ones((1, n_px, 1))).astype(np.float32)
    image = (rms * rng.standard_normal(rms.shape)).astype(np.float32)
    if with_defects:
      image[:, :5, :5] = np.nan
      rms[:, 10:12, :] = np.inf
      rms[:, -3:, -3:] = 0.0
      rms[:, 20, 20] = -1.0
    chip[inst] = dict(image=image, rms=rms)
  return chip


@pytest.mark.parametrize('with_defects', [False, True])
def test_normalisation_gives_unit_sky_noise_and_never_nan(with_defects):
  rng = np.random.default_rng(1)
  chip = _noise_chip(rng, with_defects)
  geom = augment.Geometry(y0=0, x0=0, size=40, ref_scale=0.2)  # the whole chip
  for band_id, band in enumerate(REG.bands):
    v = augment.make_view(chip, REG, band_id, geom)
    for key in ('image', 'rms', 'mask'):
      assert np.isfinite(v[key]).all() and v[key].dtype == np.float32
    ok = v['mask'] > 0
    raw = chip[band.instrument]
    expected_ok = augment.valid_pixels(raw['image'][band.index], raw['rms'][band.index])
    np.testing.assert_array_equal(ok, expected_ok)
    assert (v['image'][~ok] == 0).all() and (v['rms'][~ok] == 0).all()
    n = ok.sum()
    assert np.median(v['rms'][ok]) == pytest.approx(1.0, rel=1e-5)
    snr = v['image'][ok] / v['rms'][ok]
    # Standard error of a sample std is 1/sqrt(2n): allow 5 of them.
    assert abs(snr.std() - 1.0) < 5 / np.sqrt(2 * n), band.name
    assert int(v['band']) == band_id


def test_noise_injection_keeps_snr_exact():
  rng = np.random.default_rng(2)
  chip = _noise_chip(rng)
  geom = augment.Geometry(y0=2, x0=3, size=32, ref_scale=0.2, flip=True, k=1)
  alpha = 1.5
  for band_id in (0, 7):
    clean = augment.make_view(chip, REG, band_id, geom)
    noisy = augment.make_view(chip, REG, band_id, geom, np.random.default_rng(3), alpha)
    np.testing.assert_allclose(noisy['rms'], clean['rms'] * np.sqrt(1 + alpha ** 2), rtol=1e-6)
    added = (noisy['image'] - clean['image']) / clean['rms']
    n = added.size
    assert abs(added.std() - alpha) < 5 * alpha / np.sqrt(2 * n)
    snr = noisy['image'] / noisy['rms']
    assert abs(snr.std() - 1.0) < 5 / np.sqrt(2 * n)


def test_pair_and_chip_samples_follow_the_batch_format():
  rng = np.random.default_rng(4)
  chip = _noise_chip(rng)
  chip['euclid']['band_valid'] = np.array([True, False, True, True])
  chip['rubin']['image'][2] = np.nan  # a fully masked band is invalid too
  valid = augment.chip_band_valid(chip, REG)
  assert not valid[REG.band_id('euclid_y')] and not valid[REG.band_id('rubin_r')]
  assert valid.sum() == len(REG) - 2
  geom = augment.sample_geometry(rng, chip, REG, CROP_ARCSEC)
  pair = augment.make_pair(chip, REG, REG.band_id('rubin_u'), REG.band_id('euclid_h'), 1,
                           geom, rng, noise_prob=0.5, noise_max_alpha=1.0)
  assert pair['a']['image'].shape == (32, 32) and pair['b']['image'].shape == (64, 64)
  assert pair['kind'] == 1 and pair['b']['band'] == REG.band_id('euclid_h')
  sample = augment.make_chip_sample(chip, REG, geom)
  assert sample['rubin']['image'].shape == (6, 32, 32)
  assert sample['euclid']['mask'].shape == (4, 64, 64)
  np.testing.assert_array_equal(sample['euclid']['band_valid'], [True, False, True, True])
  assert not sample['rubin']['band_valid'][2] and (sample['rubin']['mask'][2] == 0).all()
  assert all(np.isfinite(sample[i][k]).all() for i in sample for k in ('image', 'rms'))


def test_misaligned_chips_and_oversized_crops_are_rejected():
  rng = np.random.default_rng(5)
  chip = _noise_chip(rng)
  with pytest.raises(ValueError, match='exceeds the chip'):
    augment.sample_geometry(rng, chip, REG, crop_arcsec=9.0)
  with pytest.raises(ValueError, match='whole number'):
    augment.sample_geometry(rng, chip, REG, crop_arcsec=6.3)
  chip['euclid'] = {k: v[:, :-2, :-2] for k, v in chip['euclid'].items()}
  with pytest.raises(ValueError, match='px at 0.1'):
    augment.sample_geometry(rng, chip, REG, CROP_ARCSEC)


def _reference_view(chip, band_id, geom, noise_rng=None, alpha=0.0):
  """make_view written the plain way: copy the crop, np.rot90, np.where."""
  band = REG.bands[band_id]
  part = chip[band.instrument]
  f = int(round(geom.ref_scale / band.pixel_scale))
  y0, x0, n = geom.y0 * f, geom.x0 * f, geom.size * f
  out = {}
  for key in ('image', 'rms'):
    a = part[key][band.index, y0:y0 + n, x0:x0 + n].copy()
    if geom.flip:
      a = np.flip(a, axis=-1)
    out[key] = np.ascontiguousarray(np.rot90(a, geom.k))
  scale = augment.band_scales(part['image'][band.index:band.index + 1],
                              part['rms'][band.index:band.index + 1])[0]
  ok = augment.valid_pixels(out['image'], out['rms'])
  with np.errstate(invalid='ignore'):
    image = np.where(ok, out['image'] / scale, 0.0).astype(np.float32)
    rms = np.where(ok, out['rms'] / scale, 0.0).astype(np.float32)
  if alpha > 0:
    noise = noise_rng.standard_normal(image.shape).astype(np.float32)
    image = image + np.where(ok, noise * rms * np.float32(alpha), 0).astype(np.float32)
    rms = rms * np.float32(np.sqrt(1.0 + alpha ** 2))
  return dict(image=image, rms=rms, mask=ok.astype(np.float32))


def test_views_equal_the_plain_crop_rotate_normalise_bit_for_bit():
  rng = np.random.default_rng(6)
  chip = _noise_chip(rng, with_defects=True)
  frozen = {i: {k: v.copy() for k, v in p.items()} for i, p in chip.items()}
  for part in chip.values():  # views of a read-only (cached) chip work, never write
    for v in part.values():
      v.flags.writeable = False
  for flip in (False, True):
    for k in range(4):
      geom = augment.Geometry(y0=3, x0=5, size=24, ref_scale=0.2, flip=flip, k=k)
      for band_id in (0, 3, 6, 9):
        alpha = 0.7 if k % 2 else 0.0
        got = augment.make_view(chip, REG, band_id, geom, np.random.default_rng(k), alpha)
        want = _reference_view(chip, band_id, geom, np.random.default_rng(k), alpha)
        for key in ('image', 'rms', 'mask'):
          assert got[key].flags.c_contiguous and got[key].dtype == np.float32
          assert got[key].tobytes() == want[key].tobytes(), (flip, k, band_id, key)
        np.testing.assert_array_equal(geom.apply(chip['rubin']['image'], 0.2),
                                      np.rot90(np.flip(chip['rubin']['image'][:, 3:27, 5:29],
                                                       -1) if flip else
                                               chip['rubin']['image'][:, 3:27, 5:29],
                                               k, axes=(-2, -1)))
  for inst, part in chip.items():
    for key, v in part.items():
      np.testing.assert_array_equal(v, frozen[inst][key])
