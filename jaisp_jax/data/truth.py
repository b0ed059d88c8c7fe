"""Truth of a simulated field: what was put on the sky, and how each tile observed it.

`python -m jaisp_jax.data.simulate --out DIR --field NAME ...` writes, beside the tile
folders, two files that astropy (or json) reads without our code:

DIR/truth_NAME.ecsv -- an astropy Table (`Table.read(path)`), one row per source per tile,
every source drawn into the tile (including those just outside it whose light spills in):

  tile          str    tile name, e.g. 'tile_0000' (the npz file stem in both folders)
  id            int    source number within the tile
  type          str    'star' or 'galaxy'
  in_tile       bool   the true position lies inside the tile
  ra, dec       deg    true sky position (ICRS)
  x_<inst>, y_<inst>  px   true position in the instrument's tile (x_rubin, y_rubin,
                       x_euclid, y_euclid): 0-based numpy pixel coordinates with pixel
                       CENTRES at integers, so pixel image[b, j, i] covers
                       x in [i - 0.5, i + 0.5], y in [j - 0.5, j + 0.5]; x runs along
                       the last array axis. Same as astropy `wcs.world_to_pixel` (origin
                       0) and GalSim images with bounds starting at 0. The tile centre is
                       x = (W - 1) / 2. Rubin and Euclid: x_euclid = 2 x_rubin + 0.5.
                       These are WCS positions; in band b the source's light is centred
                       at x + dx_mas[b] / (1000 * pixel_scale) (see the tiles file).
  redshift             0 for stars
  sed           str    galaxies: CWW disk template 'E', 'Sbc', 'Scd' or 'Im' (the bulge
                       always has the 'E' spectrum); stars: 'blackbody'
  temperature   K      black-body temperature of stars (0 for galaxies)
  bulge_frac           bulge fraction of the flux in the reference filter (LSST i)
  hlr_disk, hlr_bulge  arcsec  half-light radii (0 for stars; hlr_bulge 0 without bulge)
  n_disk, n_bulge      Sersic indices (1 and 4)
  q_disk, q_bulge      axis ratios b/a
  beta_deg      deg    position angle of the major axes, counter-clockwise from +x
                       (x grows to the West, y to the North in both instruments)
  flux_<band>   nJy    total (bulge + disk) true flux in each band, e.g. flux_rubin_g
  mag_<band>    mag    AB magnitude of flux_<band> (inf where the flux is 0)

DIR/tiles_NAME.json -- a dict:

  field, seed, n_tiles, size, flux_unit ('nJy per pixel'), ab_zeropoint (31.4:
    mag = 31.4 - 2.5 log10(pixel sum in nJy)), pixel_convention, offset_convention,
  bands: {band: static numbers (instrument, index, pixel_scale, survey, filter,
    zeropoint, exposure_time, sky_mag, psf_fwhm, rms ...; see observe.BandPhysics)},
  config: the simulator parameters,
  tiles: {tile name: {
    center_deg: [ra, dec], grid_row_col: [row, col],
    instruments: {inst: {shape: [H, W], pixel_scale, wcs: {FITS header cards}}}
      (TAN projection; `astropy.wcs.WCS(cards)` rebuilds it),
    bands: {band: {dx_mas, dy_mas (astrometric offset along +x / +y pixels),
      psf_fwhm_arcsec, psf_g1, psf_g2, rms_nominal_njy, rms_median_njy, depth_factor,
      rms_gradient, rms_gradient_angle_deg}},
    n_sources, n_in_tile}}

`load_truth(DIR, NAME)` returns both; `tile_wcs` and `band_positions` answer the usual
questions (where is source k in band b of tile t).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

PIXEL_CONVENTION = ('0-based numpy pixel coordinates, pixel centres at integers: '
                    'image[b, j, i] is centred on (x=i, y=j); astropy origin=0')
OFFSET_CONVENTION = ('in band b a source is drawn at x + dx_mas/(1000*pixel_scale), '
                     'y + dy_mas/(1000*pixel_scale) where (x, y) are its WCS pixel '
                     'coordinates from the truth table')

# Column name -> unit for the fixed columns (band columns are added per registry band).
TRUTH_UNITS: dict[str, str | None] = {
    'tile': None, 'id': None, 'type': None, 'in_tile': None, 'ra': 'deg', 'dec': 'deg',
    'redshift': None, 'sed': None, 'temperature': 'K', 'bulge_frac': None,
    'hlr_disk': 'arcsec', 'hlr_bulge': 'arcsec', 'n_disk': None, 'n_bulge': None,
    'q_disk': None, 'q_bulge': None, 'beta_deg': 'deg',
}


def truth_path(out_dir: str, field: str) -> str:
  return os.path.join(out_dir, f'truth_{field}.ecsv')


def tiles_path(out_dir: str, field: str) -> str:
  return os.path.join(out_dir, f'tiles_{field}.json')


def atomic_write(path: str, write_fn, mode: str = 'w') -> None:
  """Writes via `write_fn(file)` to a temporary file beside `path`, then renames it.

  An interrupted run therefore never leaves a half-written file under the final name.
  """
  folder, base = os.path.split(os.path.abspath(path))
  # A unique hidden name in the same folder (os.replace is atomic within a file system);
  # opened normally so the file gets the usual umask permissions.
  tmp = os.path.join(folder, f'.{base}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
  try:
    with open(tmp, mode.replace('w', 'x')) as f:   # 'x': fail rather than clobber
      write_fn(f)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def make_truth_columns(tile: str, cat: Mapping[str, np.ndarray], ra: np.ndarray,
                       dec: np.ndarray, positions: Mapping[str, tuple[np.ndarray, np.ndarray]],
                       in_tile: np.ndarray, band_names: Sequence[str],
                       flux: np.ndarray) -> dict[str, np.ndarray]:
  """Truth columns of one tile, in the documented order.

  Args:
    cat: source catalogue (`sky.SOURCE_COLUMNS`).
    positions: {instrument: (x, y)} WCS pixel positions.
    flux: (n_sources, n_bands) total flux (nJy), bands in `band_names` order.
  """
  from jaisp_jax.data import sky
  n = len(ra)
  cols: dict[str, np.ndarray] = {
      'tile': np.full(n, tile), 'id': np.arange(n, dtype=np.int64),
      'type': np.asarray(cat['type'], dtype=str), 'in_tile': np.asarray(in_tile, bool),
      'ra': np.asarray(ra, np.float64), 'dec': np.asarray(dec, np.float64)}
  for inst, (x, y) in positions.items():
    cols[f'x_{inst}'] = np.asarray(x, np.float64)
    cols[f'y_{inst}'] = np.asarray(y, np.float64)
  for name in ('redshift', 'sed', 'temperature', 'bulge_frac', 'hlr_disk', 'hlr_bulge',
               'n_disk', 'n_bulge', 'q_disk', 'q_bulge', 'beta_deg'):
    cols[name] = np.asarray(cat[name], dtype=str if name == 'sed' else np.float64)
  for j, band in enumerate(band_names):
    cols[f'flux_{band}'] = np.asarray(flux[:, j], np.float64)
  for j, band in enumerate(band_names):
    cols[f'mag_{band}'] = sky.mag_from_njy(flux[:, j])
  return cols


def truth_table(per_tile: Sequence[Mapping[str, np.ndarray]], meta: Mapping[str, Any] = ()):
  """Stacks per-tile truth columns into one astropy Table with units."""
  from astropy.table import Table
  names = list(per_tile[0])
  table = Table({name: np.concatenate([np.asarray(t[name]) for t in per_tile])
                 for name in names})
  for name in names:
    if name in TRUTH_UNITS:
      unit = TRUTH_UNITS[name]
    elif name.startswith(('x_', 'y_')):
      unit = 'pix'
    elif name.startswith('flux_'):
      unit = 'nJy'
    elif name.startswith('mag_'):
      unit = 'mag'
    else:
      unit = None
    if unit:
      table[name].unit = unit
  table.meta.update(dict(meta))
  return table


def write_truth(out_dir: str, field: str, table, tiles: Mapping[str, Any]) -> tuple[str, str]:
  """Writes DIR/truth_NAME.ecsv and DIR/tiles_NAME.json atomically; returns both paths."""
  tpath, jpath = truth_path(out_dir, field), tiles_path(out_dir, field)
  atomic_write(tpath, lambda f: table.write(f, format='ascii.ecsv'))
  atomic_write(jpath, lambda f: json.dump(tiles, f, indent=1, sort_keys=False))
  return tpath, jpath


def load_truth(out_dir: str, field: str):
  """Reads a simulated field's truth: (astropy Table, tiles dict).

  Raises cli.UserError naming the file when either file is missing or unreadable.
  """
  from astropy.table import Table
  from jaisp_jax import cli
  path = truth_path(out_dir, field)
  try:
    table = Table.read(path, format='ascii.ecsv')
  except Exception as e:  # pylint: disable=broad-except  # OSError, ECSV/YAML parse errors
    first = str(e).splitlines()[0] if str(e) else ''
    raise cli.UserError(f'{path}: cannot read the truth catalog ({type(e).__name__}: '
                        f'{first})') from None
  tpath = tiles_path(out_dir, field)
  tiles = cli.read_json(tpath)
  if not isinstance(tiles.get('tiles'), dict):
    raise cli.UserError(f'{tpath}: not a tiles file (no "tiles" object)')
  return table, tiles


def tile_wcs(tiles: Mapping[str, Any], tile: str, instrument: str):
  """astropy WCS of one instrument's tile (pixel coordinates with origin 0 in its API)."""
  from astropy.wcs import WCS
  return WCS(dict(tiles['tiles'][tile]['instruments'][instrument]['wcs']))


def band_positions(table, tiles: Mapping[str, Any], band: str) -> tuple[np.ndarray, np.ndarray]:
  """True pixel positions of every truth row in `band`, astrometric offset included.

  Returns (x, y) arrays aligned with the rows of `table` (any tiles mixed).
  """
  info = tiles['bands'][band]
  inst, scale = info['instrument'], info['pixel_scale']
  x = np.array(table[f'x_{inst}'], dtype=np.float64)
  y = np.array(table[f'y_{inst}'], dtype=np.float64)
  names = np.asarray(table['tile'], dtype=str)
  for tile in np.unique(names):
    offset = tiles['tiles'][tile]['bands'][band]
    sel = names == tile
    x[sel] += offset['dx_mas'] / (1000.0 * scale)
    y[sel] += offset['dy_mas'] / (1000.0 * scale)
  return x, y
