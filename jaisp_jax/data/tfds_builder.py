"""TFDS (array_record) dataset of fixed-size, sky-aligned multi-instrument chips.

One record is one *chip*: the same sky in every instrument, cut from a tile pair at
a fixed size (``chip_px`` pixels of the coarsest instrument on a side: Rubin C x C,
Euclid 2C x 2C). Features of a record::

    id:          str  '<tile>/<y0>_<x0>'
    tile:        str  tile name (shared file name of the tile pair)
    origin:      (2,) int32  chip corner (y0, x0) in reference pixels of the tile
    region:      ()   int64  sky region (see split.py); a region is never split
    sky:         (2,) float64 RA, Dec (deg) of the chip centre; NaN without WCS
    truth_rows:  (None,) int64 rows of the truth catalog inside the chip (simulated
                 data; see `TruthIndex`), empty otherwise
    instruments: {instrument: {
        image, rms:  (n_bands, c_i, c_i) float32, masked pixels 0 (tiles.py),
        band_valid:  (n_bands,) bool, tile flag and >= min_valid_fraction usable px,
        rms_scale:   (n_bands,) float32 median valid rms of the band over the chip
                     (the normalisation of batch.py, precomputed),
        band_names:  (n_bands,) str, pixel_scale: () float32}}

The dataset lives in ``<data_dir>/<name>/<VERSION>`` and is read without TensorFlow
by ``tfds.data_source(name, split=..., data_dir=data_dir)`` (grain random access).
Its metadata holds the band registry, the chip size and the build report.

Splits are by sky region (split.py), never by chip. Building is atomic: everything is
written under ``<data_dir>/.<name>-building-<pid>-<random>`` and the finished version
folder is renamed into place at the very end, so an interrupted build leaves only a
hidden scratch folder (removed by the next build) and nothing that TFDS would load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import shutil
import sys
import uuid
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError
from jaisp_jax.data import split as split_lib
from jaisp_jax.data import tiles as tiles_lib

VERSION = '1.0.0'
DEFAULT_NAME = 'jaisp_chips'
SPLITS = ('train', 'validation')


@dataclasses.dataclass(frozen=True)
class ChipOptions:
  """How tiles are cut into chips and split.

  Attributes:
    chip_px: chip side in pixels of the coarsest instrument (Rubin: 128 px = 25.6").
    stride_px: step between chip origins (0 = chip_px, no overlap). Chips of one
      tile may overlap: they always land in the same split.
    min_valid_fraction: a band is valid in a chip only with at least this fraction
      of usable pixels there; chips with fewer than two valid bands are dropped.
    val_fraction: target fraction of chips in the validation split.
    split_seed: seed of the region order used to fill the validation split.
    min_overlap_px: tiles whose WCS footprints overlap by more than this many
      reference pixels on each side belong to one sky region.
  """
  chip_px: int = 128
  stride_px: int = 0
  min_valid_fraction: float = 0.5
  val_fraction: float = 0.1
  split_seed: int = 0
  min_overlap_px: float = 1.0


class BuildError(UserError):
  """The input cannot be built into a dataset (bad tiles, nothing usable)."""

  def __init__(self, message: str, lines: Sequence[str] = ()):
    super().__init__(message)
    self.lines = list(lines)


class TruthIndex:
  """Rows of a truth catalog per tile, for `truth_rows` (simulated data).

  Args:
    tile: (n,) tile name of each catalog row.
    y, x: (n,) position of each row in reference-instrument pixels of its tile,
      pixel centres at integers (so pixel j spans [j - 0.5, j + 0.5)).
  """

  def __init__(self, tile: np.ndarray, y: np.ndarray, x: np.ndarray):
    tile = np.asarray(tile).astype(str)
    self._rows = {t: np.flatnonzero(tile == t) for t in np.unique(tile)}
    self._y, self._x = np.asarray(y, float), np.asarray(x, float)

  def rows(self, tile: str, y0: int, x0: int, size: int) -> np.ndarray:
    """int64 rows whose position falls inside the chip [y0, y0+size) x [x0, x0+size)."""
    rows = self._rows.get(tile, np.zeros(0, np.int64))
    y, x = self._y[rows] + 0.5, self._x[rows] + 0.5
    inside = (y >= y0) & (y < y0 + size) & (x >= x0) & (x < x0 + size)
    return rows[inside].astype(np.int64)


# -- chips -------------------------------------------------------------------------


def chip_origins(h: int, w: int, chip: int, stride: int) -> list[tuple[int, int]]:
  """Chip corners covering an h x w grid; the last row/column is flush with the edge."""
  def axis(n):
    if n < chip:
      return []
    starts = list(range(0, n - chip + 1, stride))
    if starts[-1] != n - chip:
      starts.append(n - chip)
    return starts
  return [(y, x) for y in axis(h) for x in axis(w)]


def _median_scales(rms: np.ndarray, valid: np.ndarray) -> np.ndarray:
  out = np.ones(rms.shape[0], np.float32)
  for c in range(rms.shape[0]):
    if valid[c].any():
      out[c] = np.median(rms[c][valid[c]])
  return out


def _usable_chips(pair: tiles_lib.TilePair, options: ChipOptions):
  """(y0, x0, {instrument: (slices, valid, band_valid)}) of chips with >= 2 valid bands."""
  ref = pair.tiles[pair.reference]
  stride = options.stride_px or options.chip_px
  for y0, x0 in chip_origins(*ref.shape, options.chip_px, stride):
    per, n_valid = {}, 0
    for inst, tile in pair.tiles.items():
      f = int(round(ref.pixel_scale / tile.pixel_scale))
      sl = (slice(None), slice(y0 * f, (y0 + options.chip_px) * f),
            slice(x0 * f, (x0 + options.chip_px) * f))
      valid = tile.valid[sl]
      frac = valid.reshape(valid.shape[0], -1).mean(axis=1)
      band_valid = tile.band_valid & (frac >= options.min_valid_fraction) & (frac > 0)
      n_valid += int(band_valid.sum())
      per[inst] = (sl, valid, band_valid)
    if n_valid >= 2:  # otherwise no pair of views is possible here
      yield y0, x0, per


def count_chips(pair: tiles_lib.TilePair, options: ChipOptions) -> tuple[int, int]:
  """(usable chips, all chip positions) of a tile pair."""
  ref = pair.tiles[pair.reference]
  n_all = len(chip_origins(*ref.shape, options.chip_px, options.stride_px or options.chip_px))
  return sum(1 for _ in _usable_chips(pair, options)), n_all


def chip_records(pair: tiles_lib.TilePair, registry: bands_lib.BandRegistry,
                 options: ChipOptions, region: int = 0,
                 truth: TruthIndex | None = None) -> Iterator[tuple[str, dict]]:
  """(key, record) for every usable chip of a tile pair (see the module docstring)."""
  del registry  # the tiles already carry their band names and pixel scales
  ref = pair.tiles[pair.reference]
  for y0, x0, per in _usable_chips(pair, options):
    insts = {}
    for inst, (sl, valid, band_valid) in per.items():
      tile = pair.tiles[inst]
      rms = tile.rms[sl]
      insts[inst] = dict(
          image=np.ascontiguousarray(tile.image[sl], np.float32),
          rms=np.ascontiguousarray(rms, np.float32),
          band_valid=band_valid, rms_scale=_median_scales(rms, valid),
          band_names=np.array(tile.band_names, dtype=object),
          pixel_scale=np.float32(tile.pixel_scale))
    sky = np.full(2, np.nan)
    if ref.wcs is not None:
      c = (options.chip_px - 1) / 2
      ra, dec = ref.wcs.pixel_to_world_values(x0 + c, y0 + c)
      sky = np.array([float(ra), float(dec)])
    rows = (truth.rows(pair.name, y0, x0, options.chip_px) if truth is not None
            else np.zeros(0, np.int64))
    key = f'{pair.name}/{y0:05d}_{x0:05d}'
    yield key, dict(id=key, tile=pair.name, origin=np.array([y0, x0], np.int32),
                    region=np.int64(region), sky=sky, truth_rows=rows, instruments=insts)


def chip_features(registry: bands_lib.BandRegistry, instruments: Sequence[str], chip_px: int):
  """The tfds FeaturesDict of a record."""
  import tensorflow_datasets as tfds
  ref_scale = max(registry.pixel_scale(i) for i in instruments)
  insts = {}
  for inst in instruments:
    nb = registry.n_bands(inst)
    c = int(round(chip_px * ref_scale / registry.pixel_scale(inst)))
    arr = lambda: tfds.features.Tensor(shape=(nb, c, c), dtype=np.float32, encoding='bytes')  # noqa: E731
    insts[inst] = tfds.features.FeaturesDict(dict(
        image=arr(), rms=arr(),
        band_valid=tfds.features.Tensor(shape=(nb,), dtype=np.bool_),
        rms_scale=tfds.features.Tensor(shape=(nb,), dtype=np.float32),
        band_names=tfds.features.Tensor(shape=(nb,), dtype=np.str_),
        pixel_scale=tfds.features.Scalar(dtype=np.float32)))
  return tfds.features.FeaturesDict(dict(
      id=tfds.features.Text(), tile=tfds.features.Text(),
      origin=tfds.features.Tensor(shape=(2,), dtype=np.int32),
      region=tfds.features.Scalar(dtype=np.int64),
      sky=tfds.features.Tensor(shape=(2,), dtype=np.float64),
      truth_rows=tfds.features.Tensor(shape=(None,), dtype=np.int64),
      instruments=tfds.features.FeaturesDict(insts)))


def _builder_class():
  import tensorflow_datasets as tfds

  class ChipBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes pre-planned splits of chip records; the name is chosen per dataset."""

    VERSION = tfds.core.Version(VERSION)

    # TFDS looks for a checksums file next to the builder's source through
    # `importlib_resources`, which is not installed and not needed: nothing is
    # downloaded. No code path, no checksum lookup.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def __init__(self, *, name: str, features, split_examples: Mapping[str, Callable],
                 metadata: dict, data_dir: str):
      self.name = name
      self._features = features
      self._split_examples = split_examples
      self._metadata = metadata
      super().__init__(data_dir=data_dir, file_format='array_record')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description='JAISP multi-instrument chips (jaisp_jax.data.build).',
          features=self._features, metadata=tfds.core.MetadataDict(self._metadata),
          disable_shuffling=True)  # grain shuffles indices; keep the build deterministic

    def _split_generators(self, dl_manager):
      del dl_manager
      return {s: make() for s, make in self._split_examples.items()}

    def _generate_examples(self):
      raise NotImplementedError

    # TFDS prints "downloading ... to <scratch folder>" messages; nothing is downloaded
    # and the scratch path is not where the dataset ends up, so stay quiet.
    def _log_download_bytes(self):
      pass

    def _log_download_done(self):
      pass

  return ChipBuilder


