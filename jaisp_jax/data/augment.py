"""Sky-aligned crops, flips / rot90, noise injection and normalisation of views.

Input: a multi-instrument *chip*, the same sky seen by every instrument::

    chip[instrument] = {'image': (n_bands, H_i, W_i) float32 (raw units, NaN allowed),
                        'rms':   (n_bands, H_i, W_i) float32,
                        'band_valid': (n_bands,) bool,       # optional, default all True
                        'rms_scale':  (n_bands,) float32}    # optional, see `band_scales`

where ``H_i * pixel_scale_i`` is the same for every instrument (a Rubin chip of
C x C px and a Euclid chip of 2C x 2C px). Output: views and chips in the batch
format of batch.py (one sample, no leading batch axis).

Geometry. The crop origin is drawn on the grid of the coarsest instrument and
scaled by the integer pixel-scale ratio for the others (Rubin crop at (x, y) of
size c <-> Euclid crop at (2x, 2y) of size 2c), then one flip and one rot90 count
are applied to every view of the sample. A pixel edge of the coarse grid is a
pixel edge of every finer grid, so after crop + flip + rot90 token (i, j) of every
view still covers the same sky.

Normalisation (the contract of batch.py). ``image`` and ``rms`` are divided by the
band's median valid rms over the whole chip (`band_scales`), so empty sky has unit
noise; pixels whose image or rms is not finite, or whose rms is <= 0, are masked:
``image = rms = mask = 0``. Noise injection adds Gaussian noise of ``alpha * rms``
to valid pixels and raises rms to ``rms * sqrt(1 + alpha^2)`` while keeping the
chip's scale, so a source keeps its amplitude and the view simply becomes shallower
(its sky noise is then ``sqrt(1 + alpha^2)``, and ``image / rms`` is still the S/N).
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from jaisp_jax import bands as bands_lib


def valid_pixels(image: np.ndarray, rms: np.ndarray) -> np.ndarray:
  """Bool mask of usable pixels: finite image, finite rms > 0."""
  with np.errstate(invalid='ignore'):
    return np.isfinite(image) & np.isfinite(rms) & (rms > 0)


def band_scales(image: np.ndarray, rms: np.ndarray) -> np.ndarray:
  """(n_bands,) median valid rms of each band of a (n_bands, H, W) chip (1 if none)."""
  out = np.ones(image.shape[0], np.float32)
  for k in range(image.shape[0]):
    ok = valid_pixels(image[k], rms[k])
    if ok.any():
      out[k] = np.median(rms[k][ok])
  return out


# Default fraction of valid pixels for a band of a chip to count as usable (training pairs
# and held-out retrieval alike).
MIN_VALID_FRACTION = 0.5


def band_validity(part: Mapping[str, np.ndarray],
                  min_valid_fraction: float | None = MIN_VALID_FRACTION) -> np.ndarray:
  """(n_bands,) bool: flagged valid and at least `min_valid_fraction` usable pixels.

  `min_valid_fraction=None` trusts the `band_valid` flags (records of the TFDS
  dataset carry flags computed over the chip at build time; no pixel pass needed).
  """
  image, rms = part['image'], part['rms']
  flag = np.asarray(part.get('band_valid', np.ones(image.shape[0], bool)), bool)
  if min_valid_fraction is None:
    return flag
  frac = valid_pixels(image, rms).reshape(image.shape[0], -1).mean(axis=1)
  return flag & (frac >= min_valid_fraction) & (frac > 0)


def chip_band_valid(chip: Mapping, registry: bands_lib.BandRegistry,
                    min_valid_fraction: float | None = MIN_VALID_FRACTION) -> np.ndarray:
  """(len(registry),) bool over registry band ids; instruments absent = invalid."""
  out = np.zeros(len(registry), bool)
  for inst, part in chip.items():
    valid = band_validity(part, min_valid_fraction)
    for band, ok in zip(registry.instrument_bands(inst), valid):
      out[registry.band_id(band.name)] = ok
  return out


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A crop on the coarsest grid plus one flip and rot90 shared by all views.

  Attributes:
    y0, x0: crop origin in pixels of the reference (coarsest) grid.
    size: crop side in reference pixels.
    ref_scale: arcsec per reference pixel.
    flip: mirror the last (x) axis before rotating.
    k: number of counter-clockwise quarter turns (np.rot90).
  """
  y0: int
  x0: int
  size: int
  ref_scale: float
  flip: bool = False
  k: int = 0

  def factor(self, scale: float) -> int:
    """Pixels of a grid of `scale` arcsec/px per reference pixel (an integer)."""
    ratio = self.ref_scale / scale
    f = int(round(ratio))
    if f < 1 or abs(ratio - f) > 1e-6:
      raise ValueError(f'pixel scale {scale}"/px does not divide the reference scale '
                       f'{self.ref_scale}"/px: views cannot be sky-aligned')
    return f

  def view(self, arr: np.ndarray, scale: float) -> np.ndarray:
    """Crop, flip and rot90 of the last two axes of `arr` as a view (no copy)."""
    f = self.factor(scale)
    y0, x0, n = self.y0 * f, self.x0 * f, self.size * f
    out = arr[..., y0:y0 + n, x0:x0 + n]
    if self.flip:
      out = out[..., ::-1]
    # np.rot90(out, k, axes=(-2, -1)) with slicing alone (np.rot90's axis checks cost
    # more than the view itself on a 64 x 64 crop).
    k = self.k % 4
    if k == 1:
      out = out[..., ::-1].swapaxes(-2, -1)
    elif k == 2:
      out = out[..., ::-1, ::-1]
    elif k == 3:
      out = out.swapaxes(-2, -1)[..., ::-1]
    return out

  def apply(self, arr: np.ndarray, scale: float) -> np.ndarray:
    """Crops, flips and rotates the last two axes of `arr` on a grid of `scale`."""
    return np.ascontiguousarray(self.view(arr, scale))


