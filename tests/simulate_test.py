"""The simulated tiles, checked against their truth: positions, fluxes, noise, PSFs, files."""

import dataclasses
import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import observe, simulate, sky, truth

REGISTRY = bands_lib.default_registry()

# A sparse sky (no random sources) with one bright star and one galaxy injected, so the
# measurements below see nothing but these two sources, the PSFs and the noise.
STAR_XY = (40.3, 64.7)       # Rubin pixels
GALAXY_XY = (88.2, 63.6)


@pytest.fixture(scope='module')
def injected_tile():
  config = dataclasses.replace(
      simulate.SimConfig(), size=128,
      population=sky.PopulationConfig(galaxy_density_scale=0.0, star_density=0.0))
  extra = sky.concat_sources([
      sky.make_stars(*STAR_XY, mag_ref=18.0, temperature=5000.0),
      sky.make_galaxies(*GALAXY_XY, mag_ref=19.0, redshift=0.6, sed='Sbc', bulge_frac=0.3,
                        hlr_disk=0.6, hlr_bulge=0.25, q_disk=0.6, q_bulge=0.9, beta_deg=30.0)])
  return simulate.simulate_tile(3, seed=11, config=config, registry=REGISTRY,
                                extra_sources=extra)


@pytest.fixture(scope='module')
def realistic_tile():
  return simulate.simulate_tile(0, seed=5, config=dataclasses.replace(simulate.SimConfig(),
                                                                      size=128),
                                registry=REGISTRY, keep_model=True)


def _band_xy(tile, band, row):
  """True position of truth row `row` in `band`: WCS position + the band's offset."""
  inst = band.instrument
  meta = tile.meta['bands'][band.name]
  return (tile.truth[f'x_{inst}'][row] + meta['dx_mas'] / (1000 * band.pixel_scale),
          tile.truth[f'y_{inst}'][row] + meta['dy_mas'] / (1000 * band.pixel_scale))


def _aperture(image, x, y, radius_px):
  yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
  return (xx - x)**2 + (yy - y)**2 <= radius_px**2


def _centroid(image, x, y, radius_px, iterations=6):
  """Unweighted first moment in a circular aperture re-centred on the estimate.

  Unbiased for a point-symmetric PSF whose (PSF x pixel) transform vanishes at the
  sampling frequency, which holds here (Airy and Kolmogorov are band-limited below it).
  """
  yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
  for _ in range(iterations):
    sel = _aperture(image, x, y, radius_px)
    flux = image[sel].sum()
    x, y = (image[sel] * xx[sel]).sum() / flux, (image[sel] * yy[sel]).sum() / flux
  return x, y


@pytest.mark.parametrize('band_name', REGISTRY.names)
def test_bright_star_centroid_matches_truth(injected_tile, band_name):
  band = REGISTRY[band_name]
  image = injected_tile.images[band.instrument][band.index]
  star = int(np.flatnonzero(injected_tile.truth['type'] == 'star')[0])
  x_true, y_true = _band_xy(injected_tile, band, star)
  radius = 2.0 / band.pixel_scale                                   # 2 arcsec
  x, y = _centroid(image, round(x_true), round(y_true), radius)
  assert abs(x - x_true) < 0.05 and abs(y - y_true) < 0.05, (x - x_true, y - y_true)


def test_band_offsets_are_tens_of_mas_and_recorded(injected_tile):
  offsets = np.array([[m['dx_mas'], m['dy_mas']] for m in injected_tile.meta['bands'].values()])
  assert offsets.shape == (len(REGISTRY), 2)
  assert np.all(np.abs(offsets) <= 60) and np.abs(offsets).max() > 5


