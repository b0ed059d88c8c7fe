"""GalSim sky simulator: paired Rubin / Euclid tiles of a deep field, with truth.

    python -m jaisp_jax.data.simulate --out DIR --field NAME --n-tiles N --seed S \\
        [--size PX] [--preview] [--workers K]

writes DIR/<inst>_tiles_NAME/tile_XXXX.npz for every instrument of the band registry
(rubin: 6 bands u..y at 0.2"/px, PX x PX; euclid: VIS, Y, J, H at 0.1"/px, 2PX x 2PX),
each with exactly the keys `image` and `rms`, float32 (n_bands, H, W) in nJy per pixel,
bands in registry index order (`rms` is the background noise per pixel; bright sources
add their own Poisson noise on top, as in survey rms maps); plus DIR/truth_NAME.ecsv and
DIR/tiles_NAME.json (schema in `jaisp_jax.data.truth`), and with --preview
DIR/preview_NAME.png (tile 0: Rubin gri, Euclid VIS and H, truth positions overlaid).

Speed (launch/bench_simulate.py): ~0.8 CPU s per tile pair of 128 / 256 px, so the
seeds' 144 tile pairs take about a minute on 2 idle cores.

Tiles lie on a square grid around the field centre (ECDFS by default), separated by a
gap wider than twice the source margin, so no patch of sky is in two tiles and a split
by sky region is a split by tile. Tile k is simulated from the seed sequence
(seed, k) alone, so the output is identical for any --workers.

Physics: `jaisp_jax.data.sky` (sources, spectra, band fluxes) and
`jaisp_jax.data.observe` (depth, PSFs, offsets, drawing, noise).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import multiprocessing
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError, check_output_folder, run
from jaisp_jax.data import observe, sky, truth


@dataclasses.dataclass(frozen=True)
class SimConfig:
  """Simulator parameters (population and observing parameters in their modules)."""

  size: int = 128                      # tile side of the coarsest instrument (Rubin), px
  field_center_deg: tuple[float, float] = (53.16, -27.78)   # ECDFS (RA, Dec)
  margin_arcsec: float = 2.0           # sources are also drawn this far outside a tile
  tile_gap_arcsec: float = 5.0         # sky between neighbouring tiles (> 2 margins)
  min_flux_rms: float = 0.01           # skip a source whose band flux < this x pixel rms
  population: sky.PopulationConfig = sky.PopulationConfig()
  observing: observe.ObserveConfig = observe.ObserveConfig()


@dataclasses.dataclass
class SimulatedTile:
  """One simulated tile: images per instrument, truth columns and metadata."""

  name: str
  images: dict[str, np.ndarray]        # instrument -> (n_bands, H, W) float32, nJy/px
  rms: dict[str, np.ndarray]           # instrument -> (n_bands, H, W) float32, nJy/px
  truth: dict[str, np.ndarray]         # truth columns (truth.make_truth_columns)
  meta: dict[str, Any]                 # per-tile metadata (json-able)
  models: dict[str, np.ndarray] | None = None   # noiseless images, if asked for


def tile_name(index: int, n_tiles: int = 0) -> str:
  return f'tile_{index:0{max(4, len(str(max(n_tiles - 1, 0))))}d}'


def instrument_geometry(registry: bands_lib.BandRegistry, size: int) -> dict[str, dict]:
  """{instrument: {pixel_scale, size, ratio}}; the coarsest instrument is `size` px wide."""
  coarse = max(registry.pixel_scale(i) for i in registry.instruments)
  out = {}
  for inst in registry.instruments:
    scale = registry.pixel_scale(inst)
    ratio = coarse / scale
    if abs(ratio - round(ratio)) > 1e-6:
      raise ValueError(f'instrument {inst}: pixel scale {scale}" does not divide the coarsest '
                       f'{coarse}"; tiles could not be pixel-aligned')
    out[inst] = dict(pixel_scale=scale, size=size * int(round(ratio)), ratio=int(round(ratio)))
  return out


def wcs_cards(center_deg: Sequence[float], shape: Sequence[int], pixel_scale: float) -> dict:
  """FITS header cards of a north-up TAN WCS centred on the tile (x grows to the West)."""
  height, width = shape
  return {'WCSAXES': 2, 'NAXIS': 2, 'NAXIS1': int(width), 'NAXIS2': int(height),
          'CTYPE1': 'RA---TAN', 'CTYPE2': 'DEC--TAN', 'CUNIT1': 'deg', 'CUNIT2': 'deg',
          'CRVAL1': float(center_deg[0]), 'CRVAL2': float(center_deg[1]),
          'CRPIX1': (width + 1) / 2.0, 'CRPIX2': (height + 1) / 2.0,   # FITS is 1-based
          'CD1_1': -pixel_scale / 3600.0, 'CD1_2': 0.0, 'CD2_1': 0.0,
          'CD2_2': pixel_scale / 3600.0, 'RADESYS': 'ICRS'}


def tile_layout(n_tiles: int, config: SimConfig = SimConfig(),
                registry: bands_lib.BandRegistry | None = None) -> list[dict]:
  """Tile centres on a square grid around the field centre: [{center_deg, grid_row_col}]."""
  from astropy.wcs import WCS
  registry = registry or bands_lib.default_registry()
  coarse = max(registry.pixel_scale(i) for i in registry.instruments)
  spacing = config.size * coarse + config.tile_gap_arcsec           # arcsec
  n_cols = math.ceil(math.sqrt(n_tiles))
  n_rows = math.ceil(n_tiles / n_cols)
  # A TAN projection at the field centre with 1 arcsec "pixels".
  field = WCS(wcs_cards(config.field_center_deg, (1, 1), 1.0))
  out = []
  for k in range(n_tiles):
    row, col = divmod(k, n_cols)
    dx = (col - (n_cols - 1) / 2) * spacing
    dy = (row - (n_rows - 1) / 2) * spacing
    ra, dec = field.wcs_pix2world([[dx, dy]], 0)[0]
    out.append(dict(center_deg=[float(ra), float(dec)], grid_row_col=[row, col]))
  return out


@functools.lru_cache(maxsize=None)
def _band_physics(band: bands_lib.Band, config: observe.ObserveConfig) -> observe.BandPhysics:
  return observe.band_physics(band, config)


def prepare(config: SimConfig, registry: bands_lib.BandRegistry) -> None:
  """Computes the per-process caches (colour tables, PSF fits) ahead of forking workers."""
  sky.colour_tables(tuple(sky.SPECLITE_FILTERS[b] for b in registry.names
                          if b in sky.SPECLITE_FILTERS))
  rng = np.random.default_rng(0)
  physics = {b.name: _band_physics(b, config.observing) for b in registry}
  conditions = observe.sample_conditions(rng, physics, config.observing)
  for name, phys in physics.items():
    observe.band_psf(phys, conditions[name], config.observing)


def simulate_tile(index: int, seed: int, config: SimConfig = SimConfig(),
                  registry: bands_lib.BandRegistry | None = None,
                  center_deg: Sequence[float] | None = None, n_tiles: int = 0,
                  extra_sources: Mapping[str, np.ndarray] | None = None,
                  keep_model: bool = False) -> SimulatedTile:
  """Simulates one tile pair in memory.

  Args:
    index: tile number (with `seed`, the only input of its random numbers).
    seed: field seed.
    config: simulator parameters.
    registry: bands to simulate (default: the 10 Rubin + Euclid bands).
    center_deg: (RA, Dec) of the tile centre (default: the field centre).
    n_tiles: number of tiles of the field (only sets the width of the tile name).
    extra_sources: a catalogue (`sky.make_stars` / `sky.make_galaxies`) added to the random
      population, positions in pixels of the coarsest instrument; it does not change the
      random population, so a tile with and without it differ only by these sources.
    keep_model: also return the noiseless images.
  """
  registry = registry or bands_lib.default_registry()
  center_deg = tuple(center_deg or config.field_center_deg)
  name = tile_name(index, n_tiles)
  geometry = instrument_geometry(registry, config.size)
  coarse = min(geometry, key=lambda i: geometry[i]['ratio'])
  coarse_scale = geometry[coarse]['pixel_scale']
  rng_pop, rng_cond, rng_noise = [np.random.default_rng(s) for s in
                                  np.random.SeedSequence([seed, index]).spawn(3)]

  margin = config.margin_arcsec / coarse_scale
  lo, hi = -0.5 - margin, config.size - 0.5 + margin
  cat = sky.sample_population(rng_pop, (lo, hi), (lo, hi), coarse_scale, config.population)
  if extra_sources is not None:
    cat = sky.concat_sources([cat, extra_sources])
  flux_bulge, flux_disk = sky.band_fluxes(cat, registry.names)      # (n, n_bands) each
  physics = {b.name: _band_physics(b, config.observing) for b in registry}
  conditions = observe.sample_conditions(rng_cond, physics, config.observing)

  from astropy.wcs import WCS
  wcs = {inst: wcs_cards(center_deg, (g['size'], g['size']), g['pixel_scale'])
         for inst, g in geometry.items()}
  ra, dec = WCS(wcs[coarse]).wcs_pix2world(cat['x'], cat['y'], 0)
  positions = {inst: ((cat['x'] + 0.5) * g['ratio'] - 0.5, (cat['y'] + 0.5) * g['ratio'] - 0.5)
               for inst, g in geometry.items()}
  in_tile = ((cat['x'] >= -0.5) & (cat['x'] < config.size - 0.5)
             & (cat['y'] >= -0.5) & (cat['y'] < config.size - 0.5))

  images, rms_maps, models, band_meta = {}, {}, {}, {}
  for inst, g in geometry.items():
    shape = (g['size'], g['size'])
    inst_bands = registry.instrument_bands(inst)
    images[inst] = np.zeros((len(inst_bands),) + shape, np.float32)   # (n_bands, H, W)
    rms_maps[inst] = np.zeros_like(images[inst])
    models[inst] = np.zeros_like(images[inst])
    x, y = positions[inst]
    ids = [registry.band_id(b.name) for b in inst_bands]
    phys = [physics[b.name] for b in inst_bands]
    conds = [conditions[b.name] for b in inst_bands]
    # Per-band positions (n_sources, n_bands): WCS position + the band's astrometric offset.
    bx = x[:, None] + np.array([c.dx_mas / (1000.0 * p.pixel_scale) for p, c in zip(phys, conds)])
    by = y[:, None] + np.array([c.dy_mas / (1000.0 * p.pixel_scale) for p, c in zip(phys, conds)])
    model = observe.render_instrument(
        cat, flux_bulge[:, ids], flux_disk[:, ids], bx, by, shape, phys, conds,
        config.observing, min_flux=np.array([config.min_flux_rms * p.rms for p in phys]))
    for band, p, cond, band_model in zip(inst_bands, phys, conds, model):
      rms = observe.rms_map(shape, p, cond)
      images[inst][band.index] = observe.add_noise(band_model, rms, rng_noise, p,
                                                   config.observing)
      rms_maps[inst][band.index] = rms
      models[inst][band.index] = band_model
      band_meta[band.name] = dict(
          instrument=inst, dx_mas=cond.dx_mas, dy_mas=cond.dy_mas,
          psf_fwhm_arcsec=cond.psf_fwhm, psf_g1=cond.psf_g1, psf_g2=cond.psf_g2,
          rms_nominal_njy=p.rms * cond.depth_factor, rms_median_njy=float(np.median(rms)),
          depth_factor=cond.depth_factor, rms_gradient=cond.rms_gradient,
          rms_gradient_angle_deg=cond.rms_gradient_angle_deg)

  columns = truth.make_truth_columns(name, cat, ra, dec, positions, in_tile, registry.names,
                                     flux_bulge + flux_disk)
  meta = dict(center_deg=[float(c) for c in center_deg],
              instruments={inst: dict(shape=[g['size'], g['size']], pixel_scale=g['pixel_scale'],
                                      wcs=wcs[inst]) for inst, g in geometry.items()},
              bands=band_meta, n_sources=int(len(ra)), n_in_tile=int(in_tile.sum()))
  return SimulatedTile(name=name, images=images, rms=rms_maps, truth=columns, meta=meta,
                       models=models if keep_model else None)


def tile_dir(out_dir: str, instrument: str, field: str) -> str:
  return os.path.join(out_dir, f'{instrument}_tiles_{field}')


def write_tile_npz(path: str, image: np.ndarray, rms: np.ndarray) -> None:
  """Writes one tile file (keys image, rms; float32) atomically."""
  truth.atomic_write(path, lambda f: np.savez(f, image=image.astype(np.float32),
                                              rms=rms.astype(np.float32)), mode='wb')


def _simulate_and_write(task: tuple) -> tuple[dict, dict]:
  """Worker: simulates one tile and writes its npz files; returns (truth columns, meta)."""
  index, seed, layout, n_tiles, config, registry, out_dir, field = task
  tile = simulate_tile(index, seed, config, registry, center_deg=layout['center_deg'],
                       n_tiles=n_tiles)
  for inst in tile.images:
    write_tile_npz(os.path.join(tile_dir(out_dir, inst, field), tile.name + '.npz'),
                   tile.images[inst], tile.rms[inst])
  meta = dict(tile.meta, grid_row_col=layout['grid_row_col'])
  return tile.truth, meta


def _pool_context():
  # Forking a process that has started JAX (e.g. a training job simulating its data on
  # the fly) can deadlock; spawn there, fork (fast, inherits caches) otherwise.
  return multiprocessing.get_context('spawn' if 'jax' in sys.modules else 'fork')


def field_metadata(field: str, seed: int, n_tiles: int, config: SimConfig,
                   registry: bands_lib.BandRegistry) -> dict[str, Any]:
  """The field-level part of tiles_NAME.json."""
  band_info = {}
  for band in registry:
    phys = _band_physics(band, config.observing)
    band_info[band.name] = dict(dataclasses.asdict(phys), instrument=band.instrument,
                                index=band.index, registry_wavelength_nm=band.wavelength_nm)
  return dict(field=field, seed=seed, n_tiles=n_tiles, size=config.size,
              flux_unit='nJy per pixel', ab_zeropoint=sky.AB_NJY,
              pixel_convention=truth.PIXEL_CONVENTION, offset_convention=truth.OFFSET_CONVENTION,
              bands=band_info, config=dataclasses.asdict(config), tiles={})


def preview_path(out_dir: str, field: str) -> str:
  return os.path.join(out_dir, f'preview_{field}.png')


def simulate_field(out_dir: str, field: str, n_tiles: int, seed: int,
                   config: SimConfig = SimConfig(),
                   registry: bands_lib.BandRegistry | None = None,
                   workers: int | None = None, preview: bool = False) -> dict[str, str]:
  """Simulates a field to disk (layout in the module docstring); returns the paths written.

  Re-simulating an existing field overwrites its tiles. The truth catalog, tiles file and
  preview of the field are removed before the first tile is overwritten and written anew
  only once every tile is, so an interrupted run leaves tiles with no truth (which readers
  such as `evaluate.heldout` take as "no truth"), never a truth of other tiles.

  Raises:
    FileExistsError: the field's folders hold tiles of an earlier, larger run, or one of
      its paths is taken by something of the wrong kind (nothing is changed then).
  """
  registry = registry or bands_lib.default_registry()
  workers = max(1, min(workers or os.cpu_count() or 1, n_tiles))
  layouts = tile_layout(n_tiles, config, registry)
  names = {tile_name(k, n_tiles) + '.npz' for k in range(n_tiles)}
  folders = [tile_dir(out_dir, inst, field) for inst in registry.instruments]
  derived = [truth.truth_path(out_dir, field), truth.tiles_path(out_dir, field),
             preview_path(out_dir, field)]
  # Everything that could refuse the run is checked before anything is changed.
  for folder in folders:
    if not os.path.lexists(folder):
      continue
    if not os.path.isdir(folder):
      raise FileExistsError(f'{folder} exists and is not a folder')
    # Tiles of an earlier, larger run would be paired with this run's truth: refuse.
    stale = sorted(n for n in os.listdir(folder) if n.endswith('.npz') and n not in names)
    if stale:
      raise FileExistsError(f'{folder} holds {len(stale)} tile(s) not written by this run '
                            f'({stale[0]}, ...); use another --out or --field, or remove them')
  for path in derived:
    if os.path.lexists(path) and not os.path.isfile(path):
      raise FileExistsError(f'{path} exists and is not a file')
  # Invalidate rather than stage: the old truth goes before any tile is overwritten. A
  # scratch field swapped in at the end would need twice the disk, and its swap (one
  # rename per instrument folder plus the truth files, beside other fields in `out_dir`)
  # could still be interrupted half-way, leaving the same mix this ordering rules out.
  for path in derived:
    if os.path.lexists(path):
      os.remove(path)
  for folder in folders:
    os.makedirs(folder, exist_ok=True)
    # Temporary files of an interrupted run are ours to remove.
    for name in os.listdir(folder):
      if name.startswith('.tile_') and name.endswith('.tmp'):
        os.remove(os.path.join(folder, name))
  tasks = [(k, seed, layouts[k], n_tiles, config, registry, out_dir, field)
           for k in range(n_tiles)]
  context = _pool_context()
  if context.get_start_method() == 'fork' or workers == 1:
    prepare(config, registry)
  if workers == 1:
    results = [_simulate_and_write(t) for t in tasks]
  else:
    with context.Pool(workers) as pool:
      results = pool.map(_simulate_and_write, tasks, chunksize=1)

  tiles_meta = field_metadata(field, seed, n_tiles, config, registry)
  for k, (_, meta) in enumerate(results):
    tiles_meta['tiles'][tile_name(k, n_tiles)] = meta
  table = truth.truth_table([c for c, _ in results], meta=dict(
      field=field, seed=seed, flux_unit='nJy', pixel_convention=truth.PIXEL_CONVENTION,
      offset_convention=truth.OFFSET_CONVENTION))
  truth_file, tiles_file = truth.write_truth(out_dir, field, table, tiles_meta)
  paths = {f'{inst}_dir': tile_dir(out_dir, inst, field) for inst in registry.instruments}
  paths.update(truth=truth_file, tiles=tiles_file)
  if preview:
    paths['preview'] = write_preview(out_dir, field, tile_name(0, n_tiles), registry)
  return paths


# -- preview --------------------------------------------------------------------------

def _closest_bands(bands: Sequence[bands_lib.Band], targets_nm: Sequence[float]):
  return [min(bands, key=lambda b: abs(b.wavelength_nm - t)) for t in targets_nm]


def write_preview(out_dir: str, field: str, name: str,
                  registry: bands_lib.BandRegistry | None = None) -> str:
  """PNG of one written tile: colour composite of the coarsest instrument (bands nearest
  to g, r, i) and the bluest and reddest band of each other instrument, truth overlaid.
  Returns the PNG path (DIR/preview_NAME.png)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from astropy.visualization import make_lupton_rgb

  registry = registry or bands_lib.default_registry()
  table, tiles = truth.load_truth(out_dir, field)
  rows = table[(table['tile'] == name) & table['in_tile']]
  geometry = instrument_geometry(registry, tiles['size'])
  coarse = min(geometry, key=lambda i: geometry[i]['ratio'])
  panels = []   # (title, instrument, rgb or 2-D array)
  with np.load(os.path.join(tile_dir(out_dir, coarse, field), name + '.npz')) as f:
    image, rms = f['image'], f['rms']
  picks = _closest_bands(registry.instrument_bands(coarse), (758.0, 625.0, 485.0))   # i r g
  scale = float(np.median(rms[picks[1].index]))
  rgb = make_lupton_rgb(*[image[b.index] / scale for b in picks], minimum=0.0, stretch=15.0,
                        Q=5.0)
  panels.append((' '.join(b.name for b in picks[::-1]) + ' (b g r)', coarse, rgb))
  for inst in registry.instruments:
    if inst == coarse:
      continue
    with np.load(os.path.join(tile_dir(out_dir, inst, field), name + '.npz')) as f:
      image, rms = f['image'], f['rms']
    inst_bands = sorted(registry.instrument_bands(inst), key=lambda b: b.wavelength_nm)
    for band in (inst_bands[0], inst_bands[-1]):
      panels.append((band.name, inst, np.arcsinh(image[band.index] / (3.0 * rms[band.index]))))

  fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 6.4))
  for ax, (title, inst, data) in zip(np.atleast_1d(axes), panels):
    if data.ndim == 3:
      ax.imshow(data, origin='lower', interpolation='nearest')
    else:
      ax.imshow(data, origin='lower', cmap='gray', vmin=-1.5, vmax=np.percentile(data, 99.7),
                interpolation='nearest')
    x, y = np.asarray(rows[f'x_{inst}']), np.asarray(rows[f'y_{inst}'])
    star = np.asarray(rows['type']) == 'star'
    ax.scatter(x[~star], y[~star], s=40, facecolors='none',
               edgecolors='deepskyblue', linewidths=0.6, alpha=0.7, label='galaxy (truth)')
    ax.scatter(x[star], y[star], s=90, marker='*', facecolors='none', edgecolors='red',
               linewidths=0.8, label='star (truth)')
    ax.set_title(f'{field} {name}: {title}', fontsize=10)
    ax.set_xlabel(f'x_{inst} (px; East left, North up)')
  np.atleast_1d(axes)[0].legend(loc='upper right', fontsize=8, framealpha=0.6)
  fig.tight_layout()
  path = preview_path(out_dir, field)
  truth.atomic_write(path, lambda f: fig.savefig(f, dpi=100, format='png'), mode='wb')
  plt.close(fig)
  return path