def chip_geometry(chip: Mapping, registry: bands_lib.BandRegistry) -> tuple[int, int, float]:
  """(H, W, scale) of the chip on its coarsest grid; checks the grids agree on the sky."""
  scales = {inst: registry.pixel_scale(inst) for inst in chip}
  ref_inst = max(scales, key=lambda i: scales[i])
  ref_scale = scales[ref_inst]
  h, w = chip[ref_inst]['image'].shape[-2:]
  probe = Geometry(0, 0, 1, ref_scale)
  for inst, part in chip.items():
    f = probe.factor(scales[inst])
    for key in ('image', 'rms'):
      if part[key].shape[-2:] != (h * f, w * f):
        raise ValueError(f'{inst} {key} is {part[key].shape[-2:]} px but the chip is '
                         f'{h} x {w} px at {ref_scale}"/px, i.e. {(h * f, w * f)} px '
                         f'at {scales[inst]}"/px')
  return h, w, ref_scale


def sample_geometry(rng: np.random.Generator, chip: Mapping,
                    registry: bands_lib.BandRegistry, crop_arcsec: float,
                    flip: bool = True, rot90: bool = True) -> Geometry:
  """A random sky-aligned crop of `crop_arcsec` with random flip / rot90."""
  h, w, ref_scale = chip_geometry(chip, registry)
  size = int(round(crop_arcsec / ref_scale))
  if size < 1 or abs(size * ref_scale - crop_arcsec) > 1e-6:
    raise ValueError(f'crop of {crop_arcsec}" is not a whole number of coarsest-grid '
                     f'pixels ({ref_scale}"/px)')
  if size > min(h, w):
    raise ValueError(f'crop of {size} px exceeds the chip ({h} x {w} px at {ref_scale}"/px)')
  y0 = int(rng.integers(0, h - size + 1))
  x0 = int(rng.integers(0, w - size + 1))
  do_flip = bool(rng.integers(0, 2)) if flip else False
  k = int(rng.integers(0, 4)) if rot90 else 0
  return Geometry(y0, x0, size, ref_scale, do_flip, k)