# -- building ----------------------------------------------------------------------


@dataclasses.dataclass
class BuildReport:
  """What a build did (also stored in the dataset metadata)."""
  path: str = ''
  n_pairs: int = 0
  n_ok: int = 0
  n_invalid: int = 0
  problems: list[str] = dataclasses.field(default_factory=list)
  skipped_unpaired: list[str] = dataclasses.field(default_factory=list)
  n_warnings: int = 0
  n_chips: dict[str, int] = dataclasses.field(default_factory=dict)
  n_regions: dict[str, int] = dataclasses.field(default_factory=dict)
  n_chips_dropped: int = 0
  tiles_too_small: list[str] = dataclasses.field(default_factory=list)

  def lines(self) -> list[str]:
    out = [f'{self.n_ok} of {self.n_pairs} tile pair(s) used'
           + (f', {self.n_invalid} invalid skipped' if self.n_invalid else '')
           + (f', {len(self.skipped_unpaired)} unpaired skipped' if self.skipped_unpaired else '')]
    for s, n in self.n_chips.items():
      out.append(f'{s}: {n} chip(s) from {self.n_regions.get(s, 0)} sky region(s)')
    if self.n_chips_dropped:
      out.append(f'{self.n_chips_dropped} chip(s) dropped (fewer than two valid bands)')
    if self.tiles_too_small:
      out.append(f'{len(self.tiles_too_small)} tile(s) smaller than one chip: '
                 + ', '.join(self.tiles_too_small[:5]))
    return out