@pytest.mark.parametrize('source', ['star', 'galaxy'])
def test_flux_ratios_between_bands_match_truth(injected_tile, source):
  row = int(np.flatnonzero(injected_tile.truth['type'] == source)[0])
  ref = REGISTRY['rubin_i']
  measured, expected, noise = {}, {}, {}
  for band in REGISTRY:
    image = injected_tile.images[band.instrument][band.index]
    rms = injected_tile.rms[band.instrument][band.index]
    x, y = _band_xy(injected_tile, band, row)
    # A 4" radius aperture holds > 97% of every PSF (the Airy wings at H are the widest).
    sel = _aperture(image, x, y, 4.0 / band.pixel_scale)
    measured[band.name] = image[sel].sum()
    expected[band.name] = injected_tile.truth[f'flux_{band.name}'][row]
    # Background noise of the sum (NISP noise is correlated over 3x3 pixels: x3).
    noise[band.name] = np.sqrt((rms[sel]**2).sum()) * observe.band_physics(band).resample
  for band in REGISTRY:
    ratio = measured[band.name] / measured[ref.name]
    truth_ratio = expected[band.name] / expected[ref.name]
    tolerance = 0.025 + 3 * noise[band.name] / expected[band.name]
    assert ratio == pytest.approx(truth_ratio, rel=tolerance), (band.name, tolerance)
  # Colours really differ across bands (so the check above is not trivially 1 = 1).
  ratios = [expected[b] / expected[ref.name] for b in REGISTRY.names]
  assert max(ratios) / min(ratios) > 2


@pytest.mark.parametrize('band_name', REGISTRY.names)
def test_noise_in_empty_regions_matches_rms(realistic_tile, band_name):
  band = REGISTRY[band_name]
  inst = band.instrument
  image = realistic_tile.images[inst][band.index]
  rms = realistic_tile.rms[inst][band.index]
  model = realistic_tile.models[inst][band.index]
  empty = model < 0.05 * rms                       # source light below 5% of the noise
  assert empty.mean() > 0.1
  pulls = (image / rms)[empty]
  # NISP noise is correlated over resample^2 pixels: fewer independent samples.
  n_independent = pulls.size / observe.band_physics(band).resample**2
  assert pulls.std() == pytest.approx(1.0, abs=0.02 + 3 / np.sqrt(2 * n_independent))
  # Faint wings below the 5% cut add a small positive mean.
  assert abs(pulls.mean()) < 0.04 + 3 / np.sqrt(n_independent)
  assert np.all(rms > 0) and rms.dtype == np.float32


def test_most_pixels_are_empty_sky(realistic_tile):
  # The JAISP premise: ~90% of pixels hold no source light above the noise.
  band = REGISTRY['rubin_r']
  model = realistic_tile.models['rubin'][band.index]
  rms = realistic_tile.rms['rubin'][band.index]
  assert 0.7 < (model < rms).mean() < 0.97


def _concentration(image, x, y, pixel_scale):
  """Fraction of the light within 2" that falls within 0.25"."""
  inner = image[_aperture(image, x, y, 0.25 / pixel_scale)].sum()
  return inner / image[_aperture(image, x, y, 2.0 / pixel_scale)].sum()


def test_euclid_vis_is_sharper_than_rubin_r(injected_tile):
  import galsim
  vis, r_band = REGISTRY['euclid_vis'], REGISTRY['rubin_r']
  galaxy = int(np.flatnonzero(injected_tile.truth['type'] == 'galaxy')[0])
  star = int(np.flatnonzero(injected_tile.truth['type'] == 'star')[0])
  sigmas = {}
  for band in (vis, r_band):
    image = injected_tile.images[band.instrument][band.index]
    x, y = _band_xy(injected_tile, band, galaxy)
    moments = galsim.Image(np.ascontiguousarray(image), scale=band.pixel_scale,
                           xmin=0, ymin=0).FindAdaptiveMom(
                               guess_centroid=galsim.PositionD(x, y))
    sigmas[band.name] = moments.moments_sigma * band.pixel_scale           # arcsec
  assert sigmas['euclid_vis'] < 0.6 * sigmas['rubin_r'], sigmas
  # The star (too small for adaptive moments in VIS): far more concentrated in VIS.
  conc = {b.name: _concentration(injected_tile.images[b.instrument][b.index],
                                 *_band_xy(injected_tile, b, star), b.pixel_scale)
          for b in (vis, r_band)}
  assert conc['euclid_vis'] > 3 * conc['rubin_r'], conc


