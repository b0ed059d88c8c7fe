"""Validates tile folders: `python -m jaisp_jax.data.check --rubin-dir R --euclid-dir E`.

Reads every tile of every instrument folder (see `jaisp_jax.data.tiles` for the
formats accepted), pairs them by file name, checks sizes and sky alignment, and
prints either a short summary (exit 0) or one line per bad file, naming the file
and its problem(s) (exit 1). A missing or empty folder, or a bad flag, is exit 2.

    python -m jaisp_jax.data.check --rubin-dir data/rubin_tiles_ecdfs \\
        --euclid-dir data/euclid_tiles_ecdfs
    python -m jaisp_jax.data.check --dir rubin=R --dir euclid=E --dir hst=H --bands bands.json

Masked pixels (NaN/Inf or blank-marker image, bad rms) and masked bands are warnings:
reported, and errors only with --strict. Unpaired tiles are errors unless
--allow-unpaired, which skips and reports them. Pixels are not kept: per-band
statistics are accumulated tile by tile, so thousands of tiles scan in bounded memory.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import sys
from typing import Mapping, Sequence

import numpy as np

from jaisp_jax import cli
from jaisp_jax.bands import BandRegistry, default_registry
from jaisp_jax.data import tiles as tiles_lib
from jaisp_jax.data.tiles import TileError

# Streaming median of rms: a histogram over the bit patterns of positive float32
# values (monotonic in value), keeping the exponent and the top 9 mantissa bits. Bins
# are 0.2% wide, so the median is exact to 0.1%, over the whole float32 range, with
# integer work only (no log).
_HIST_SHIFT = 14
_N_BINS = 1 << (31 - _HIST_SHIFT)


def _bin_value(i: np.ndarray) -> np.ndarray:
  """The float32 value at the centre of histogram bins `i`."""
  bits = (np.asarray(i, np.int64) << _HIST_SHIFT) | (1 << (_HIST_SHIFT - 1))
  return bits.astype(np.int32).view(np.float32)


@dataclasses.dataclass
class BandStats:
  """Per-band statistics accumulated over the accepted tiles."""

  name: str
  n_tiles: int = 0
  n_pixels: int = 0
  n_bad_image: int = 0        # NaN/Inf or blank-marker image pixels
  n_bad_rms: int = 0          # rms zero, negative or non-finite
  n_masked: int = 0           # union of the two
  n_tiles_missing: int = 0    # tiles where the band is flagged missing
  rms_hist: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(_N_BINS, np.int64), repr=False)

  def add(self, tile: tiles_lib.InstrumentTile, c: int, n_masked: int,
          rms_hist: np.ndarray | None, first_bin: int) -> None:
    """Adds band `c` of `tile`, given its masked-pixel count and the histogram of its
    valid rms values over bins first_bin, first_bin + 1, ..."""
    self.n_tiles += 1
    self.n_pixels += tile.shape[0] * tile.shape[1]
    self.n_bad_image += int(tile.n_bad_image[c])
    self.n_bad_rms += int(tile.n_bad_rms[c])
    self.n_masked += n_masked
    self.n_tiles_missing += int(not tile.band_valid[c])
    if rms_hist is not None:
      self.rms_hist[first_bin:first_bin + rms_hist.size] += rms_hist

  def median_rms(self) -> float:
    """Median of the valid rms pixels (to 0.1%), NaN when there are none."""
    total = self.rms_hist.sum()
    if not total:
      return float('nan')
    # Bins holding the two middle values (0-based ranks), as np.median averages them.
    cum = np.cumsum(self.rms_hist)
    mid = _bin_value(np.searchsorted(cum, [(total - 1) // 2 + 1, total // 2 + 1]))
    return float(np.sqrt(np.float64(mid[0]) * mid[1]))


@dataclasses.dataclass
class InstrumentStats:
  """Per-instrument statistics accumulated over the accepted tiles."""

  instrument: str
  folder: pathlib.Path
  pixel_scale: float
  bands: list[BandStats]
  n_tiles: int = 0
  n_with_wcs: int = 0
  shapes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  dtypes: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, tile: tiles_lib.InstrumentTile) -> None:
    self.n_tiles += 1
    self.n_with_wcs += tile.wcs is not None
    self.shapes[(tile.n_bands,) + tile.shape] += 1
    self.dtypes[tile.source_dtype] += 1
    n_masked = tile.n_masked
    bins = tile.rms.view(np.int32) >> _HIST_SHIFT          # (C, H, W); rms > 0 where valid
    for c, band in enumerate(self.bands):
      b = bins[c][tile.valid[c]]
      hist, lo = None, 0
      if b.size:   # a short bincount over the band's own range of bins
        lo = int(b.min())
        hist = np.bincount(b - lo)
      band.add(tile, c, int(n_masked[c]), hist, lo)


@dataclasses.dataclass
class ValidationReport:
  """Outcome of `validate_folders`.

  Attributes:
    problems: errors, each naming a file (or folder); empty when usable.
    warnings: 'path: message' data-quality findings (already in `problems` if strict).
    notes: 'path: message' informational findings (dtype conversion, cropping).
    skipped: unpaired tiles skipped under allow_unpaired.
    ignored: non-tile files found in the folders.
    n_pairs: complete name sets found; n_ok: those that read and aligned cleanly.
    stats: per-instrument statistics over the accepted pairs.
    max_sky_offset_arcsec: largest footprint offset measured with WCS (None if none).
  """

  dirs: dict[str, pathlib.Path]
  problems: list[TileError]
  warnings: list[str]
  notes: list[str]
  skipped: list[str]
  ignored: list[pathlib.Path]
  n_pairs: int
  n_ok: int
  stats: dict[str, InstrumentStats]
  max_sky_offset_arcsec: float | None
  strict: bool = False

  @property
  def ok(self) -> bool:
    return not self.problems

  def problem_lines(self) -> list[str]:
    """One line per bad file: '<path>: <problem>[; <problem>...]'."""
    by_path: dict[pathlib.Path, list[str]] = {}
    for e in self.problems:
      by_path.setdefault(e.path, [])
      if e.problem not in by_path[e.path]:
        by_path[e.path].append(e.problem)
    return [f'{p}: {"; ".join(msgs)}' for p, msgs in by_path.items()]

  def summary_lines(self) -> list[str]:
    """The short human summary printed by `check`."""
    lines = [f'{self.n_ok} of {self.n_pairs} tile pair(s) usable '
             f'({len(self.problem_lines())} bad file(s), {len(self.skipped)} skipped unpaired, '
             f'{len(self.warnings)} warning(s))']
    for inst, st in self.stats.items():
      shapes = ', '.join(f'{"x".join(map(str, s))} ({n})' for s, n in st.shapes.most_common())
      dtypes = ', '.join(f'{d} ({n})' for d, n in st.dtypes.most_common())
      lines.append(f'{inst}: {st.n_tiles} tiles in {st.folder}, {len(st.bands)} bands, '
                   f'{st.pixel_scale:g}"/px, shapes {shapes or "-"}, dtypes {dtypes or "-"}, '
                   f'WCS in {st.n_with_wcs}')
      lines.append(f'  {"band":<12} {"bad image":>9} {"bad rms":>9} {"masked":>9} '
                   f'{"missing":>8} {"median rms":>11}')
      for b in st.bands:
        frac = lambda n, b=b: f'{n / b.n_pixels:.3%}' if b.n_pixels else '-'  # noqa: E731
        lines.append(f'  {b.name:<12} {frac(b.n_bad_image):>9} {frac(b.n_bad_rms):>9} '
                     f'{frac(b.n_masked):>9} {b.n_tiles_missing:>8} {b.median_rms():>11.3g}')
    if self.max_sky_offset_arcsec is not None:
      lines.append(f'largest sky offset between instruments (WCS): '
                   f'{self.max_sky_offset_arcsec:.3g}"')
    return lines


def validate_folders(dirs: Mapping[str, tiles_lib.PathLike],
                     registry: BandRegistry | None = None, *, allow_unpaired: bool = False,
                     size_tolerance: int = 1, sky_tolerance_arcsec: float | None = None,
                     min_band_valid_fraction: float = 0.0,
                     strict: bool = False) -> ValidationReport:
  """Reads and checks every tile of per-instrument folders (see the module docstring).

  Every file of every complete pair is read (so each bad file is reported, not just
  the first of a pair); pairs whose files all read are then size- and sky-checked.
  Only per-band counters and a log-rms histogram are kept, not pixels.

  Raises:
    UserError / TileError: a folder is missing or empty, or an instrument is unknown.
  """
  registry = registry or default_registry()
  listing = tiles_lib.find_tile_pairs(dirs, registry, allow_unpaired=allow_unpaired)
  order = [i for i in registry.instruments if i in dirs]
  stats = {inst: InstrumentStats(
      instrument=inst, folder=pathlib.Path(dirs[inst]),
      pixel_scale=registry.pixel_scale(inst),
      bands=[BandStats(b.name) for b in registry.instrument_bands(inst)]) for inst in order}
  problems = list(listing.problems)
  warns, notes, offsets = [], [], []
  n_ok = 0
  for files in listing.pairs:
    tiles, pair_errors = {}, []
    for inst, path in files.paths.items():
      try:
        tiles[inst] = tiles_lib.read_tile(path, inst, registry,
                                          min_band_valid_fraction=min_band_valid_fraction)
      except TileError as e:
        pair_errors.append(e)
    if not pair_errors:
      try:
        pair = tiles_lib.make_tile_pair(files.name, tiles, registry,
                                        size_tolerance=size_tolerance,
                                        sky_tolerance_arcsec=sky_tolerance_arcsec)
      except TileError as e:
        pair_errors.append(e)
    pair_warnings = [] if pair_errors else [
        TileError(t.path, w) for t in pair.tiles.values() for w in t.warnings]
    if strict:
      pair_errors += pair_warnings
    if pair_errors:
      problems += pair_errors
      continue
    n_ok += 1
    warns += [str(w) for w in pair_warnings]
    for t in pair.tiles.values():
      notes += [f'{t.path}: {n}' for n in t.notes]
      stats[t.instrument].add(t)
    if pair.sky_offset_arcsec is not None:
      offsets.append(pair.sky_offset_arcsec)
  return ValidationReport(
      dirs={i: pathlib.Path(dirs[i]) for i in order}, problems=problems, warnings=warns,
      notes=notes, skipped=listing.skipped, ignored=listing.ignored,
      n_pairs=len(listing.pairs), n_ok=n_ok, stats=stats,
      max_sky_offset_arcsec=max(offsets) if offsets else None, strict=strict)


# -- command line ------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog='python -m jaisp_jax.data.check',
      description='Validate per-instrument tile folders (npz or FITS) paired by file name.')
  parser.add_argument('--rubin-dir', help='folder of Rubin tiles (same as --dir rubin=PATH)')
  parser.add_argument('--euclid-dir', help='folder of Euclid tiles (same as --dir euclid=PATH)')
  parser.add_argument('--dir', action='append', default=[], metavar='INSTRUMENT=PATH',
                      help='folder of one instrument\'s tiles; repeat for each instrument')
  parser.add_argument('--bands', metavar='JSON',
                      help='band registry as a JSON list of band dicts (name, instrument, '
                      'pixel_scale, wavelength_nm, index); default: Rubin + Euclid')
  parser.add_argument('--allow-unpaired', action='store_true',
                      help='skip (and report) tiles missing from some folder instead of failing')
  parser.add_argument('--size-tolerance', type=int, default=1, metavar='PX',
                      help='allowed deviation, in the finer instrument\'s pixels, from the '
                      'pixel-scale size ratio (default 1)')
  parser.add_argument('--sky-tolerance', type=float, default=None, metavar='ARCSEC',
                      help='allowed footprint offset between instruments when tiles have a WCS '
                      '(default: one pixel of the coarser instrument)')
  parser.add_argument('--min-band-valid-fraction', type=float, default=0.0, metavar='F',
                      help='flag a band missing in a tile when fewer pixels are usable '
                      '(default 0: only when none is)')
  parser.add_argument('--strict', action='store_true',
                      help='treat warnings (masked pixels or bands) as errors')
  parser.add_argument('--max-warnings', type=int, default=20, metavar='N',
                      help='warning/note lines to print (default 20; errors are all printed)')
  return parser.parse_args(argv)


def load_registry(path: str | None) -> BandRegistry:
  """The band registry of a `--bands` JSON file (a list of band entries), or the default
  registry when `path` is None; a missing or invalid file is a UserError naming it."""
  if path is None:
    return default_registry()
  entries = cli.read_json(path, list)
  try:
    return BandRegistry.from_dicts(entries)
  except (ValueError, TypeError, AttributeError, KeyError) as e:
    raise cli.UserError(f'{path}: invalid band registry ({e})') from None


def _folders(args: argparse.Namespace) -> dict[str, str]:
  dirs: dict[str, str] = {}
  given = [('rubin', args.rubin_dir), ('euclid', args.euclid_dir)]
  for spec in args.dir:
    inst, sep, path = spec.partition('=')
    if not sep or not inst or not path:
      raise cli.UserError(f'--dir {spec!r}: expected INSTRUMENT=PATH')
    given.append((inst, path))
  for inst, path in given:
    if path is None:
      continue
    if inst in dirs:
      raise cli.UserError(f'folder for {inst} given twice ({dirs[inst]} and {path})')
    dirs[inst] = path
  if not dirs:
    raise cli.UserError('no tile folder: give --rubin-dir/--euclid-dir or --dir INSTRUMENT=PATH')
  return dirs


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  if args.size_tolerance < 0:
    raise cli.UserError(f'--size-tolerance must be >= 0, got {args.size_tolerance}')
  if not 0.0 <= args.min_band_valid_fraction <= 1.0:
    raise cli.UserError('--min-band-valid-fraction must be in [0, 1]')
  if args.max_warnings < 0:
    raise cli.UserError(f'--max-warnings must be >= 0, got {args.max_warnings}')
  if args.sky_tolerance is not None and not args.sky_tolerance >= 0:  # NaN too
    raise cli.UserError(f'--sky-tolerance must be >= 0 arcsec, got {args.sky_tolerance}')
  registry = load_registry(args.bands)
  report = validate_folders(
      _folders(args), registry, allow_unpaired=args.allow_unpaired,
      size_tolerance=args.size_tolerance, sky_tolerance_arcsec=args.sky_tolerance,
      min_band_valid_fraction=args.min_band_valid_fraction, strict=args.strict)
  if not report.ok:
    for line in report.problem_lines():
      print(line, file=sys.stderr)
    print(f'check: {len(report.problem_lines())} bad file(s); {report.n_ok} of '
          f'{report.n_pairs} tile pair(s) usable', file=sys.stderr)
    return cli.EXIT_INVALID_INPUT
  for line in report.summary_lines():
    print(line)
  for title, items in (('skipped', report.skipped), ('warning', report.warnings),
                       ('note', report.notes)):
    for line in items[:args.max_warnings]:
      print(f'{title}: {line}')
    if len(items) > args.max_warnings:
      print(f'{title}: ... and {len(items) - args.max_warnings} more')
  if report.ignored:
    print(f'ignored {len(report.ignored)} non-tile file(s), e.g. {report.ignored[0]}')
  if report.n_ok == 0:
    print('check: no usable tile pair', file=sys.stderr)
    return cli.EXIT_INVALID_INPUT
  print('check: OK')
  return cli.EXIT_OK


if __name__ == '__main__':
  sys.exit(cli.run(main, prog='check'))