def _progress(iterable, total: int, desc: str, enabled: bool):
  if not enabled:
    return iterable
  from tqdm import tqdm
  return tqdm(iterable, total=total, desc=desc, unit='tile', file=sys.stderr,
              dynamic_ncols=True)


def _remove_stale_scratch(data_dir: pathlib.Path, name: str) -> None:
  """Removes scratch folders of earlier builds whose process is gone."""
  for p in data_dir.glob(f'.{name}-building-*'):
    try:
      pid = int(p.name.split('-building-')[1].split('-')[0])
      os.kill(pid, 0)
    except ProcessLookupError:
      shutil.rmtree(p, ignore_errors=True)
    except (ValueError, IndexError, PermissionError):
      continue


@dataclasses.dataclass
class BuildPlan:
  """Validated tile pairs assigned to splits; `examples(split)` reads and chips them."""
  registry: bands_lib.BandRegistry
  options: ChipOptions
  instruments: list[str]
  splits: dict[str, list[tuple[tiles_lib.TileFiles, int, int]]]  # (files, region, n_chips)
  report: BuildReport
  truth: TruthIndex | None = None
  wcs: Mapping[str, object] | None = None  # tile name -> WCS of the reference tile

  def examples(self, split: str, progress: bool = False) -> Iterator[tuple[str, dict]]:
    items = self.splits.get(split, [])
    for files, region, _ in _progress(items, len(items), f'writing {split}', progress):
      pair = _read_pair(files, self.registry, self.wcs)
      yield from chip_records(pair, self.registry, self.options, region, self.truth)