def _scale_of(part: Mapping, index: int) -> float:
  if 'rms_scale' in part:
    return float(np.asarray(part['rms_scale'])[index])
  return float(band_scales(part['image'][index:index + 1], part['rms'][index:index + 1])[0])


def make_view(chip: Mapping, registry: bands_lib.BandRegistry, band_id: int,
              geom: Geometry, rng: np.random.Generator | None = None,
              noise_alpha: float = 0.0) -> dict[str, np.ndarray]:
  """One normalised view of one band: image, rms, mask (h, w) float32, band ().

  `noise_alpha` > 0 injects Gaussian noise of `noise_alpha * rms` (needs `rng`).
  """
  band = registry.bands[band_id]
  part = chip[band.instrument]
  scale = np.float32(_scale_of(part, band.index))
  # Work on views of the crop and write each output once, contiguous, in the view's
  # orientation: the chip may be a cached read-only record, never written.
  src_image = geom.view(part['image'][band.index], band.pixel_scale)  # (h, w) view
  src_rms = geom.view(part['rms'][band.index], band.pixel_scale)      # (h, w) view
  shape = src_image.shape
  ok = np.isfinite(src_image, out=np.empty(shape, bool))  # = valid_pixels, C order
  with np.errstate(invalid='ignore', over='ignore'):
    ok &= np.isfinite(src_rms)
    ok &= src_rms > 0
    # float32 / float32 where valid, exactly as image / scale; 0 elsewhere.
    image = np.divide(src_image, scale, out=np.zeros(shape, np.float32), where=ok)
    rms = np.divide(src_rms, scale, out=np.zeros(shape, np.float32), where=ok)
  if noise_alpha > 0:
    noise = rng.standard_normal(image.shape).astype(np.float32)
    image = image + np.where(ok, noise * rms * np.float32(noise_alpha), 0).astype(np.float32)
    rms = rms * np.float32(np.sqrt(1.0 + noise_alpha ** 2))
  return dict(image=image, rms=rms, mask=ok.astype(np.float32),
              band=np.asarray(band_id, np.int32))


def noise_alpha(rng: np.random.Generator, prob: float, max_alpha: float) -> float:
  """Per-view noise strength: 0 with probability 1 - prob, else U(0, max_alpha)."""
  if prob <= 0 or max_alpha <= 0:
    return 0.0
  return float(rng.uniform(0.0, max_alpha)) if rng.random() < prob else 0.0


def make_pair(chip: Mapping, registry: bands_lib.BandRegistry, band_a: int, band_b: int,
              kind: int, geom: Geometry, rng: np.random.Generator,
              noise_prob: float = 0.0, noise_max_alpha: float = 0.0) -> dict:
  """One element of `batch['pairs'][combo]`: {'a': view, 'b': view, 'kind': ()}.

  Noise is drawn independently per view, so the two views may differ in depth.
  """
  views = {}
  for side, band_id in (('a', band_a), ('b', band_b)):
    alpha = noise_alpha(rng, noise_prob, noise_max_alpha)
    views[side] = make_view(chip, registry, band_id, geom, rng, alpha)
  views['kind'] = np.asarray(kind, np.int32)
  return views


def make_chip_sample(chip: Mapping, registry: bands_lib.BandRegistry, geom: Geometry,
                     min_valid_fraction: float | None = MIN_VALID_FRACTION,
                     valid: np.ndarray | None = None) -> dict:
  """One element of `batch['chips']`: every band of every instrument, normalised.

  `valid`: the chip's `chip_band_valid(chip, registry, min_valid_fraction)` when the
  caller already has it (the pipeline caches it with the chip).
  """
  if valid is None:
    valid = chip_band_valid(chip, registry, min_valid_fraction)
  out = {}
  for inst in registry.instruments:
    members = registry.instrument_bands(inst)
    views = [make_view(chip, registry, registry.band_id(b.name), geom) for b in members]
    out[inst] = {k: np.stack([v[k] for v in views]) for k in ('image', 'rms', 'mask')}
    out[inst]['band_valid'] = np.array([valid[registry.band_id(b.name)] for b in members])
  return out
