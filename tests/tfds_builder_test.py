"""TFDS chip dataset: read back equals input, split by sky region, atomic, clear errors."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaisp_jax import bands
from jaisp_jax.cli import UserError
from jaisp_jax.data import build as build_cli
from jaisp_jax.data import tfds_builder

REG = bands.default_registry()
CHIP = 16  # Rubin px; Euclid 32


def _write_tiles(root, tiles):
  """Seed layout: root/rubin, root/euclid with tile_<name>.npz holding image and rms."""
  dirs = {inst: root / inst for inst in ('rubin', 'euclid')}
  for d in dirs.values():
    d.mkdir(parents=True, exist_ok=True)
  for name, parts in tiles.items():
    for inst, (image, rms) in parts.items():
      np.savez(dirs[inst] / f'{name}.npz', image=image, rms=rms)
  return {k: str(v) for k, v in dirs.items()}


def _random_tile(rng, size=32, scale=1.0):
  out = {}
  for inst, f in (('rubin', 1), ('euclid', 2)):
    nb = REG.n_bands(inst)
    rms = rng.uniform(0.5, 2.0, size=(nb, 1, 1)).astype(np.float32) * scale
    rms = np.broadcast_to(rms, (nb, size * f, size * f)).copy()
    out[inst] = ((rms * rng.standard_normal(rms.shape)).astype(np.float32), rms)
  return out


def _read_split(data_dir, name, split):
  src = tfds.data_source(name, split=split, data_dir=str(data_dir), download=False)
  return [src[i] for i in range(len(src))]


def test_seed_layout_build_reads_back_equal_to_input(tmp_path):
  rng = np.random.default_rng(0)
  tiles = {f'tile_{i}': _random_tile(rng) for i in range(4)}
  # Defects: NaN pixels, and a band masked over a whole chip (rows 0-15, cols 0-15).
  tiles['tile_1']['rubin'][0][2, 3, 4] = np.nan
  tiles['tile_2']['euclid'][1][1, :32, :32] = 0.0
  dirs = _write_tiles(tmp_path / 'tiles', tiles)
  options = tfds_builder.ChipOptions(chip_px=CHIP, val_fraction=0.25)
  report = tfds_builder.build_dataset(dirs, tmp_path / 'd', 'chips', REG, options,
                                      progress=False)
  assert report.n_ok == 4 and sum(report.n_chips.values()) == 16
  assert set(report.n_chips) == {'train', 'validation'}
  records = (_read_split(tmp_path / 'd', 'chips', 'train')
             + _read_split(tmp_path / 'd', 'chips', 'validation'))
  assert len(records) == 16 and len({r['id'] for r in records}) == 16
  for rec in records:
    tile = tiles[rec['tile'].decode()]
    y0, x0 = rec['origin']
    for inst, f in (('rubin', 1), ('euclid', 2)):
      image, rms = tile[inst]
      sl = (slice(None), slice(y0 * f, (y0 + CHIP) * f), slice(x0 * f, (x0 + CHIP) * f))
      want_image = np.nan_to_num(image[sl], nan=0.0)
      want_rms = np.where(np.isfinite(image[sl]) & (rms[sl] > 0), rms[sl], 0.0)
      got = rec['instruments'][inst]
      np.testing.assert_array_equal(got['image'], np.where(want_rms > 0, want_image, 0.0))
      np.testing.assert_array_equal(got['rms'], want_rms)
      valid = want_rms > 0
      np.testing.assert_array_equal(got['band_valid'], valid.mean(axis=(1, 2)) >= 0.5)
      for c in range(len(valid)):
        if valid[c].any():
          assert got['rms_scale'][c] == pytest.approx(np.median(want_rms[c][valid[c]]))
      assert [b.decode() for b in got['band_names']] == [b.name for b in REG.instrument_bands(inst)]
      assert got['pixel_scale'] == pytest.approx(REG.pixel_scale(inst))
    assert np.isnan(rec['sky']).all() and len(rec['truth_rows']) == 0
  masked = [r for r in records if r['tile'] == b'tile_2' and tuple(r['origin']) == (0, 0)]
  assert not masked[0]['instruments']['euclid']['band_valid'][1]
  meta = tfds_builder.read_metadata(tmp_path / 'd', 'chips')
  assert bands.BandRegistry.from_dicts(meta['registry']) == REG and meta['chip_px'] == CHIP


def test_overlapping_tiles_never_straddle_the_split(tmp_path):
  rng = np.random.default_rng(1)
  # Tiles cut from one mosaic with overlaps (pixel-identical where they overlap).
  mosaic = {inst: rng.standard_normal((REG.n_bands(inst), 32 * f, 320 * f)).astype(np.float32)
            for inst, f in (('rubin', 1), ('euclid', 2))}
  starts = {'t0': 0, 't1': 20, 't2': 40, 't3': 100, 't4': 120, 't5': 200, 't6': 280}
  tiles = {}
  for name, x in starts.items():
    tiles[name] = {inst: (m[:, :, x * f:(x + 32) * f], np.ones_like(m[:, :, x * f:(x + 32) * f]))
                   for (inst, m), f in zip(mosaic.items(), (1, 2))}
  dirs = _write_tiles(tmp_path / 'tiles', tiles)
  options = tfds_builder.ChipOptions(chip_px=CHIP, val_fraction=0.4, split_seed=5)
  tfds_builder.build_dataset(dirs, tmp_path / 'd', 'ov', REG, options, progress=False)
  side = {}
  for split in ('train', 'validation'):
    for rec in _read_split(tmp_path / 'd', 'ov', split):
      side.setdefault(rec['tile'].decode(), set()).add(split)
  assert all(len(s) == 1 for s in side.values())
  groups = [('t0', 't1', 't2'), ('t3', 't4')]  # chains of overlapping tiles
  for group in groups:
    assert len({next(iter(side[t])) for t in group}) == 1, group
  assert {next(iter(s)) for s in side.values()} == {'train', 'validation'}


def _bad_folder(tmp_path):
  rng = np.random.default_rng(2)
  tiles = {f'tile_{i}': _random_tile(rng) for i in range(3)}
  dirs = _write_tiles(tmp_path / 'tiles', tiles)
  (pathlib.Path(dirs['rubin']) / 'tile_1.npz').write_bytes(b'PK\x03\x04 truncated')
  img, rms = tiles['tile_2']['euclid']
  np.savez(pathlib.Path(dirs['euclid']) / 'tile_2.npz', image=img[:3], rms=rms[:3])
  return dirs


def test_bad_tiles_fail_with_validator_messages_or_are_skipped_on_request(tmp_path, capsys):
  dirs = _bad_folder(tmp_path)
  argv = ['--rubin-dir', dirs['rubin'], '--euclid-dir', dirs['euclid'],
          '--data-dir', str(tmp_path / 'd'), '--chip-px', str(CHIP), '--no-progress']
  assert build_cli.main(argv) == 1
  err = capsys.readouterr().err.splitlines()
  assert any('tile_1.npz' in l and 'corrupted' in l for l in err)
  assert any('tile_2.npz' in l and 'band(s), expected 4' in l for l in err)
  assert '2 invalid tile file(s)' in err[-1]
  assert not (tmp_path / 'd' / tfds_builder.DEFAULT_NAME).exists()
  assert build_cli.main(argv + ['--skip-invalid']) == 0
  out = capsys.readouterr().out
  assert '1 of 3 tile pair(s) used, 2 invalid skipped' in out
  assert len(_read_split(tmp_path / 'd', tfds_builder.DEFAULT_NAME, 'train')) == 4
  with pytest.raises(UserError, match='already built'):
    build_cli.main(argv + ['--skip-invalid'])
  assert build_cli.main(argv + ['--skip-invalid', '--overwrite']) == 0


_SLOW_BUILD = textwrap.dedent('''
    import sys, time
    from jaisp_jax.data import build, tfds_builder
    original = tfds_builder.chip_records
    def slow(*args, **kwargs):
      for item in original(*args, **kwargs):
        time.sleep(0.5)  # a long build, so the test can kill it while it writes
        yield item
    tfds_builder.chip_records = slow
    sys.exit(build.main(sys.argv[1:]))
''')


def test_killed_build_leaves_nothing_that_looks_complete(tmp_path):
  rng = np.random.default_rng(3)
  dirs = _write_tiles(tmp_path / 'tiles', {f'tile_{i}': _random_tile(rng) for i in range(4)})
  data_dir = tmp_path / 'd'
  argv = ['--rubin-dir', dirs['rubin'], '--euclid-dir', dirs['euclid'], '--data-dir',
          str(data_dir), '--name', 'k', '--chip-px', str(CHIP), '--no-progress']
  proc = subprocess.Popen([sys.executable, '-c', _SLOW_BUILD] + argv,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 60
    while time.time() < deadline and not list(data_dir.glob('.k-building-*/k/*')):
      time.sleep(0.1)
    assert list(data_dir.glob('.k-building-*/k/*')), 'the build never started writing'
    time.sleep(1.0)  # in the middle of writing records
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert not (data_dir / 'k').exists()
  with pytest.raises(UserError, match='no dataset here'):
    tfds_builder.read_metadata(data_dir, 'k')
  with pytest.raises(Exception):
    tfds.data_source('k', split='train', data_dir=str(data_dir), download=False)
  # A new build succeeds and clears the dead build's scratch folder.
  assert build_cli.main(argv) == 0
  assert not list(data_dir.glob('.k-building-*'))
  assert len(_read_split(data_dir, 'k', 'train')) > 0


def test_chip_origins_cover_the_tile_flush_to_the_edges():
  assert tfds_builder.chip_origins(40, 16, 16, 16) == [(0, 0), (16, 0), (24, 0)]
  assert tfds_builder.chip_origins(10, 40, 16, 16) == []
  assert tfds_builder.chip_origins(32, 32, 16, 8) == [
      (y, x) for y in (0, 8, 16) for x in (0, 8, 16)]


def test_simulated_build_keeps_truth_rows_sky_and_pixels(tmp_path):
  from astropy.table import Table
  from jaisp_jax.data import simulate
  argv = ['--simulate', '2', '--size', '64', '--chip-px', '32', '--seed', '7', '--workers', '1',
          '--val-fraction', '0.5', '--data-dir', str(tmp_path / 'd'), '--name', 'sim',
          '--no-progress']
  assert build_cli.main(argv) == 0
  folder = tmp_path / 'd' / 'sim' / tfds_builder.VERSION
  table = Table.read(folder / 'truth_sim.ecsv', format='ascii.ecsv')
  records = _read_split(tmp_path / 'd', 'sim', 'train') + _read_split(tmp_path / 'd', 'sim',
                                                                       'validation')
  assert len(records) == 8 and not list((tmp_path / 'd').glob('.sim-*'))
  layouts = simulate.tile_layout(2, simulate.SimConfig(size=64))
  seen = []
  for rec in records:
    tile = rec['tile'].decode()
    y0, x0 = rec['origin']
    rows = rec['truth_rows']
    assert (np.asarray(table['tile'])[rows] == tile).all()
    x, y = np.asarray(table['x_rubin'])[rows], np.asarray(table['y_rubin'])[rows]
    assert ((x >= x0 - 0.5) & (x < x0 + 31.5) & (y >= y0 - 0.5) & (y < y0 + 31.5)).all()
    seen += rows.tolist()
    assert np.isfinite(rec['sky']).all()
  # Every source whose true position is in a tile is listed by exactly one chip.
  assert sorted(seen) == np.flatnonzero(np.asarray(table['in_tile'])).tolist()
  # Pixels read back equal the simulator's (tiles depend on (seed, index) only).
  sim = simulate.simulate_tile(1, 7, simulate.SimConfig(size=64),
                               center_deg=layouts[1]['center_deg'], n_tiles=2)
  rec = next(r for r in records if r['tile'].decode() == sim.name and tuple(r['origin']) == (32, 0))
  np.testing.assert_array_equal(rec['instruments']['euclid']['image'],
                                sim.images['euclid'][:, 64:128, 0:64])
  np.testing.assert_array_equal(rec['instruments']['rubin']['rms'], sim.rms['rubin'][:, 32:64, :32])


def _run_build(argv, capsys):
  """The command line in-process: (exit status, stderr lines)."""
  from jaisp_jax import cli
  status = cli.run(build_cli.main, argv, prog='build')
  return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize('bad', [['--split-seed', '-1'], ['--simulate', '1', '--seed', '-1'],
                                 ['--simulate', '1', '--workers', '0']])
def test_bad_seed_is_a_flag_error_before_anything_is_written(tmp_path, capsys, bad):
  rng = np.random.default_rng(5)
  data_dir = tmp_path / 'd'
  if bad[0] == '--simulate':
    argv = bad + ['--size', '32']
  else:
    dirs = _write_tiles(tmp_path / 'tiles', {'tile_0': _random_tile(rng)})
    argv = bad + ['--rubin-dir', dirs['rubin'], '--euclid-dir', dirs['euclid']]
  status, err = _run_build(argv + ['--data-dir', str(data_dir), '--chip-px', str(CHIP),
                                   '--no-progress'], capsys)
  flag = [f for f in bad if f in ('--split-seed', '--seed', '--workers')][0]
  assert status == 2 and len(err) == 1 and flag in err[0], err
  assert not data_dir.exists()


def test_unusable_data_dir_is_refused_before_the_tiles_are_read(tmp_path, capsys):
  # Bad tiles: had the tiles been validated first, the build would fail with exit 1.
  dirs = _bad_folder(tmp_path)
  afile = tmp_path / 'afile'
  afile.write_text('x')
  taken = tmp_path / 'taken'
  (taken).mkdir()
  (taken / tfds_builder.DEFAULT_NAME).write_text('x')
  for data_dir, named in ((afile, afile), (afile / 'sub', afile),
                          (taken, taken / tfds_builder.DEFAULT_NAME)):
    status, err = _run_build(['--rubin-dir', dirs['rubin'], '--euclid-dir', dirs['euclid'],
                              '--data-dir', str(data_dir), '--chip-px', str(CHIP),
                              '--no-progress'], capsys)
    assert status == 2 and len(err) == 1 and str(named) in err[0], err
    assert 'not a folder' in err[0]
  assert afile.read_text() == 'x' and (taken / tfds_builder.DEFAULT_NAME).read_text() == 'x'


@pytest.mark.parametrize('name', ['a/b', '.hid', 'my-data', '9lives', ''])
def test_bad_name_is_refused_before_simulating(tmp_path, capsys, name):
  data_dir = tmp_path / 'sd'
  status, err = _run_build(['--simulate', '1', '--size', '32', '--chip-px', '32',
                            '--workers', '1', '--data-dir', str(data_dir), '--name', name,
                            '--no-progress'], capsys)
  assert status == 2 and len(err) == 1 and '--name' in err[0], err
  assert not data_dir.exists()


def test_an_interrupted_build_leaves_no_empty_data_dir_it_created(tmp_path, capsys,
                                                                   monkeypatch):
  # Ctrl-C while simulating (after the data dir was created for the scratch field).
  def interrupted(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(tfds_builder, 'simulate_field', interrupted)
  data_dir = tmp_path / 'new' / 'deeper'
  status, _ = _run_build(['--simulate', '1', '--size', '32', '--data-dir', str(data_dir),
                          '--chip-px', str(CHIP), '--no-progress'], capsys)
  assert status == 130
  assert not (tmp_path / 'new').exists()
  kept = tmp_path / 'kept'  # a --data-dir that existed before is kept
  kept.mkdir()
  status, _ = _run_build(['--simulate', '1', '--size', '32', '--data-dir', str(kept),
                          '--chip-px', str(CHIP), '--no-progress'], capsys)
  assert status == 130 and kept.is_dir() and not list(kept.iterdir())


def test_tiles_smaller_than_the_default_chip_build_with_chips_that_fit(tmp_path, capsys):
  # Another simulator's 24 px tiles: without --chip-px the chip shrinks to fit them.
  from jaisp_jax.data import pipeline
  rng = np.random.default_rng(6)
  dirs = _write_tiles(tmp_path / 'tiles', {f'tile_{i}': _random_tile(rng, size=24)
                                           for i in range(2)})
  argv = ['--rubin-dir', dirs['rubin'], '--euclid-dir', dirs['euclid'], '--no-progress']
  status, err = _run_build(argv + ['--data-dir', str(tmp_path / 'd')], capsys)
  assert status == 0 and any('using chips of 24 px' in l for l in err), err
  assert tfds_builder.read_metadata(tmp_path / 'd', tfds_builder.DEFAULT_NAME)['chip_px'] == 24
  records = (_read_split(tmp_path / 'd', tfds_builder.DEFAULT_NAME, 'train')
             + _read_split(tmp_path / 'd', tfds_builder.DEFAULT_NAME, 'validation'))
  assert len(records) == 2
  assert records[0]['instruments']['euclid']['image'].shape == (4, 48, 48)
  # The pipeline reads it with a crop that fits, and refuses one that does not, up front.
  c = pipeline.default_data_config()
  c.data_dir, c.name, c.pairs_per_batch, c.cache_mb = str(tmp_path / 'd'), \
      tfds_builder.DEFAULT_NAME, 4, 0
  with pytest.raises(UserError, match=r'chips are 4.8" on a side \(24 px\).*crop_arcsec'):
    pipeline.make_dataset(c, REG, data_parallel=1)
  c.crop_arcsec = 3.2
  batch = next(iter(pipeline.make_dataset(c, REG, data_parallel=1)))
  assert batch['pairs']
  # An explicit chip bigger than every tile is an error that says what would fit.
  status, err = _run_build(argv + ['--data-dir', str(tmp_path / 'd2'), '--chip-px', '32'],
                           capsys)
  assert status == 1 and 'at most 24 px (--chip-px)' in err[-1], err
  assert not (tmp_path / 'd2').exists()


@pytest.mark.parametrize('seed', range(4))
def test_a_tile_too_small_for_a_chip_never_leaves_the_train_split_empty(tmp_path, seed):
  rng = np.random.default_rng(7)
  dirs = _write_tiles(tmp_path / 'tiles', {'tile_big': _random_tile(rng, size=CHIP),
                                           'tile_small': _random_tile(rng, size=CHIP // 2)})
  options = tfds_builder.ChipOptions(chip_px=CHIP, val_fraction=0.5, split_seed=seed)
  plan = tfds_builder.plan_build(dirs, REG, options)
  assert plan.report.n_chips == {'train': 1}
  assert plan.report.tiles_too_small == ['tile_small']