def _read_pair(files: tiles_lib.TileFiles, registry: bands_lib.BandRegistry,
               wcs: Mapping[str, object] | None) -> tiles_lib.TilePair:
  """Reads and aligns one tile pair; a WCS from `wcs` fills in a reference tile without one."""
  tiles = {inst: tiles_lib.read_tile(path, inst, registry) for inst, path in files.paths.items()}
  pair = tiles_lib.make_tile_pair(files.name, tiles, registry)
  ref = pair.tiles[pair.reference]
  if ref.wcs is None and wcs and files.name in wcs:
    pair.tiles[pair.reference] = dataclasses.replace(ref, wcs=wcs[files.name])
  return pair


def plan_build(dirs: Mapping[str, str | os.PathLike],
               registry: bands_lib.BandRegistry | None = None,
               options: ChipOptions = ChipOptions(), *, skip_invalid: bool = False,
               truth: TruthIndex | None = None, wcs: Mapping[str, object] | None = None,
               fit_chip: bool = False, progress: bool = False,
               log: Callable[[str], None] = lambda s: None) -> BuildPlan:
  """Pass 1: reads and validates every tile, groups them in sky regions, splits.

  Tiles are read and validated with tiles.py (the messages of `check`); any bad or
  unpaired tile fails with one line per bad file (`BuildError.lines`), unless
  `skip_invalid`, which skips them and counts them in the report. Only what the split
  needs is kept (no pixels). With `fit_chip`, when every tile is smaller than
  `options.chip_px`, the chip shrinks to the largest that fits in the biggest tile
  (logged; `BuildPlan.options` holds the size used).

  Raises:
    BuildError / UserError: bad input or nothing usable.
  """
  registry = registry or bands_lib.default_registry()
  listing = tiles_lib.find_tile_pairs(dirs, registry, allow_unpaired=skip_invalid)
  instruments = [i for i in registry.instruments if i in dirs]
  report, good, skies, max_side = _validate_pairs(listing, registry, options, wcs, progress)
  if report.problems and not skip_invalid:
    raise BuildError(f'{len(report.problems)} invalid tile file(s); fix them or pass '
                     '--skip-invalid to build without them', report.problems)
  if fit_chip and good and sum(t.n_chips for t in skies) == 0 and max_side < options.chip_px:
    # The default chip suits the reference simulator's tiles; smaller (valid) tiles of
    # another source would otherwise build nothing. Tiles are read a second time.
    log(f'note: every tile is smaller than a chip of {options.chip_px} px; using chips of '
        f'{max_side} px (the side of the biggest tile)')
    options = dataclasses.replace(options, chip_px=max_side)
    report, good, skies, max_side = _validate_pairs(listing, registry, options, wcs, progress)
  if sum(t.n_chips for t in skies) == 0:
    why = ''
    if good and len(report.tiles_too_small) == len(good):
      why = (f': every tile is smaller than one chip (the biggest fits {max_side} px); '
             f'pass a chip side of at most {max_side} px (--chip-px)')
    raise BuildError(f'no usable chip of {options.chip_px} px in {len(good)} valid tile '
                     f'pair(s) ({", ".join(str(d) for d in dirs.values())}){why}')
  regions = split_lib.sky_regions(skies, options.min_overlap_px)
  splits = split_lib.assign_splits(regions, np.array([t.n_chips for t in skies]),
                                   options.val_fraction, options.split_seed)
  plan = {s: [(good[i], int(regions[i]), skies[i].n_chips) for i in range(len(good))
              if splits[i] == s and skies[i].n_chips] for s in SPLITS}
  plan = {s: v for s, v in plan.items() if v}
  for s, items in plan.items():
    report.n_chips[s] = sum(n for _, _, n in items)
    report.n_regions[s] = len({r for _, r, _ in items})
  if 'validation' not in plan and options.val_fraction > 0:
    log('note: a single sky region (all tiles overlap, or one tile): no validation split')
  return BuildPlan(registry, options, instruments, plan, report, truth, wcs)