def test_injection_leaves_the_random_population_unchanged():
  config = dataclasses.replace(simulate.SimConfig(), size=32)
  plain = simulate.simulate_tile(2, seed=3, config=config, registry=REGISTRY)
  extra = sky.make_stars(16.0, 16.0, mag_ref=22.0, temperature=6000.0)
  injected = simulate.simulate_tile(2, seed=3, config=config, registry=REGISTRY,
                                    extra_sources=extra)
  n = len(plain.truth['id'])
  assert len(injected.truth['id']) == n + 1
  np.testing.assert_array_equal(plain.truth['ra'], injected.truth['ra'][:n])
  assert plain.meta['bands'] == injected.meta['bands']


# -- files, determinism, command line ---------------------------------------------------

def _read_field(out, field):
  arrays = {}
  for inst in REGISTRY.instruments:
    folder = os.path.join(out, f'{inst}_tiles_{field}')
    for name in sorted(os.listdir(folder)):
      with np.load(os.path.join(folder, name)) as f:     # allow_pickle=False by default
        arrays[(inst, name)] = {k: f[k] for k in f.files}
  return arrays


@pytest.fixture(scope='module')
def small_fields(tmp_path_factory):
  """The same small field simulated twice: one worker and two worker processes."""
  config = dataclasses.replace(simulate.SimConfig(), size=32)
  outs = []
  for workers in (1, 2):
    out = str(tmp_path_factory.mktemp(f'field_w{workers}'))
    simulate.simulate_field(out, 'small', n_tiles=3, seed=7, config=config, registry=REGISTRY,
                            workers=workers)
    outs.append(out)
  return outs


def test_same_seed_gives_identical_files_for_any_workers(small_fields):
  for name in ('truth_small.ecsv', 'tiles_small.json', 'rubin_tiles_small/tile_0002.npz',
               'euclid_tiles_small/tile_0001.npz'):
    digests = {hashlib.sha256(pathlib.Path(out, name).read_bytes()).hexdigest()
               for out in small_fields}
    assert len(digests) == 1, name                     # byte-identical files
  one, two = (_read_field(out, 'small') for out in small_fields)
  assert one.keys() == two.keys() and len(one) == 6
  for key in one:
    for name in ('image', 'rms'):
      np.testing.assert_array_equal(one[key][name], two[key][name])
  t1, m1 = truth.load_truth(small_fields[0], 'small')
  t2, m2 = truth.load_truth(small_fields[1], 'small')
  assert m1 == m2
  for name in t1.colnames:
    np.testing.assert_array_equal(np.asarray(t1[name]), np.asarray(t2[name]))


def test_different_seed_gives_a_different_sky():
  config = dataclasses.replace(simulate.SimConfig(), size=32)
  a = simulate.simulate_tile(0, seed=1, config=config, registry=REGISTRY)
  b = simulate.simulate_tile(0, seed=2, config=config, registry=REGISTRY)
  assert not np.array_equal(a.images['rubin'], b.images['rubin'])


def test_tile_files_have_exactly_image_and_rms(small_fields):
  arrays = _read_field(small_fields[0], 'small')
  for (inst, name), content in arrays.items():
    assert set(content) == {'image', 'rms'}, name
    size = 32 * (2 if inst == 'euclid' else 1)
    for key in ('image', 'rms'):
      assert content[key].dtype == np.float32
      assert content[key].shape == (REGISTRY.n_bands(inst), size, size)
      assert np.all(np.isfinite(content[key]))
  assert sorted(n for i, n in arrays if i == 'rubin') == [
      'tile_0000.npz', 'tile_0001.npz', 'tile_0002.npz']
  leftovers = [n for inst in REGISTRY.instruments
               for n in os.listdir(os.path.join(small_fields[0], f'{inst}_tiles_small'))
               if not n.endswith('.npz')]
  assert leftovers == []


