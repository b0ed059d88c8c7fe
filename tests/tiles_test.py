"""Tile reading and validation: one test per bad-input case, plus FITS, WCS and pairing."""

import os
import pathlib
import pickle

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from jaisp_jax import bands
from jaisp_jax.cli import UserError
from jaisp_jax.data import tiles
from jaisp_jax.data.tiles import TileError

RNG = np.random.default_rng(0)
H = 16  # Rubin tile side in px; Euclid tiles are 2H


def arrays(n_bands, size, dtype=np.float32, rms=0.05):
  image = RNG.normal(0, rms, (n_bands, size, size)).astype(dtype)
  return image, np.full((n_bands, size, size), rms, dtype)


def write_npz(path, image, rms, **extra):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, image=image, rms=rms, **extra)
  return path


def make_wcs(scale, size, dx=0.0, dy=0.0):
  """TAN WCS with `scale` "/px whose grid centre is at (53.1, -27.8), shifted by (dx, dy) px."""
  w = WCS(naxis=2)
  w.wcs.ctype = ['RA---TAN', 'DEC--TAN']
  w.wcs.crval = [53.1, -27.8]
  w.wcs.crpix = [(size + 1) / 2 + dx, (size + 1) / 2 + dy]
  w.wcs.cdelt = [-scale / 3600, scale / 3600]
  return w


def write_pair(root, name='tile_0001', rubin_size=H, euclid_size=2 * H, fmt='npz'):
  r = write_npz(root / 'rubin_tiles_f' / f'{name}.npz', *arrays(6, rubin_size))
  e = write_npz(root / 'euclid_tiles_f' / f'{name}.npz', *arrays(4, euclid_size))
  return r, e


def read_problem(path, instrument='rubin', registry=None):
  with pytest.raises(TileError) as info:
    tiles.read_tile(path, instrument, registry)
  assert info.value.path == pathlib.Path(path)
  assert str(info.value).startswith(f'{path}: ')
  return info.value.problem


# -- good tiles --------------------------------------------------------------------


def test_reads_a_clean_seed_layout_pair(tmp_path):
  r, e = write_pair(tmp_path)
  listing = tiles.find_tile_pairs({'rubin': r.parent, 'euclid': e.parent})
  assert listing.problems == [] and len(listing.pairs) == 1
  pair = tiles.read_tile_pair(listing.pairs[0])
  assert pair.name == 'tile_0001' and pair.reference == 'rubin' and pair.notes == []
  rubin, euclid = pair['rubin'], pair['euclid']
  assert rubin.image.shape == (6, H, H) and euclid.image.shape == (4, 2 * H, 2 * H)
  assert rubin.band_names == bands.default_registry().names[:6]
  assert rubin.image.dtype == np.float32 and rubin.valid.all() and rubin.band_valid.all()
  np.testing.assert_array_equal(rubin.image, np.load(r)['image'])
  assert rubin.warnings == [] and rubin.notes == [] and euclid.wcs is None
  assert pair.usable_bands() == bands.default_registry().names


def test_tile_error_names_file_and_survives_pickling(tmp_path):
  err = TileError(tmp_path / 'a.npz', 'broken')
  assert isinstance(err, UserError)
  assert str(err) == f'{tmp_path / "a.npz"}: broken'
  back = pickle.loads(pickle.dumps(err))
  assert (back.path, back.problem, str(back)) == (err.path, err.problem, str(err))


# -- one test per bad-input case ---------------------------------------------------


def test_missing_key(tmp_path):
  image, _ = arrays(6, H)
  path = tmp_path / 't.npz'
  np.savez(path, image=image, noise=image)
  problem = read_problem(path)
  assert "missing key 'rms'" in problem and 'image, noise' in problem


def test_wrong_band_count(tmp_path):
  path = write_npz(tmp_path / 't.npz', *arrays(5, H))
  problem = read_problem(path)
  assert 'image has 5 band(s), expected 6 for rubin' in problem and 'rubin_y' in problem


