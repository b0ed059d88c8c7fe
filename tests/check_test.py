"""`python -m jaisp_jax.data.check`: summary on good folders, one line per bad file."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from jaisp_jax import bands, cli
from jaisp_jax.data import check

RNG = np.random.default_rng(1)
H = 12
RUBIN_RMS, EUCLID_RMS = 0.04, 0.25


def write(path, n_bands, size, rms=0.05, dtype=np.float32):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = RNG.normal(0, rms, (n_bands, size, size)).astype(dtype)
  np.savez(path, image=image, rms=np.full_like(image, rms))
  return path


def make_folders(root, n=3):
  r, e = root / 'rubin_tiles_f', root / 'euclid_tiles_f'
  for i in range(n):
    write(r / f'tile_{i:04d}.npz', 6, H, RUBIN_RMS)
    write(e / f'tile_{i:04d}.npz', 4, 2 * H, EUCLID_RMS)
  return r, e


def run_check(capsys, *argv):
  status = cli.run(check.main, list(map(str, argv)), prog='check')
  out, err = capsys.readouterr()
  assert 'Traceback' not in out + err
  return status, out, err


def test_good_folders_exit_zero_with_summary(tmp_path, capsys):
  r, e = make_folders(tmp_path)
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e)
  assert status == 0 and err == ''
  assert out.splitlines()[0].startswith('3 of 3 tile pair(s) usable (0 bad file(s)')
  assert f'rubin: 3 tiles in {r}, 6 bands, 0.2"/px, shapes 6x{H}x{H} (3)' in out
  assert f'euclid: 3 tiles in {e}, 4 bands, 0.1"/px, shapes 4x{2 * H}x{2 * H} (3)' in out
  for name in bands.default_registry().names:
    rms = RUBIN_RMS if name.startswith('rubin') else EUCLID_RMS
    row = next(line.split() for line in out.splitlines() if line.split()[:1] == [name])
    assert row[1:5] == ['0.000%', '0.000%', '0.000%', '0']   # NaN, bad rms, masked, missing
    assert float(row[5]) == pytest.approx(rms, rel=2e-3)
  assert out.rstrip().endswith('check: OK')


def test_one_line_per_bad_file_and_nonzero_exit(tmp_path, capsys):
  r, e = make_folders(tmp_path)
  np.savez(r / 'tile_0001.npz', image=np.zeros((6, H, H), np.float32))      # no rms
  write(e / 'tile_0002.npz', 4, 2 * H + 3)                                 # not 2x
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e)
  assert status == cli.EXIT_INVALID_INPUT
  lines = err.splitlines()
  assert lines[0] == f"{r / 'tile_0001.npz'}: missing key 'rms' (keys found: image)"
  assert lines[1].startswith(f"{e / 'tile_0002.npz'}: euclid tile is {2 * H + 3}x{2 * H + 3} px")
  assert lines[2] == 'check: 2 bad file(s); 1 of 3 tile pair(s) usable' and len(lines) == 3


def test_several_problems_of_one_file_share_its_line(tmp_path, capsys):
  r, e = make_folders(tmp_path, n=1)
  image = RNG.normal(size=(6, H, H)).astype(np.float32)
  image[0, 0, 0] = np.nan
  rms = np.ones_like(image)
  rms[1, 0, 0] = 0
  np.savez(r / 'tile_0000.npz', image=image, rms=rms)
  status, _, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e, '--strict')
  assert status == 1
  line = err.splitlines()[0]
  assert line.startswith(f"{r / 'tile_0000.npz'}: rubin_u: 1 NaN/Inf image pixel(s)")
  assert '; rubin_g: 1 rms pixel(s) masked (1 zero' in line


def test_missing_and_empty_folders_are_one_line_usage_errors(tmp_path, capsys):
  r, _ = make_folders(tmp_path, n=1)
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', tmp_path / 'nope')
  assert status == cli.EXIT_USAGE
  assert err == f'check: error: {tmp_path / "nope"}: folder does not exist\n'
  (tmp_path / 'empty').mkdir()
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', tmp_path / 'empty')
  assert status == cli.EXIT_USAGE and 'empty: no tile files' in err and err.count('\n') == 1
  status, out, err = run_check(capsys)
  assert status == cli.EXIT_USAGE and 'no tile folder' in err


def test_unpaired_tiles_fail_unless_allowed(tmp_path, capsys):
  r, e = make_folders(tmp_path)
  extra = write(r / 'tile_0099.npz', 6, H)
  status, _, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e)
  assert status == 1 and err.splitlines()[0] == (
      f'{extra}: unpaired: no euclid tile named tile_0099 in {e}')
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e, '--allow-unpaired')
  assert status == 0 and err == ''
  assert '3 of 3 tile pair(s) usable (0 bad file(s), 1 skipped unpaired' in out
  assert f'skipped: {extra}: unpaired' in out


def test_size_tolerance_flag(tmp_path, capsys):
  r, e = make_folders(tmp_path, n=1)
  write(e / 'tile_0000.npz', 4, 2 * H + 2)
  assert run_check(capsys, '--rubin-dir', r, '--euclid-dir', e)[0] == 1
  status, out, _ = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e, '--size-tolerance', 2)
  assert status == 0
  assert f'note: {e / "tile_0000.npz"}: euclid tile cropped from {2 * H + 2}x{2 * H + 2}' in out
  assert f'shapes 4x{2 * H}x{2 * H} (1)' in out   # stats are of the cropped tile
  assert run_check(capsys, '--rubin-dir', r, '--euclid-dir', e, '--size-tolerance', -1)[0] == 2


def test_nan_pixels_warn_by_default_and_fail_with_strict(tmp_path, capsys):
  r, e = make_folders(tmp_path, n=2)
  image = RNG.normal(size=(4, 2 * H, 2 * H)).astype(np.float32)
  image[1, :H] = np.nan          # a quarter of euclid_y over the two tiles
  np.savez(e / 'tile_0000.npz', image=image, rms=np.ones_like(image))
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e)
  assert status == 0 and err == ''
  row = next(line.split() for line in out.splitlines() if line.strip().startswith('euclid_y'))
  assert row[1] == '25.000%' and row[3] == '25.000%'
  assert f'warning: {e / "tile_0000.npz"}: euclid_y: {H * 2 * H} NaN/Inf image pixel(s)' in out
  status, _, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e, '--strict')
  assert status == 1 and err.startswith(f'{e / "tile_0000.npz"}: euclid_y:')


def test_any_instruments_via_dir_and_bands_json(tmp_path, capsys):
  reg = bands.DEFAULT_BANDS + [
      dict(name='hst_f606w', instrument='hst', pixel_scale=0.05, wavelength_nm=590.0, index=0),
      dict(name='hst_f814w', instrument='hst', pixel_scale=0.05, wavelength_nm=805.0, index=1)]
  (tmp_path / 'bands.json').write_text(json.dumps(reg))
  r, e = make_folders(tmp_path, n=2)
  for i in range(2):
    write(tmp_path / 'hst' / f'tile_{i:04d}.npz', 2, 4 * H)
  status, out, err = run_check(capsys, '--rubin-dir', r, '--dir', f'euclid={e}', '--dir',
                               f'hst={tmp_path / "hst"}', '--bands', tmp_path / 'bands.json')
  assert status == 0, err
  assert f'hst: 2 tiles in {tmp_path / "hst"}, 2 bands, 0.05"/px, shapes 2x{4 * H}x{4 * H}' in out
  assert 'hst_f814w' in out
  # Without the registry file the instrument is unknown.
  status, _, err = run_check(capsys, '--dir', f'hst={tmp_path / "hst"}')
  assert status == 2 and "unknown instrument 'hst'" in err
  (tmp_path / 'bad.json').write_text('[{"name": "x"}]')
  status, _, err = run_check(capsys, '--rubin-dir', r, '--bands', tmp_path / 'bad.json')
  assert status == 2 and err.startswith(f'check: error: {tmp_path / "bad.json"}: invalid band')
  for text, why in (('[{"name": ', 'cannot read it as JSON'), ('{"bands": []}', 'expected a JSON array')):
    (tmp_path / 'bad.json').write_text(text)
    status, _, err = run_check(capsys, '--rubin-dir', r, '--bands', tmp_path / 'bad.json')
    assert status == 2 and err.startswith(f'check: error: {tmp_path / "bad.json"}: {why}'), err
  status, _, err = run_check(capsys, '--rubin-dir', r, '--bands', tmp_path / 'none.json')
  assert status == 2 and f'{tmp_path / "none.json"}: cannot read it' in err


def test_streaming_median_rms_matches_numpy(tmp_path):
  r = tmp_path / 'r'
  all_rms = []
  for i in range(4):
    rms = RNG.lognormal(-3, 1, (6, H, H)).astype(np.float32)
    rms[0, i, :] = 0                          # masked pixels stay out of the median
    np.savez(write(r / f't{i}.npz', 6, H), image=np.zeros_like(rms), rms=rms)
    all_rms.append(rms)
  report = check.validate_folders({'rubin': r})
  assert report.ok and report.n_ok == 4 and report.max_sky_offset_arcsec is None
  for c, band in enumerate(report.stats['rubin'].bands):
    values = np.concatenate([x[c].ravel() for x in all_rms])
    assert band.median_rms() == pytest.approx(np.median(values[values > 0]), rel=2e-3)
  assert report.stats['rubin'].bands[0].n_bad_rms == 4 * H
  assert len(report.warnings) == 4


def test_python_dash_m_entry_point(tmp_path):
  r, e = make_folders(tmp_path, n=1)
  np.savez(e / 'tile_0000.npz', image=np.zeros((4, 2 * H, 2 * H), dtype=object),
           rms=np.ones((4, 2 * H, 2 * H)))
  proc = subprocess.run([sys.executable, '-m', 'jaisp_jax.data.check', '--rubin-dir', str(r),
                         '--euclid-dir', str(e)], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr
  assert proc.stderr.splitlines()[0] == (
      f"{e / 'tile_0000.npz'}: 'image' is an object array; refusing to unpickle it "
      '(allow_pickle=False): store a numeric array')


@pytest.mark.parametrize('flag,value,match', [('--max-warnings', '-1', 'max-warnings must be >= 0'),
                                              ('--sky-tolerance', '-5', 'sky-tolerance must be >= 0'),
                                              ('--sky-tolerance', 'nan', 'sky-tolerance must be >= 0')])
def test_negative_counts_and_tolerances_are_flag_errors(tmp_path, capsys, flag, value, match):
  r, e = make_folders(tmp_path)
  status, out, err = run_check(capsys, '--rubin-dir', r, '--euclid-dir', e, flag, value)
  assert status == 2 and match in err


def test_broken_link_and_non_utf8_name_are_each_one_line_naming_the_file(tmp_path):
  r, e = make_folders(tmp_path)
  link = r / 'tile_0000.npz'
  link.unlink()
  link.symlink_to(tmp_path / 'moved_away.npz')
  for folder in (r, e):   # a name the dataset could not store as text
    os.rename(bytes(folder / 'tile_0001.npz'), bytes(folder) + b'/tile_\xff.npz')
  # In a subprocess: the real stderr, which must print such a name without failing.
  proc = subprocess.run([sys.executable, '-m', 'jaisp_jax.data.check', '--rubin-dir', str(r),
                         '--euclid-dir', str(e)], capture_output=True, text=True,
                        errors='backslashreplace', timeout=120)
  assert proc.returncode == cli.EXIT_INVALID_INPUT and 'Traceback' not in proc.stderr
  lines = proc.stderr.splitlines()
  assert lines[-1] == 'check: 3 bad file(s); 1 of 2 tile pair(s) usable'
  assert sum(l.startswith(f'{link}: broken symbolic link') for l in lines) == 1
  assert sum('tile_' in l and 'not valid UTF-8' in l for l in lines) == 2
  assert not any('unpaired' in l for l in lines)