def test_truth_positions_agree_with_the_wcs(small_fields):
  table = Table.read(os.path.join(small_fields[0], 'truth_small.ecsv'))   # no code of ours
  with open(os.path.join(small_fields[0], 'tiles_small.json')) as f:
    tiles = json.load(f)
  assert set(np.unique(table['tile'])) == set(tiles['tiles'])
  for name, meta in tiles['tiles'].items():
    rows = table[table['tile'] == name]
    for inst in REGISTRY.instruments:
      wcs = WCS(meta['instruments'][inst]['wcs'])
      x, y = wcs.world_to_pixel_values(rows['ra'], rows['dec'])   # origin 0
      np.testing.assert_allclose(x, rows[f'x_{inst}'], atol=1e-6)
      np.testing.assert_allclose(y, rows[f'y_{inst}'], atol=1e-6)
  # Pixel convention: the Rubin pixel centre (0, 0) sits at Euclid (0.5, 0.5).
  np.testing.assert_allclose(table['x_euclid'], 2 * table['x_rubin'] + 0.5, atol=1e-9)
  for band in REGISTRY.names:
    flux, mag = np.asarray(table[f'flux_{band}']), np.asarray(table[f'mag_{band}'])
    pos = flux > 0
    np.testing.assert_allclose(mag[pos], 31.4 - 2.5 * np.log10(flux[pos]), atol=1e-9)


def test_tiles_are_distinct_patches_of_sky(small_fields):
  _, tiles = truth.load_truth(small_fields[0], 'small')
  centres = np.array([t['center_deg'] for t in tiles['tiles'].values()])
  side_deg = 32 * 0.2 / 3600
  for i in range(len(centres)):
    for j in range(i):
      d_ra = (centres[i, 0] - centres[j, 0]) * np.cos(np.deg2rad(centres[i, 1]))
      d_dec = centres[i, 1] - centres[j, 1]
      assert max(abs(d_ra), abs(d_dec)) > side_deg


def test_damaged_truth_files_are_one_user_error_naming_the_file(small_fields, tmp_path):
  from jaisp_jax.cli import UserError
  src = pathlib.Path(small_fields[0])
  for name in (truth.truth_path(src, 'small'), truth.tiles_path(src, 'small')):
    (tmp_path / os.path.basename(name)).write_bytes(pathlib.Path(name).read_bytes())
  assert len(truth.load_truth(str(tmp_path), 'small')[0]) > 0
  cat, tiles = truth.truth_path(str(tmp_path), 'small'), truth.tiles_path(str(tmp_path), 'small')
  good_tiles = pathlib.Path(tiles).read_text()
  for path, text, why in ((tiles, good_tiles[:40], 'cannot read it as JSON'),
                          (tiles, '{"size": 32}', 'not a tiles file'),
                          (cat, '# %ECSV 1.0\n# ---\n# datatype: [oops\n', 'cannot read the truth')):
    keep = pathlib.Path(path).read_text()
    pathlib.Path(path).write_text(text)
    with pytest.raises(UserError, match=why) as err:
      truth.load_truth(str(tmp_path), 'small')
    assert str(path) in str(err.value)
    pathlib.Path(path).write_text(keep)
  os.remove(cat)
  with pytest.raises(UserError, match='cannot read the truth catalog'):
    truth.load_truth(str(tmp_path), 'small')


def test_band_positions_include_the_offsets(small_fields):
  table, tiles = truth.load_truth(small_fields[0], 'small')
  x, y = truth.band_positions(table, tiles, 'euclid_h')
  rows = np.asarray(table['tile']) == 'tile_0001'
  off = tiles['tiles']['tile_0001']['bands']['euclid_h']
  np.testing.assert_allclose(x[rows] - np.asarray(table['x_euclid'])[rows], off['dx_mas'] / 100)
  np.testing.assert_allclose(y[rows] - np.asarray(table['y_euclid'])[rows], off['dy_mas'] / 100)


def _run_cli(*args):
  return subprocess.run([sys.executable, '-m', 'jaisp_jax.data.simulate', *args],
                        capture_output=True, text=True, timeout=300)