def test_euclid_size_not_twice_rubin_beyond_tolerance(tmp_path):
  r, e = write_pair(tmp_path, rubin_size=H, euclid_size=2 * H + 2)
  files = tiles.find_tile_pairs({'rubin': r.parent, 'euclid': e.parent}).pairs[0]
  with pytest.raises(TileError) as info:
    tiles.read_tile_pair(files)
  assert info.value.path == e
  assert f'euclid tile is {2 * H + 2}x{2 * H + 2} px but rubin tile {r.name} is {H}x{H}' in str(
      info.value)
  assert f'expected 2x that = {2 * H}x{2 * H} px (+-1 px)' in str(info.value)
  # The tolerance is configurable.
  pair = tiles.read_tile_pair(files, size_tolerance=2)
  assert pair['euclid'].shape == (2 * H, 2 * H)


@pytest.mark.parametrize('euclid_size,rubin_out', [(2 * H + 1, H), (2 * H - 1, H - 1)])
def test_off_by_one_is_cropped_to_exactly_twice_and_noted(tmp_path, euclid_size, rubin_out):
  r, e = write_pair(tmp_path, euclid_size=euclid_size)
  files = tiles.find_tile_pairs({'rubin': r.parent, 'euclid': e.parent}).pairs[0]
  pair = tiles.read_tile_pair(files)
  assert pair['rubin'].shape == (rubin_out, rubin_out)
  assert pair['euclid'].shape == (2 * rubin_out, 2 * rubin_out)
  assert any('cropped' in n for n in pair.notes)
  # Without WCS the far edge goes: the kept pixels are the file's first ones.
  np.testing.assert_array_equal(pair['euclid'].image,
                                np.load(e)['image'][:, :2 * rubin_out, :2 * rubin_out])
  with pytest.raises(TileError, match='expected 2x'):
    tiles.read_tile_pair(files, size_tolerance=0)


def test_rectangular_tiles_are_checked_per_axis(tmp_path):
  r = write_npz(tmp_path / 'r' / 't.npz', *(a[:, :H, :] for a in arrays(6, 20)))
  e = write_npz(tmp_path / 'e' / 't.npz', *(a[:, :2 * H + 1, :40] for a in arrays(4, 40)))
  pair = tiles.read_tile_pair(tiles.TileFiles('t', {'rubin': r, 'euclid': e}))
  assert pair['rubin'].shape == (H, 20) and pair['euclid'].shape == (2 * H, 40)
  bad = write_npz(tmp_path / 'b' / 't.npz', *(a[:, :2 * H, :38] for a in arrays(4, 40)))
  with pytest.raises(TileError, match=f'expected 2x that = {2 * H}x40 px'):
    tiles.read_tile_pair(tiles.TileFiles('t', {'rubin': r, 'euclid': bad}))


def test_size_ratio_comes_from_the_registry(tmp_path):
  reg = bands.BandRegistry.from_dicts(bands.DEFAULT_BANDS + [
      dict(name='hst_f606w', instrument='hst', pixel_scale=0.05, wavelength_nm=590.0, index=0)])
  r = write_npz(tmp_path / 'r' / 't.npz', *arrays(6, H))
  h = write_npz(tmp_path / 'h' / 't.npz', *arrays(1, 4 * H))
  pair = tiles.read_tile_pair(tiles.TileFiles('t', {'rubin': r, 'hst': h}), reg)
  assert pair['hst'].shape == (4 * H, 4 * H) and pair.reference == 'rubin'
  bad = write_npz(tmp_path / 'h2' / 't.npz', *arrays(1, 2 * H))
  with pytest.raises(TileError, match=f'expected 4x that = {4 * H}x{4 * H}'):
    tiles.read_tile_pair(tiles.TileFiles('t', {'rubin': r, 'hst': bad}), reg)