# -- command line ---------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
  def error(self, message):   # one line via cli.run, not argparse's usage block
    raise UserError(message)


def _positive_int(flag):
  def parse(text):
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f'{flag} must be an integer, got {text!r}') from None
    if value < 1:
      raise argparse.ArgumentTypeError(f'{flag} must be >= 1, got {value}')
    return value
  return parse


def _parse(argv):
  parser = _Parser(prog='python -m jaisp_jax.data.simulate',
                   description='Simulate paired Rubin/Euclid tiles of a deep field with GalSim.')
  parser.add_argument('--out', required=True, help='output folder')
  parser.add_argument('--field', required=True, help='field name (letters, digits, _ - .)')
  parser.add_argument('--n-tiles', required=True, type=_positive_int('--n-tiles'))
  parser.add_argument('--seed', required=True, type=int)
  parser.add_argument('--size', type=_positive_int('--size'), default=SimConfig.size,
                      help='Rubin tile side in pixels (Euclid tiles are twice as wide)')
  parser.add_argument('--workers', type=_positive_int('--workers'), default=None,
                      help='worker processes (default: number of CPUs)')
  parser.add_argument('--preview', action='store_true',
                      help='also write DIR/preview_NAME.png of tile 0')
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse(argv)
  if not re.fullmatch(r'[A-Za-z0-9_.\-]+', args.field):
    raise UserError(f'--field {args.field!r}: use letters, digits, _ - . only')
  if args.size < 8:
    raise UserError(f'--size {args.size}: tiles must be at least 8 px wide')
  if args.seed < 0:
    raise UserError(f'--seed {args.seed}: must be >= 0')
  check_output_folder(args.out, '--out')
  os.makedirs(args.out, exist_ok=True)
  config = dataclasses.replace(SimConfig(), size=args.size)
  try:
    paths = simulate_field(args.out, args.field, args.n_tiles, args.seed, config,
                           workers=args.workers, preview=args.preview)
  except FileExistsError as e:
    raise UserError(str(e)) from None
  print(json.dumps(paths, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(run(main, prog='jaisp_jax.data.simulate'))