def test_command_line_contract(tmp_path):
  out = tmp_path / 'sky'
  result = _run_cli('--out', str(out), '--field', 'cli', '--n-tiles', '2', '--seed', '4',
                    '--size', '24', '--workers', '1', '--preview')
  assert result.returncode == 0, result.stderr
  for inst, size in (('rubin', 24), ('euclid', 48)):
    for k in range(2):
      with np.load(out / f'{inst}_tiles_cli' / f'tile_{k:04d}.npz') as f:
        assert sorted(f.files) == ['image', 'rms']
        assert f['image'].shape == (REGISTRY.n_bands(inst), size, size)
  assert (out / 'truth_cli.ecsv').exists() and (out / 'tiles_cli.json').exists()
  assert (out / 'preview_cli.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_command_line_refuses_to_mix_with_tiles_of_another_run(tmp_path):
  args = ['--out', str(tmp_path), '--field', 'mix', '--seed', '0', '--size', '16',
          '--workers', '1']
  assert _run_cli(*args, '--n-tiles', '3').returncode == 0
  again = _run_cli(*args, '--n-tiles', '3')                      # same run: overwrites
  assert again.returncode == 0, again.stderr
  fewer = _run_cli(*args, '--n-tiles', '2')
  assert fewer.returncode == 2 and 'tile_0002.npz' in fewer.stderr
  assert len(fewer.stderr.strip().splitlines()) == 1
  # The refused run changed nothing: the field keeps its truth.
  assert len(truth.load_truth(str(tmp_path), 'mix')[0]) > 0


@pytest.mark.parametrize('bad', [['--n-tiles', '0'], ['--n-tiles', 'many'], ['--size', '4'],
                                 ['--field', 'a/b']])
def test_command_line_bad_argument_is_one_line(tmp_path, bad):
  args = {'--out': str(tmp_path / 'x'), '--field': 'f', '--n-tiles': '1', '--seed': '0'}
  args.update(dict(zip(bad[::2], bad[1::2])))
  result = _run_cli(*[s for kv in args.items() for s in kv])
  assert result.returncode == 2
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and bad[0] in lines[0], result.stderr
  assert 'Traceback' not in result.stderr


def test_command_line_out_under_a_file_is_one_line(tmp_path):
  (tmp_path / 'afile').write_text('x')
  result = _run_cli('--out', str(tmp_path / 'afile' / 'sub'), '--field', 'f', '--n-tiles', '1',
                    '--seed', '0')
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert '--out' in lines[0] and 'not a folder' in lines[0]


def test_interrupted_resimulation_leaves_no_truth_of_other_tiles(tmp_path, monkeypatch):
  out = str(tmp_path)
  config = dataclasses.replace(simulate.SimConfig(), size=16)
  simulate.simulate_field(out, 'f', n_tiles=3, seed=0, config=config, registry=REGISTRY,
                          workers=1)
  old_truth = truth.load_truth(out, 'f')[0]
  # Re-simulate with another seed, interrupted (as by Ctrl-C) after two of three tiles.
  original = simulate._simulate_and_write
  done = []

  def interrupted(task):
    if len(done) == 2:
      raise KeyboardInterrupt
    done.append(task[0])
    return original(task)

  monkeypatch.setattr(simulate, '_simulate_and_write', interrupted)
  with pytest.raises(KeyboardInterrupt):
    simulate.simulate_field(out, 'f', n_tiles=3, seed=7, config=config, registry=REGISTRY,
                            workers=1)
  monkeypatch.undo()
  # A mix of seeds on disk (tiles 0, 1 new; tile 2 old) ...
  layouts = simulate.tile_layout(3, config, REGISTRY)
  for k, seed in ((0, 7), (2, 0)):
    tile = simulate.simulate_tile(k, seed, config, REGISTRY, center_deg=layouts[k]['center_deg'],
                                  n_tiles=3)
    with np.load(os.path.join(out, 'rubin_tiles_f', tile.name + '.npz')) as f:
      np.testing.assert_array_equal(f['image'], tile.images['rubin'])
  # ... and no truth catalog or tiles file claiming to describe them.
  assert not os.path.exists(truth.truth_path(out, 'f'))
  assert not os.path.exists(truth.tiles_path(out, 'f'))
  # Finishing the run brings a truth that matches its tiles back.
  simulate.simulate_field(out, 'f', n_tiles=3, seed=7, config=config, registry=REGISTRY,
                          workers=1)
  table, tiles = truth.load_truth(out, 'f')
  assert tiles['seed'] == 7 and table.meta['seed'] == 7
  assert len(table) != len(old_truth) or not np.array_equal(table['ra'], old_truth['ra'])