def test_nan_and_inf_pixels_are_masked_counted_and_reported(tmp_path):
  image, rms = arrays(6, H)
  image[1, 2, 3] = np.nan
  image[1, 4, 5] = np.inf
  image[4, 0, 0] = -np.inf
  tile = tiles.read_tile(write_npz(tmp_path / 't.npz', image, rms), 'rubin')
  np.testing.assert_array_equal(tile.n_bad_image, [0, 2, 0, 0, 1, 0])
  assert np.isfinite(tile.image).all() and np.isfinite(tile.rms).all()
  assert not tile.valid[1, 2, 3] and not tile.valid[4, 0, 0] and tile.valid.sum() == 6 * H * H - 3
  assert tile.image[1, 2, 3] == 0 and tile.rms[1, 2, 3] == 0
  assert tile.inverse_variance()[1, 2, 3] == 0 and tile.band_valid.all()
  assert any(w.startswith('rubin_g: 2 NaN/Inf image pixel(s)') for w in tile.warnings)
  assert any(w.startswith('rubin_z: 1 NaN/Inf') for w in tile.warnings)


def test_zero_negative_and_nonfinite_rms_are_masked_and_reported(tmp_path):
  image, rms = arrays(6, H)
  rms[2, 0, 0], rms[2, 0, 1], rms[2, 0, 2], rms[2, 0, 3] = 0, -1, np.nan, np.inf
  tile = tiles.read_tile(write_npz(tmp_path / 't.npz', image, rms), 'rubin')
  np.testing.assert_array_equal(tile.n_bad_rms, [0, 0, 4, 0, 0, 0])
  assert not tile.valid[2, 0, :4].any() and tile.valid[2, 0, 4:].all()
  assert (tile.image[2, 0, :4] == 0).all() and (tile.rms[2, 0, :4] == 0).all()
  assert tile.rms[tile.valid].min() > 0
  assert ('rubin_r: 4 rms pixel(s) masked (1 zero, 1 negative, 2 NaN/Inf'
          in ' '.join(tile.warnings))


