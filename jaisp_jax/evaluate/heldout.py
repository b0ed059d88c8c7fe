"""Held-out chips with their truth: what the probes (jaisp_jax.evaluate.probes) score against.

    heldout = load_heldout(config, registry, max_chips=32)
    image, rms, mask = heldout.view('rubin_r', units='noise')   # (n, H, W) each
    heldout.truth.x[:, heldout.band_index('rubin_r')]           # (S,) px in the chip

Where the chips come from:

* ``config.data.data_dir`` set: the first `max_chips` chips of ``config.data.eval_split``
  of the TFDS dataset (the validation split: sky regions never used in training). A
  dataset built with ``build --simulate`` keeps its truth catalogue beside the records
  (``truth_<field>.ecsv`` + ``tiles_<field>.json``); a dataset built from tile folders
  has none, and ``truth`` is None (probes that need truth are then skipped with a note).
* ``config.data.data_dir`` empty (the smoke configs simulate their training field on the
  fly): a FRESH simulated field, seed ``config.data.simulate.seed + HELDOUT_SEED_OFFSET``,
  of the same tile and chip size, cut into chips the same way. Its sky was never seen in
  training (another seed draws another population), which is stronger than a spatial
  split; the on-the-fly field's own validation split is one or two chips, too few to
  train a probe.
* `HeldOut.from_arrays(...)`: any images (user data, real pixels, tests), truth optional.

Units. ``images`` and ``rms`` are PHYSICAL: nJy per pixel for simulated data, the input
files' unit otherwise; masked pixels are 0 in both and False in ``mask``.
``view(band, units='noise')`` divides both by ``rms_scale`` (the chip's median valid rms
of that band, as the input pipeline does), so sky noise is ~1 and image / rms is the
per-pixel S/N; ``units='physical'`` returns them unchanged. Models accept either (their
`get_representation` divides by the median rms itself).

Truth (`Truth`, simulated data only), one row per (chip, source) for every truth source
whose WCS position lies inside the chip grown by `margin_arcsec` (light of sources just
outside spills in; ``in_chip`` says which are inside). Band axes follow
``registry.names``. Positions are 0-based pixel coordinates IN THE CHIP of each band's
own instrument (pixel centres at integers, x along the last array axis), with that
band's astrometric offset of the tile included: ``x[s, b] = x_wcs + dx_mas[b] /
(1000 * pixel_scale[b])``. The offset itself is in ``offset_mas`` (n, n_bands, 2).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError

# Seed offset of the fresh held-out field simulated for on-the-fly configs.
HELDOUT_SEED_OFFSET = 10_007


@dataclasses.dataclass
class Truth:
  """Truth of the sources of held-out chips: one row per (chip, source); S rows.

  Band axes (length n_bands) follow ``registry.names``.

  Attributes:
    chip: (S,) index of the chip the row belongs to.
    row: (S,) row of the source in the field's truth table (`jaisp_jax.data.truth`).
    type: (S,) 'star' or 'galaxy'.
    in_chip: (S,) the WCS position lies inside the chip (else within the margin).
    x, y: (S, n_bands) true position in each band, pixels of the band's instrument in
      the chip, the band's astrometric offset included (module docstring).
    flux: (S, n_bands) true total flux, nJy.
    mag: (S, n_bands) AB magnitude of `flux` (inf where the flux is 0).
    snr: (S, n_bands) matched-filter S/N of the source in each band:
      flux / (rms * sqrt(4 pi (s_psf^2 + s_src^2))) with rms the background rms at the
      source (physical units), s_psf = FWHM / 2.355 and s_src = size / 1.177 (a Gaussian
      of that half-light radius) in pixels; background noise only (no source Poisson
      noise), so bright sources are optimistic. 0 where the band is not valid.
    redshift: (S,) 0 for stars.
    size_arcsec: (S,) flux-weighted half-light radius bulge_frac * hlr_bulge +
      (1 - bulge_frac) * hlr_disk (0 for stars).
    offset_mas: (n_chips, n_bands, 2) astrometric offset (dx, dy) of each band in each
      chip's tile, mas along +x / +y pixels (the sky itself is at the WCS position).
    psf_fwhm_arcsec: (n_chips, n_bands) PSF FWHM of each band in each chip's tile.
  """
  chip: np.ndarray
  row: np.ndarray
  type: np.ndarray
  in_chip: np.ndarray
  x: np.ndarray
  y: np.ndarray
  flux: np.ndarray
  mag: np.ndarray
  snr: np.ndarray
  redshift: np.ndarray
  size_arcsec: np.ndarray
  offset_mas: np.ndarray
  psf_fwhm_arcsec: np.ndarray

  @property
  def n_sources(self) -> int:
    return int(self.chip.shape[0])

  def colour(self, band_a: int, band_b: int) -> np.ndarray:
    """(S,) true colour mag_a - mag_b (band indices in registry order)."""
    return self.mag[:, band_a] - self.mag[:, band_b]

  def select(self, rows: np.ndarray) -> 'Truth':
    """The given source rows (chip-level arrays unchanged)."""
    per_source = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
                  if f.name not in ('offset_mas', 'psf_fwhm_arcsec')}
    return Truth(**per_source, offset_mas=self.offset_mas, psf_fwhm_arcsec=self.psf_fwhm_arcsec)


@dataclasses.dataclass
class HeldOut:
  """Held-out chips of every instrument (module docstring for units and truth).

  Attributes:
    registry: the band registry (band axes follow ``registry.names``).
    images, rms: {instrument: (n, nb, H, W) float32} physical units, masked pixels 0.
    mask: {instrument: (n, nb, H, W) bool} usable pixels.
    rms_scale: {instrument: (n, nb) float32} median valid rms of each chip and band.
    band_valid: (n, n_bands) bool, the band is usable in the chip.
    chip_id, tile: (n,) str; region: (n,) int sky region; origin: (n, 2) int (y0, x0)
      of the chip in reference-instrument (coarsest) pixels of its tile.
    pixel_unit: what the physical unit is ('nJy per pixel' for simulated data).
    truth: `Truth`, or None for data without truth.
    source: where the chips came from (one line).
    notes: remarks for the report (e.g. why truth is missing).
  """
  registry: bands_lib.BandRegistry
  images: dict[str, np.ndarray]
  rms: dict[str, np.ndarray]
  mask: dict[str, np.ndarray]
  rms_scale: dict[str, np.ndarray]
  band_valid: np.ndarray
  chip_id: np.ndarray
  tile: np.ndarray
  region: np.ndarray
  origin: np.ndarray
  pixel_unit: str = 'input units'
  truth: Truth | None = None
  source: str = ''
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def n_chips(self) -> int:
    return int(self.band_valid.shape[0])

  @property
  def bands(self) -> tuple[str, ...]:
    return self.registry.names

  @property
  def instruments(self) -> tuple[str, ...]:
    return tuple(i for i in self.registry.instruments if i in self.images)

  def band_index(self, band: str) -> int:
    return self.registry.band_id(band)

  def pixel_scale(self, band: str) -> float:
    return self.registry[band].pixel_scale

  def has_band(self, band: str) -> bool:
    return band in self.registry and self.registry[band].instrument in self.images

  def view(self, band: str, units: str = 'noise',
           chips: np.ndarray | Sequence[int] | None = None):
    """(image, rms, mask) of one band, each (n, H, W); units 'noise' or 'physical'."""
    b = self.registry[band]
    sel = slice(None) if chips is None else np.asarray(chips, int)
    image = self.images[b.instrument][sel, b.index]
    rms = self.rms[b.instrument][sel, b.index]
    mask = self.mask[b.instrument][sel, b.index]
    if units == 'noise':
      scale = self.rms_scale[b.instrument][sel, b.index][:, None, None]
      return (image / scale).astype(np.float32), (rms / scale).astype(np.float32), mask
    if units != 'physical':
      raise ValueError(f"units must be 'noise' or 'physical', got {units!r}")
    return image, rms, mask

  def subset(self, chips: np.ndarray | Sequence[int]) -> 'HeldOut':
    """The chips `chips` (indices), truth renumbered."""
    chips = np.asarray(chips, int)
    truth = None
    if self.truth is not None:
      chip_map = np.full(self.n_chips, -1)
      chip_map[chips] = np.arange(len(chips))
      rows = np.flatnonzero(chip_map[self.truth.chip] >= 0)
      # Keep the order of `chips`: sort rows by their new chip index.
      rows = rows[np.argsort(chip_map[self.truth.chip[rows]], kind='stable')]
      truth = self.truth.select(rows)
      truth.chip = chip_map[truth.chip]
      truth.offset_mas = self.truth.offset_mas[chips]
      truth.psf_fwhm_arcsec = self.truth.psf_fwhm_arcsec[chips]
    pick = lambda d: {k: v[chips] for k, v in d.items()}  # noqa: E731
    return dataclasses.replace(
        self, images=pick(self.images), rms=pick(self.rms), mask=pick(self.mask),
        rms_scale=pick(self.rms_scale), band_valid=self.band_valid[chips],
        chip_id=self.chip_id[chips], tile=self.tile[chips], region=self.region[chips],
        origin=self.origin[chips], truth=truth, notes=list(self.notes))

  def split(self, fraction: float = 0.5, seed: int = 0) -> tuple['HeldOut', 'HeldOut']:
    """(probe-train, probe-test) chips, split by sky region (never one region in both).

    About `fraction` of the regions (at least one, and at least one left) go to the
    probe-train part; with a single region, chips alternate instead (then train and test
    chips may be neighbours on the sky; noted).
    """
    regions = np.unique(self.region)
    if len(regions) >= 2:
      order = np.random.default_rng(seed).permutation(regions)
      n_train = min(max(1, int(round(fraction * len(regions)))), len(regions) - 1)
      in_train = np.isin(self.region, order[:n_train])
    else:
      in_train = np.arange(self.n_chips) % 2 == 0
    return self.subset(np.flatnonzero(in_train)), self.subset(np.flatnonzero(~in_train))

  @classmethod
  def from_arrays(cls, registry: bands_lib.BandRegistry, images: Mapping[str, np.ndarray],
                  rms: Mapping[str, np.ndarray], *, band_valid: np.ndarray | None = None,
                  truth: Truth | None = None, tile: Sequence[str] | None = None,
                  region: Sequence[int] | None = None, pixel_unit: str = 'input units',
                  source: str = 'arrays', notes: Sequence[str] = ()) -> 'HeldOut':
    """Held-out chips from arrays {instrument: (n, nb, H, W)} (user data, real pixels).

    Non-finite pixels and rms <= 0 are masked (set to 0). Without `region`, every chip
    is its own region.
    """
    imgs, rmss, masks, scales = {}, {}, {}, {}
    n = None
    for inst, image in images.items():
      image = np.asarray(image, np.float32)
      r = np.asarray(rms[inst], np.float32)
      if image.ndim != 4 or r.shape != image.shape:
        raise ValueError(f'{inst}: images and rms must both be (n, nb, H, W); got '
                         f'{image.shape} and {r.shape}')
      if image.shape[1] != registry.n_bands(inst):
        raise ValueError(f'{inst}: {image.shape[1]} bands but the registry has '
                         f'{registry.n_bands(inst)}')
      n = image.shape[0] if n is None else n
      if image.shape[0] != n:
        raise ValueError('every instrument needs the same number of chips')
      valid = np.isfinite(image) & np.isfinite(r) & (r > 0)
      imgs[inst] = np.where(valid, image, 0.0).astype(np.float32)
      rmss[inst] = np.where(valid, r, 0.0).astype(np.float32)
      masks[inst] = valid
      scales[inst] = _median_scales(rmss[inst], valid)
    if band_valid is None:
      band_valid = np.zeros((n, len(registry)), bool)
      for inst in imgs:
        for b in registry.instrument_bands(inst):
          band_valid[:, registry.band_id(b.name)] = masks[inst][:, b.index].mean(axis=(1, 2)) > 0.5
    tile = np.asarray(tile if tile is not None else [f'chip_{k}' for k in range(n)], str)
    region = np.asarray(region if region is not None else np.arange(n), np.int64)
    return cls(registry=registry, images=imgs, rms=rmss, mask=masks, rms_scale=scales,
               band_valid=np.asarray(band_valid, bool), chip_id=tile.copy(), tile=tile,
               region=region, origin=np.zeros((n, 2), np.int64), pixel_unit=pixel_unit,
               truth=truth, source=source, notes=list(notes))


def _median_scales(rms: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """(n, nb) median valid rms per chip and band (1 where nothing is valid)."""
  out = np.ones(rms.shape[:2], np.float32)
  for k in range(rms.shape[0]):
    for b in range(rms.shape[1]):
      if valid[k, b].any():
        out[k, b] = np.median(rms[k, b][valid[k, b]])
  return out


# -- truth of chips -----------------------------------------------------------------


def chip_truth(table, tiles_meta: Mapping[str, Any], registry: bands_lib.BandRegistry,
               chips: Sequence[tuple[str, int, int]], chip_px: int,
               rms: Mapping[str, np.ndarray], margin_arcsec: float = 2.0) -> Truth:
  """`Truth` of chips [(tile, y0, x0)] cut from a simulated field.

  Args:
    table, tiles_meta: the field's truth (`jaisp_jax.data.truth.load_truth`).
    chip_px: chip side in reference-instrument (coarsest) pixels; y0, x0 in those pixels.
    rms: {instrument: (n, nb, H, W)} physical rms maps of the chips (for the S/N).
    margin_arcsec: also keep sources this far outside the chip (``in_chip`` False).
  """
  from jaisp_jax.data import truth as truth_lib
  names = registry.names
  ref = max(registry.instruments, key=registry.pixel_scale)
  ref_scale = registry.pixel_scale(ref)
  pos = {b: truth_lib.band_positions(table, tiles_meta, b) for b in names}  # tile px
  tile_col = np.asarray(table['tile'], str)
  xr, yr = np.asarray(table[f'x_{ref}'], float), np.asarray(table[f'y_{ref}'], float)
  flux_all = np.stack([np.asarray(table[f'flux_{b}'], float) for b in names], axis=1)
  bulge = np.asarray(table['bulge_frac'], float)
  size_all = bulge * np.asarray(table['hlr_bulge'], float) + (1 - bulge) * np.asarray(
      table['hlr_disk'], float)
  margin = margin_arcsec / ref_scale
  parts = []
  offsets = np.zeros((len(chips), len(names), 2))
  fwhm = np.zeros((len(chips), len(names)))
  for k, (tile, y0, x0) in enumerate(chips):
    tmeta = tiles_meta['tiles'][tile]['bands']
    for j, b in enumerate(names):
      if b in tmeta:
        offsets[k, j] = (tmeta[b]['dx_mas'], tmeta[b]['dy_mas'])
        fwhm[k, j] = tmeta[b]['psf_fwhm_arcsec']
    # Pixel j spans [j - 0.5, j + 0.5): the chip spans [x0 - 0.5, x0 + chip_px - 0.5).
    lo_x, lo_y = x0 - 0.5, y0 - 0.5
    near = ((tile_col == tile) & (xr >= lo_x - margin) & (xr < lo_x + chip_px + margin)
            & (yr >= lo_y - margin) & (yr < lo_y + chip_px + margin))
    rows = np.flatnonzero(near)
    inside = ((xr[rows] >= lo_x) & (xr[rows] < lo_x + chip_px) & (yr[rows] >= lo_y)
              & (yr[rows] < lo_y + chip_px))
    x = np.zeros((len(rows), len(names)))
    y = np.zeros_like(x)
    snr = np.zeros_like(x)
    for j, b in enumerate(names):
      band = registry[b]
      f = int(round(ref_scale / band.pixel_scale))
      x[:, j] = pos[b][0][rows] - x0 * f
      y[:, j] = pos[b][1][rows] - y0 * f
      if band.instrument not in rms:
        continue
      r = rms[band.instrument][k, band.index]  # (H, W)
      ix = np.clip(np.round(x[:, j]).astype(int), 0, r.shape[1] - 1)
      iy = np.clip(np.round(y[:, j]).astype(int), 0, r.shape[0] - 1)
      local = r[iy, ix]
      if not np.any(local > 0):
        continue
      local = np.where(local > 0, local, np.median(r[r > 0]))
      s_psf = fwhm[k, j] / 2.3548 / band.pixel_scale
      s_src = size_all[rows] / 1.1774 / band.pixel_scale
      snr[:, j] = flux_all[rows, j] / (local * np.sqrt(4 * np.pi * (s_psf**2 + s_src**2)))
    parts.append(dict(chip=np.full(len(rows), k), row=rows, in_chip=inside, x=x, y=y, snr=snr))
  cat = {key: np.concatenate([p[key] for p in parts]) if parts else np.zeros(0)
         for key in ('chip', 'row', 'in_chip', 'x', 'y', 'snr')}
  rows = cat['row'].astype(int)
  width = len(names)
  mag = np.stack([np.asarray(table[f'mag_{b}'], float) for b in names], axis=1)[rows]
  return Truth(
      chip=cat['chip'].astype(int), row=rows,
      type=np.asarray(table['type'], str)[rows], in_chip=cat['in_chip'].astype(bool),
      x=cat['x'].reshape(-1, width), y=cat['y'].reshape(-1, width),
      flux=flux_all[rows], mag=mag, snr=cat['snr'].reshape(-1, width),
      redshift=np.asarray(table['redshift'], float)[rows], size_arcsec=size_all[rows],
      offset_mas=offsets, psf_fwhm_arcsec=fwhm)


# -- records -> HeldOut -------------------------------------------------------------


def _text(v) -> str:
  if isinstance(v, bytes):
    return v.decode()
  if isinstance(v, np.ndarray) and v.ndim == 0:
    return _text(v.item())
  return str(v)


def from_records(records: Sequence[Mapping[str, Any]], registry: bands_lib.BandRegistry, *,
                 table=None, tiles_meta: Mapping[str, Any] | None = None,
                 pixel_unit: str = 'input units', source: str = '',
                 notes: Sequence[str] = (), margin_arcsec: float = 2.0) -> HeldOut:
  """HeldOut of chip records (`jaisp_jax.data.tfds_builder` features), truth optional."""
  if not records:
    raise UserError(f'{source or "held-out data"}: no chip to evaluate')
  insts = [i for i in registry.instruments if i in records[0]['instruments']]
  stack = lambda inst, key: np.stack([np.asarray(r['instruments'][inst][key])  # noqa: E731
                                      for r in records])
  images = {i: stack(i, 'image').astype(np.float32) for i in insts}
  rms = {i: stack(i, 'rms').astype(np.float32) for i in insts}
  mask = {i: rms[i] > 0 for i in insts}
  scales = {i: stack(i, 'rms_scale').astype(np.float32) for i in insts}
  band_valid = np.zeros((len(records), len(registry)), bool)
  for i in insts:
    bv = stack(i, 'band_valid').astype(bool)
    for b in registry.instrument_bands(i):
      band_valid[:, registry.band_id(b.name)] = bv[:, b.index]
  tile = np.array([_text(r['tile']) for r in records])
  origin = np.stack([np.asarray(r['origin'], np.int64) for r in records])
  truth = None
  notes = list(notes)
  if table is not None and tiles_meta is not None:
    ref = max(insts, key=registry.pixel_scale)
    chip_px = images[ref].shape[-1]
    chips = [(t, int(o[0]), int(o[1])) for t, o in zip(tile, origin)]
    truth = chip_truth(table, tiles_meta, registry, chips, chip_px, rms, margin_arcsec)
  return HeldOut(
      registry=registry, images=images, rms=rms, mask=mask, rms_scale=scales,
      band_valid=band_valid, chip_id=np.array([_text(r['id']) for r in records]), tile=tile,
      region=np.array([int(np.asarray(r['region'])) for r in records], np.int64),
      origin=origin, pixel_unit=pixel_unit, truth=truth, source=source, notes=notes)


def _dataset_truth(data_dir: str, name: str):
  """(table, tiles_meta, note) of a built dataset: its truth files, if it has one pair."""
  from jaisp_jax.data import tfds_builder
  from jaisp_jax.data import truth as truth_lib
  folder = os.path.join(data_dir, name, tfds_builder.VERSION)
  fields = sorted(os.path.basename(p)[len('truth_'):-len('.ecsv')]
                  for p in glob.glob(os.path.join(folder, 'truth_*.ecsv')))
  fields = [f for f in fields if os.path.exists(truth_lib.tiles_path(folder, f))]
  if len(fields) != 1:
    why = 'no truth catalogue' if not fields else f'{len(fields)} truth catalogues'
    return None, None, (f'{folder}: {why} (truth_<field>.ecsv + tiles_<field>.json); '
                        'probes that need truth are skipped')
  table, tiles_meta = truth_lib.load_truth(folder, fields[0])
  return table, tiles_meta, None


def load_heldout(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry | None = None,
                 *, max_chips: int = 64, split: str | None = None, n_tiles: int | None = None,
                 seed: int | None = None, size: int | None = None, chip_px: int | None = None,
                 margin_arcsec: float = 2.0) -> HeldOut:
  """Held-out chips (with truth where the data has it) of an experiment config.

  Args:
    config: the experiment config (reads ``config.data``; module docstring).
    registry: band registry (default: ``config.bands``).
    max_chips: at most this many chips.
    split: TFDS split (default ``config.data.eval_split``).
    n_tiles, seed, size, chip_px: on-the-fly configs only (empty ``data_dir``): the
      fresh field's tiles (default: enough for `max_chips`), simulator seed (default
      ``config.data.simulate.seed + HELDOUT_SEED_OFFSET``), tile side and chip side in
      Rubin pixels (default ``config.data.simulate.size`` / ``chip_px``).
    margin_arcsec: truth sources this far outside a chip are kept (``in_chip`` False).
  """
  registry = registry or bands_lib.BandRegistry.from_config(config.bands)
  data = config.data
  if not data.data_dir:
    sim = data.simulate
    size = int(size or sim.size)
    chip_px = int(chip_px or sim.chip_px)
    per_tile = (size // chip_px) ** 2
    if per_tile == 0:
      raise UserError(f'chip_px {chip_px} is larger than the tile size {size}')
    n_tiles = int(n_tiles or math.ceil(max_chips / per_tile))
    seed = int(sim.seed) + HELDOUT_SEED_OFFSET if seed is None else int(seed)
    return simulated_heldout(registry, n_tiles=n_tiles, seed=seed, size=size, chip_px=chip_px,
                             max_chips=max_chips, margin_arcsec=margin_arcsec)
  from jaisp_jax.data import pipeline
  split = split or data.eval_split
  source = pipeline.open_source(data, split, registry)
  n = min(max_chips, len(source))
  records = [source[k] for k in range(n)]
  table, tiles_meta, note = _dataset_truth(data.data_dir, data.name)
  return from_records(records, registry, table=table, tiles_meta=tiles_meta,
                      pixel_unit='nJy per pixel' if table is not None else 'input units',
                      source=f'{data.data_dir}/{data.name} split {split!r}: {n} of '
                             f'{len(source)} chips',
                      notes=[note] if note else [], margin_arcsec=margin_arcsec)


@functools.lru_cache(maxsize=4)
def simulated_heldout(registry: bands_lib.BandRegistry, *, n_tiles: int, seed: int, size: int,
                      chip_px: int, max_chips: int | None = None,
                      margin_arcsec: float = 2.0) -> HeldOut:
  """A fresh simulated field in memory, cut into chips, with truth (cached per process).

  Tile k is `jaisp_jax.data.simulate.simulate_tile(k, seed)` at its place on the field
  grid; every tile is its own sky region. The returned arrays are read-only.
  """
  from jaisp_jax.data import simulate
  from jaisp_jax.data import tfds_builder
  from jaisp_jax.data import truth as truth_lib
  config = simulate.SimConfig(size=size)
  layouts = simulate.tile_layout(n_tiles, config, registry)
  simulate.prepare(config, registry)
  columns, records = [], []
  tiles_meta = {'bands': {b.name: dict(instrument=b.instrument, pixel_scale=b.pixel_scale)
                          for b in registry}, 'tiles': {}}
  ref = max(registry.instruments, key=registry.pixel_scale)
  for k in range(n_tiles):
    tile = simulate.simulate_tile(k, seed, config, registry,
                                  center_deg=layouts[k]['center_deg'], n_tiles=n_tiles)
    columns.append(tile.truth)
    tiles_meta['tiles'][tile.name] = tile.meta
    for y0, x0 in tfds_builder.chip_origins(size, size, chip_px, chip_px):
      insts = {}
      for inst in tile.images:
        f = int(round(registry.pixel_scale(ref) / registry.pixel_scale(inst)))
        sl = (slice(None), slice(y0 * f, (y0 + chip_px) * f), slice(x0 * f, (x0 + chip_px) * f))
        image, rms = tile.images[inst][sl], tile.rms[inst][sl]
        insts[inst] = dict(image=image, rms=rms, band_valid=np.ones(image.shape[0], bool),
                           rms_scale=np.median(rms, axis=(1, 2)).astype(np.float32))
      records.append(dict(id=f'{tile.name}/{y0:05d}_{x0:05d}', tile=tile.name,
                          origin=np.array([y0, x0]), region=k, instruments=insts))
      if max_chips and len(records) >= max_chips:
        break
    if max_chips and len(records) >= max_chips:
      n_tiles = k + 1
      break
  table = truth_lib.truth_table(columns)
  out = from_records(records, registry, table=table, tiles_meta=tiles_meta,
                     pixel_unit='nJy per pixel',
                     source=f'fresh simulated field: {n_tiles} tile(s) of {size} px, seed {seed}, '
                            f'{len(records)} chips of {chip_px} px',
                     margin_arcsec=margin_arcsec)
  for d in (out.images, out.rms, out.mask):
    for v in d.values():
      v.flags.writeable = False
  return out