def _validate_pairs(listing: tiles_lib.TileListing, registry: bands_lib.BandRegistry,
                    options: ChipOptions, wcs: Mapping[str, object] | None, progress: bool):
  """(report, good tile files, their skies, largest chip side any tile fits) of a listing;
  `report.problems` holds one line per bad file."""
  report = BuildReport()
  report.n_pairs = len(listing.pairs)
  report.skipped_unpaired = list(listing.skipped)
  problems = list(listing.problems)
  good: list[tiles_lib.TileFiles] = []
  skies: list[split_lib.TileSky] = []
  max_side = 0
  for files in _progress(listing.pairs, len(listing.pairs), 'validating', progress):
    try:
      pair = _read_pair(files, registry, wcs)
    except tiles_lib.TileError as first:
      # Report every bad file of the pair, as `check` does, not just the first.
      errors = []
      for inst, path in files.paths.items():
        try:
          tiles_lib.read_tile(path, inst, registry)
        except tiles_lib.TileError as e:
          errors.append(e)
      problems += errors or [first]
      continue
    report.n_warnings += sum(len(t.warnings) for t in pair.tiles.values())
    n, n_all = count_chips(pair, options)
    report.n_chips_dropped += n_all - n
    ref = pair.tiles[pair.reference]
    max_side = max(max_side, min(ref.shape))
    if n_all == 0:
      report.tiles_too_small.append(files.name)
    skies.append(split_lib.tile_sky(files.name, n, ref.image, ref.valid, ref.band_valid,
                                    ref.pixel_scale, ref.wcs))
    good.append(files)
  report.problems = _problem_lines(problems)
  report.n_invalid = len(report.problems)
  report.n_ok = len(good)
  return report, good, skies, max_side


@dataclasses.dataclass
class SimulatedField:
  """A simulated field on disk, ready for `plan_build` / `build_dataset`."""
  dirs: dict[str, str]
  truth: TruthIndex
  wcs: dict[str, object]
  extra_files: dict[str, str]


def simulate_field(out_dir: str | os.PathLike, field: str, n_tiles: int, seed: int,
                   size: int, registry: bands_lib.BandRegistry,
                   workers: int | None = None) -> SimulatedField:
  """Runs the GalSim simulator into `out_dir` and indexes its truth catalog.

  The npz tiles carry no WCS; the reference tiles' WCS comes from the simulator's
  tiles file, so records get sky positions.
  """
  from jaisp_jax.data import simulate, truth
  paths = simulate.simulate_field(str(out_dir), field, n_tiles, seed,
                                  simulate.SimConfig(size=size), registry, workers=workers)
  table, tiles_meta = truth.load_truth(str(out_dir), field)
  ref = max(registry.instruments, key=registry.pixel_scale)
  index = TruthIndex(table['tile'], table[f'y_{ref}'], table[f'x_{ref}'])
  wcs = {t: truth.tile_wcs(tiles_meta, t, ref) for t in tiles_meta['tiles']}
  return SimulatedField(
      dirs={inst: paths[f'{inst}_dir'] for inst in registry.instruments}, truth=index, wcs=wcs,
      extra_files={os.path.basename(paths[k]): paths[k] for k in ('truth', 'tiles')})