def test_blank_markers_beyond_1e18_are_masked_like_nan(tmp_path):
  # Some pipelines write -1e30 (or float32's max) for "no data": finite, but its square
  # overflows float32 in any residual, so it must not reach training as a pixel value.
  image, rms = arrays(6, H)
  image[0, 1, 1], image[0, 1, 2] = -1e30, np.finfo(np.float32).max
  image[3, 0, 0] = 5e17                     # bright, but still a number: kept
  rms[5, 2, 2] = 1e30
  tile = tiles.read_tile(write_npz(tmp_path / 't.npz', image, rms), 'rubin')
  np.testing.assert_array_equal(tile.n_bad_image, [2, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(tile.n_bad_rms, [0, 0, 0, 0, 0, 1])
  assert not tile.valid[0, 1, 1:3].any() and not tile.valid[5, 2, 2]
  assert tile.valid[3, 0, 0] and tile.image[3, 0, 0] == np.float32(5e17)
  assert np.abs(tile.image).max() <= 1e18 and tile.rms.max() <= 1e18
  assert any(w.startswith('rubin_u: 2 image pixel(s) beyond +-1e+18 (blank markers)')
             for w in tile.warnings), tile.warnings
  assert 'rubin_y: 1 rms pixel(s) masked (1 above 1e+18 (blank markers)' in ' '.join(tile.warnings)


def test_band_entirely_masked_is_flagged_missing(tmp_path):
  image, rms = arrays(4, 2 * H)
  image[3] = np.nan
  tile = tiles.read_tile(write_npz(tmp_path / 't.npz', image, rms), 'euclid')
  np.testing.assert_array_equal(tile.band_valid, [True, True, True, False])
  assert tile.usable_bands() == ('euclid_vis', 'euclid_y', 'euclid_j')
  assert any('euclid_h: every pixel is masked; band treated as missing' in w
             for w in tile.warnings)
  # A minimum usable fraction can flag mostly-masked bands too.
  image[2, :3 * H // 2] = np.nan
  tile = tiles.read_tile(write_npz(tmp_path / 't2.npz', image, rms), 'euclid',
                         min_band_valid_fraction=0.5)
  np.testing.assert_array_equal(tile.band_valid, [True, True, False, False])


def test_tile_with_no_usable_band_is_an_error(tmp_path):
  image, rms = arrays(6, H)
  rms[:3] = 0
  image[3:] = np.nan
  assert 'no usable band' in read_problem(write_npz(tmp_path / 't.npz', image, rms))


def _truncated(good: bytes) -> bytes:
  return good[:len(good) // 2]


def _bad_crc(good: bytes) -> bytes:
  data = bytearray(good)
  data[200] ^= 0xFF   # inside the first member's data
  return bytes(data)


@pytest.mark.parametrize('corrupt,expected', [
    (_truncated, 'corrupted or truncated npz'),
    (_bad_crc, 'truncated or corrupted'),
    (lambda good: b'\x00garbage\xff' * 50, 'not an npz (zip) archive'),
    (lambda good: b'', 'file is empty'),
])
def test_truncated_or_corrupted_npz(tmp_path, corrupt, expected):
  good = write_npz(tmp_path / 'good.npz', *arrays(6, H)).read_bytes()
  path = tmp_path / 'bad.npz'
  path.write_bytes(corrupt(good))
  assert expected in read_problem(path)


@pytest.mark.parametrize('cut', [0.5, 0.1])
def test_truncated_or_corrupted_fits(tmp_path, cut):
  image, rms = arrays(6, H)
  path = tmp_path / 't.fits'
  fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name='IMAGE'),
                fits.ImageHDU(rms, name='RMS')]).writeto(path)
  good = path.read_bytes()
  path.write_bytes(good[:int(len(good) * cut)])
  assert 'corrupted or truncated FITS' in read_problem(path)
  path.write_bytes(b'SIMPLE? no, garbage' * 300)
  assert 'corrupted or truncated FITS' in read_problem(path)


def test_unpaired_tile_is_reported_and_skipped_only_on_request(tmp_path):
  r, e = write_pair(tmp_path, 'tile_0001')
  lonely = write_npz(r.parent / 'tile_0002.npz', *arrays(6, H))
  dirs = {'rubin': r.parent, 'euclid': e.parent}
  listing = tiles.find_tile_pairs(dirs)
  assert [p.name for p in listing.pairs] == ['tile_0001']
  assert [(p.path, p.problem) for p in listing.problems] == [
      (lonely, f'unpaired: no euclid tile named tile_0002 in {e.parent}')]
  listing = tiles.find_tile_pairs(dirs, allow_unpaired=True)
  assert listing.problems == [] and [p.name for p in listing.pairs] == ['tile_0001']
  assert len(listing.skipped) == 1 and str(lonely) in listing.skipped[0]


class _Tripwire:
  """Unpickling this would create a file: proof that object arrays are never unpickled."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (pathlib.Path.touch, (self.path,))


def test_object_arrays_are_never_unpickled(tmp_path):
  flag = tmp_path / 'unpickled'
  image = np.empty((6, H, H), dtype=object)
  image[...] = _Tripwire(flag)
  path = tmp_path / 't.npz'
  np.savez(path, image=image, rms=np.ones((6, H, H), np.float32))
  problem = read_problem(path)
  assert "'image' is an object array" in problem and 'allow_pickle=False' in problem
  assert not flag.exists()


def test_empty_or_missing_folder(tmp_path):
  r, _ = write_pair(tmp_path)
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'README.txt').write_text('not a tile')
  with pytest.raises(TileError) as info:
    tiles.find_tile_pairs({'rubin': r.parent, 'euclid': tmp_path / 'empty'})
  assert info.value.path == tmp_path / 'empty' and 'no tile files' in info.value.problem
  with pytest.raises(TileError, match='folder does not exist'):
    tiles.find_tile_pairs({'rubin': r.parent, 'euclid': tmp_path / 'nope'})
  with pytest.raises(UserError, match="unknown instrument 'hst'"):
    tiles.find_tile_pairs({'rubin': r.parent, 'hst': r.parent})


@pytest.mark.parametrize('dtype', [np.int16, np.uint8, np.float64, np.float16])
def test_integer_and_float64_images_are_converted_and_noted(tmp_path, dtype):
  image = RNG.integers(0, 100, (6, H, H)).astype(dtype)
  rms = np.ones((6, H, H), dtype)
  tile = tiles.read_tile(write_npz(tmp_path / 't.npz', image, rms), 'rubin')
  assert tile.image.dtype == np.float32 and tile.rms.dtype == np.float32
  np.testing.assert_array_equal(tile.image, image.astype(np.float32))
  assert f'image: {np.dtype(dtype)} converted to float32' in tile.notes
  assert tile.source_dtype == str(np.dtype(dtype)) and tile.warnings == []


def test_wrong_ndim(tmp_path):
  image, rms = arrays(6, H)
  problem = read_problem(write_npz(tmp_path / 't.npz', image[0], rms[0]))
  assert f'image has 2 dimension(s), shape ({H}, {H}); expected 3: (n_bands, H, W) = (6, H, W)' \
      in problem
  # A 2-D image is fine for a one-band instrument.
  reg = bands.BandRegistry.from_dicts([
      dict(name='hst_f606w', instrument='hst', pixel_scale=0.05, wavelength_nm=590.0, index=0)])
  assert tiles.read_tile(tmp_path / 't.npz', 'hst', reg).image.shape == (1, H, H)


def test_image_rms_shape_mismatch(tmp_path):
  image, rms = arrays(6, H)
  problem = read_problem(write_npz(tmp_path / 't.npz', image, rms[:, :, 1:]))
  assert f'rms shape (6, {H}, {H - 1}) does not match image shape (6, {H}, {H})' in problem


def test_non_numeric_dtype_and_bare_npy(tmp_path):
  image, rms = arrays(6, H)
  assert "'rms' has dtype complex64" in read_problem(
      write_npz(tmp_path / 't.npz', image, rms.astype(np.complex64)))
  np.save(tmp_path / 'bare.npy', image)
  (tmp_path / 'bare.npy').rename(tmp_path / 'bare.npz')
  assert 'single .npy array' in read_problem(tmp_path / 'bare.npz')


# -- FITS and WCS ------------------------------------------------------------------


@pytest.mark.parametrize('suffix', ['.fits', '.fits.gz'])
def test_fits_cube_layout_keeps_the_wcs(tmp_path, suffix):
  image, rms = arrays(6, H)
  image[0, 0, 0] = np.nan
  header = make_wcs(0.2, H).to_header()
  path = tmp_path / f't{suffix}'
  assert tiles.tile_name(path) == 't'
  fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, header, name='SCI'),
                fits.ImageHDU(rms, name='ERR')]).writeto(path)
  tile = tiles.read_tile(path, 'rubin')
  np.testing.assert_array_equal(tile.image[:, 1:], image[:, 1:])
  assert tile.n_bad_image[0] == 1 and tile.wcs is not None and tile.wcs.naxis == 2
  ra, dec = tile.wcs.pixel_to_world_values((H - 1) / 2, (H - 1) / 2)
  np.testing.assert_allclose([ra, dec], [53.1, -27.8], atol=1e-9)


@pytest.mark.parametrize('img_fmt,rms_fmt', [('{full}', 'RMS_{full}'),
                                             ('IMAGE_{short}', 'RMS_{short}')])
def test_fits_one_hdu_per_band(tmp_path, img_fmt, rms_fmt):
  reg = bands.default_registry()
  image, rms = arrays(4, 2 * H, dtype='>f4')  # FITS is big-endian
  hdus = [fits.PrimaryHDU()]
  for band in reg.instrument_bands('euclid')[::-1]:   # HDU order must not matter
    names = dict(full=band.name.upper(), short=band.name.split('_')[1].upper())
    hdus.append(fits.ImageHDU(image[band.index], make_wcs(0.1, 2 * H).to_header(),
                              name=img_fmt.format(**names)))
    hdus.append(fits.ImageHDU(rms[band.index] * (band.index + 1), name=rms_fmt.format(**names)))
  path = tmp_path / 't.fits'
  fits.HDUList(hdus).writeto(path)
  tile = tiles.read_tile(path, 'euclid')
  np.testing.assert_array_equal(tile.image, image.astype(np.float32))
  np.testing.assert_allclose(tile.rms[:, 0, 0], 0.05 * np.arange(1, 5), rtol=1e-6)
  assert tile.wcs is not None and tile.image.dtype.isnative and tile.notes == []
  # A missing band HDU is named.
  fits.HDUList([h for h in hdus if 'J' not in h.name.split('_')[-1]]).writeto(
      tmp_path / 'u.fits')
  assert 'missing HDU for band euclid_j' in read_problem(tmp_path / 'u.fits', 'euclid')


def test_fits_without_rms_hdu_and_wrong_wcs_scale(tmp_path):
  image, rms = arrays(6, H)
  fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, name='IMAGE')]).writeto(
      tmp_path / 'a.fits')
  assert 'missing rms HDU' in read_problem(tmp_path / 'a.fits')
  fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(image, make_wcs(0.1, H).to_header(),
                                                 name='IMAGE'),
                fits.ImageHDU(rms, name='RMS')]).writeto(tmp_path / 'b.fits')
  assert "WCS pixel scale 0.1\"/px differs from the registry's 0.2\"/px" in read_problem(
      tmp_path / 'b.fits')


def test_npz_wcs_key_and_sky_alignment(tmp_path):
  r = write_npz(tmp_path / 'r.npz', *arrays(6, H), wcs=make_wcs(0.2, H).to_header_string())
  e = write_npz(tmp_path / 'e.npz', *arrays(4, 2 * H),
                wcs=make_wcs(0.1, 2 * H).to_header_string())
  off = write_npz(tmp_path / 'off.npz', *arrays(4, 2 * H),
                  wcs=make_wcs(0.1, 2 * H, dx=5).to_header_string())  # 0.5" off
  rubin = tiles.read_tile(r, 'rubin')
  assert tiles.check_sky_alignment(rubin, tiles.read_tile(e, 'euclid')) < 1e-6
  far = tiles.read_tile(off, 'euclid')
  assert tiles.sky_offset_arcsec(rubin, far) == pytest.approx(0.5, rel=1e-3)
  with pytest.raises(TileError, match='does not cover the same sky') as info:
    tiles.check_sky_alignment(rubin, far)
  assert info.value.path == off
  assert tiles.check_sky_alignment(rubin, far, tolerance_arcsec=0.6) == pytest.approx(0.5, 1e-3)
  no_wcs = tiles.read_tile(write_npz(tmp_path / 'n.npz', *arrays(4, 2 * H)), 'euclid')
  assert tiles.check_sky_alignment(rubin, no_wcs) is None
  with pytest.raises(TileError, match='does not cover the same sky'):
    tiles.read_tile_pair(tiles.TileFiles('x', {'rubin': r, 'euclid': off}))


def test_wcs_decides_which_edge_an_extra_pixel_is_cropped_from(tmp_path):
  r = write_npz(tmp_path / 'r.npz', *arrays(6, H), wcs=make_wcs(0.2, H).to_header_string())
  # One extra Euclid row and column before the Rubin footprint starts.
  image, rms = arrays(4, 2 * H + 1)
  e = write_npz(tmp_path / 'e.npz', image, rms,
                wcs=make_wcs(0.1, 2 * H, dx=1, dy=1).to_header_string())
  pair = tiles.read_tile_pair(tiles.TileFiles('x', {'rubin': r, 'euclid': e}))
  np.testing.assert_array_equal(pair['euclid'].image, image[:, 1:, 1:])
  assert pair.sky_offset_arcsec < 1e-6
  assert 'first row 1, first column 1' in pair.notes[0]


def test_npz_wcs_stored_as_bytes_is_read_and_junk_wcs_text_is_refused(tmp_path):
  r = write_npz(tmp_path / 'r.npz', *arrays(6, H),
                wcs=np.bytes_(make_wcs(0.2, H).to_header_string().encode()))
  off = write_npz(tmp_path / 'off.npz', *arrays(4, 2 * H),
                  wcs=np.bytes_(make_wcs(0.1, 2 * H, dx=5).to_header_string().encode()))
  rubin = tiles.read_tile(r, 'rubin')
  assert rubin.wcs is not None  # bytes used to come out as "b'...'" and lose every card
  with pytest.raises(TileError, match='does not cover the same sky'):
    tiles.check_sky_alignment(rubin, tiles.read_tile(off, 'euclid'))
  junk = write_npz(tmp_path / 'junk.npz', *arrays(6, H), wcs=np.str_('this is not a header'))
  assert "key 'wcs' is not a valid FITS header (invalid card" in read_problem(junk)
  empty = write_npz(tmp_path / 'empty.npz', *arrays(6, H), wcs=np.str_(''))
  assert tiles.read_tile(empty, 'rubin').wcs is None  # '' = no WCS, as documented


def test_npz_members_that_are_not_arrays_or_claim_too_much_are_corrupted(tmp_path):
  import zipfile
  image, rms = arrays(6, H)
  raw = tmp_path / 'raw.npz'
  with zipfile.ZipFile(raw, 'w') as z:  # members that are not .npy files
    z.writestr('image.npy', b'garbage')
    z.writestr('rms.npy', b'garbage')
  assert "'image' is not a numpy array" in read_problem(raw)
  # A .npy header that claims 6 x 1e7 x 1e7 float32 (2 PiB) over a few bytes of data.
  huge = tmp_path / 'huge.npz'
  header = {'descr': '<f4', 'fortran_order': False, 'shape': (6, 10 ** 7, 10 ** 7)}
  import io
  buf = io.BytesIO()
  np.lib.format.write_array_header_1_0(buf, header)
  rms_buf = io.BytesIO()
  np.save(rms_buf, rms)
  with zipfile.ZipFile(huge, 'w') as z:
    z.writestr('image.npy', buf.getvalue() + b'\0' * 100)
    z.writestr('rms.npy', rms_buf.getvalue())
  problem = read_problem(huge)
  assert "'image' is corrupted: its header claims shape (6, 10000000, 10000000)" in problem


def test_rms_so_small_its_weight_overflows_is_masked_and_reported(tmp_path):
  image, rms = arrays(6, H)
  rms[2, :3, :3] = 1e-30  # 1/rms^2 = 1e60: inf in float32
  rms[2, 5, 5] = 1e-18    # small but usable (weight 1e36)
  tile = tiles.read_tile(write_npz(tmp_path / 't.npz', image, rms), 'rubin')
  assert not tile.valid[2, :3, :3].any() and tile.valid[2, 5, 5]
  assert np.isfinite(tile.inverse_variance()).all()
  assert any('9 below 1e-19 (1/rms^2 overflows)' in w for w in tile.warnings)


def test_an_unreadable_tile_path_is_a_tile_error(tmp_path):
  # (Running as root, permissions cannot make a file unreadable; a directory named like a
  # tile fails the same open() with an OSError. read_tile refuses it earlier, as 'not a
  # regular file', so the loader's own guard is called directly.)
  folder_like = tmp_path / 'tile_0000.npz'
  folder_like.mkdir()
  assert 'not a regular file' in read_problem(folder_like)
  with pytest.raises(TileError, match='cannot read the file'):
    tiles._load_npz(folder_like)


def test_a_broken_link_named_like_a_tile_is_reported_itself_not_as_its_partner_unpaired(
    tmp_path):
  r, e = write_pair(tmp_path)
  r.unlink()
  r.symlink_to(tmp_path / 'gone.npz')
  listing = tiles.find_tile_pairs({'rubin': r.parent, 'euclid': e.parent})
  assert listing.problems == [] and [p.name for p in listing.pairs] == ['tile_0001']
  assert 'broken symbolic link' in read_problem(r)


def test_a_file_name_that_is_not_utf8_is_a_problem_of_that_file(tmp_path):
  # The dataset stores tile names as text: such a name used to crash the build.
  r, e = write_pair(tmp_path)
  write_pair(tmp_path, 'tile_0002')
  bad = {}
  for p in (r, e):
    raw = bytes(p.parent) + b'/tile_\xff.npz'
    os.rename(bytes(p), raw)
    bad[p.parent] = pathlib.Path(os.fsdecode(raw))
  listing = tiles.find_tile_pairs({'rubin': r.parent, 'euclid': e.parent})
  assert [p.name for p in listing.pairs] == ['tile_0002']
  assert sorted(p.path for p in listing.problems) == sorted(bad.values())
  assert all('not valid UTF-8' in p.problem for p in listing.problems)