def build_dataset(dirs: Mapping[str, str | os.PathLike], data_dir: str | os.PathLike,
                  name: str = DEFAULT_NAME, registry: bands_lib.BandRegistry | None = None,
                  options: ChipOptions = ChipOptions(), *, skip_invalid: bool = False,
                  truth: TruthIndex | None = None, wcs: Mapping[str, object] | None = None,
                  extra_files: Mapping[str, str] | None = None, overwrite: bool = False,
                  fit_chip: bool = False, progress: bool = True, source: str = '',
                  log: Callable[[str], None] = lambda s: None) -> BuildReport:
  """Builds `<data_dir>/<name>/<VERSION>` from per-instrument tile folders.

  Args:
    dirs: instrument -> folder of its tiles (paired by file name).
    truth, wcs: simulated data: truth catalog index and reference-tile WCS per tile.
    extra_files: file name -> source path copied into the dataset folder (e.g. the
      truth catalog of a simulated field).
    skip_invalid: skip bad tiles (counted in the report) instead of failing.
    overwrite: replace an existing dataset of that name and version.
    fit_chip: shrink the chip when every tile is smaller (see `plan_build`).

  Raises:
    BuildError / UserError: bad input (see `plan_build`), or the dataset exists and
      `overwrite` is False.
  """
  data_dir = pathlib.Path(data_dir)
  if not name or '/' in name or name.startswith('.'):
    raise UserError(f'--name {name!r}: a dataset name is a plain folder name')
  final = data_dir / name / VERSION
  if final.exists() and not overwrite:
    raise UserError(f'{final}: dataset already built; pass --overwrite to replace it')
  plan = plan_build(dirs, registry, options, skip_invalid=skip_invalid, truth=truth, wcs=wcs,
                    fit_chip=fit_chip, progress=progress, log=log)
  report = plan.report
  registry = plan.registry
  options = plan.options
  metadata = dict(
      registry=registry.to_dicts(), instruments=plan.instruments, chip_px=options.chip_px,
      chip_arcsec=options.chip_px * max(registry.pixel_scale(i) for i in plan.instruments),
      options=dataclasses.asdict(options), source=source,
      extra_files=sorted(extra_files or {}),
      report={k: v for k, v in dataclasses.asdict(report).items() if k != 'path'})
  report.path = str(final)
  split_examples = {s: functools.partial(plan.examples, s, progress) for s in plan.splits}
  _write_atomically(data_dir, name, chip_features(registry, plan.instruments, options.chip_px),
                    split_examples, metadata, overwrite, extra_files or {})
  return report


def _problem_lines(problems: Sequence[tiles_lib.TileError]) -> list[str]:
  by_path: dict[str, list[str]] = {}
  for e in problems:
    msgs = by_path.setdefault(str(e.path), [])
    if e.problem not in msgs:
      msgs.append(e.problem)
  return [f'{p}: {"; ".join(m)}' for p, m in by_path.items()]


# array_record options of the written files. TFDS writes 'group_size:1' (zstd level 3),
# which saves < 10% on float noise but makes every random read ~6x slower (9 ms vs
# 1.5 ms for a 2.9 MB chip): chips are stored uncompressed.
ARRAY_RECORD_OPTIONS = 'group_size:1,uncompressed'


@contextlib.contextmanager
def _uncompressed_array_records():
  """Makes TFDS write array_record files with `ARRAY_RECORD_OPTIONS` (during a build)."""
  from array_record.python import array_record_module
  from tensorflow_datasets.core import file_adapters
  adapter = file_adapters.ArrayRecordFileAdapter
  original = adapter.__dict__['write_examples']

  def write_examples(cls, path, iterator):
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), ARRAY_RECORD_OPTIONS)
    for _, serialized in iterator:
      writer.write(serialized)
    writer.close()

  adapter.write_examples = classmethod(write_examples)
  try:
    yield
  finally:
    adapter.write_examples = original


def _write_atomically(data_dir: pathlib.Path, name: str, features,
                      split_examples: Mapping[str, Callable], metadata: dict,
                      overwrite: bool, extra_files: Mapping[str, str]) -> None:
  import tensorflow_datasets as tfds
  data_dir.mkdir(parents=True, exist_ok=True)
  _remove_stale_scratch(data_dir, name)
  scratch = data_dir / f'.{name}-building-{os.getpid()}-{uuid.uuid4().hex[:8]}'
  scratch.mkdir()
  try:
    tfds.disable_progress_bar()
    builder = _builder_class()(name=name, features=features, split_examples=split_examples,
                               metadata=metadata, data_dir=str(scratch))
    with _uncompressed_array_records():
      builder.download_and_prepare()
    built = scratch / name / VERSION
    for fname, src in extra_files.items():
      shutil.copyfile(src, built / fname)
    final = data_dir / name / VERSION
    final.parent.mkdir(exist_ok=True)
    if final.exists():
      if not overwrite:
        raise UserError(f'{final}: dataset appeared during the build; not replaced')
      old = scratch / 'previous'
      os.rename(final, old)
    os.rename(built, final)  # the one step that makes the dataset visible
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def read_metadata(data_dir: str | os.PathLike, name: str) -> dict:
  """The metadata stored with a built dataset (registry, chip size, report)."""
  import tensorflow_datasets as tfds
  path = pathlib.Path(data_dir) / name / VERSION
  if not (path / 'dataset_info.json').exists():
    raise UserError(f'{path}: no dataset here; build one with '
                    f'`python -m jaisp_jax.data.build ... --data-dir {data_dir} --name {name}`')
  return dict(tfds.builder_from_directory(str(path)).info.metadata)
