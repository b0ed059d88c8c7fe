"""The batch format: the contract between the input pipeline, the model and the train step.

A batch is a nested dict of numpy / jax arrays whose leading axis is the sample axis
(sharded along the mesh's data axis). It holds one or both of two parts:

``batch['pairs']`` -- view pairs for the latent objectives (jepa, two_view, detr_jepa).
  A view is one band of one instrument. Pairs are grouped by instrument combination
  so that every array has a static shape (a Rubin view is C x C px, a Euclid view of
  the same sky 2C x 2C px; they cannot share an array)::

    batch['pairs'][combo] = {           # combo = 'rubin-euclid', 'rubin-rubin', ...
        'a': view, 'b': view,           # view = {'image': (G, Ha, Wa) float32,
                                        #         'rms':   (G, Ha, Wa) float32,
                                        #         'mask':  (G, Ha, Wa) float32 in {0, 1},
                                        #         'band':  (G,) int32 registry band id}
        'kind': (G,) int32,             # pairing strategy that drew it (PAIR_KINDS)
    }

  ``combo_key(inst_a, inst_b)`` names the group, with instruments in registry order.
  The number of pairs G of every group is fixed by the config (quotas derived from the
  pairing probabilities), so a changing band mix never changes a shape and never
  recompiles: band identity travels as data (``band``), stems are gathered by id.

``batch['chips']`` -- all bands of every instrument for the same sky (clip,
  masked_band, evaluation)::

    batch['chips'][instrument] = {
        'image': (B, n_bands, H, W) float32, 'rms': ..., 'mask': ...,
        'band_valid': (B, n_bands) bool,  # False: band entirely masked in this tile
    }

Pixel units (noise-aware normalisation, done by the pipeline): ``image`` and ``rms``
are divided by the band's median valid rms over the chip, so empty sky has unit
noise whatever the band's depth or flux unit, and ``image / rms`` is the per-pixel
S/N the information map needs. Any non-linear stretch (asinh) is applied by the model
on top of this, so S/N stays exact. Masked pixels (NaN/Inf pixels, bad rms) have
``image = rms = mask = 0``: finite zeros, never NaN; the model must not divide by rms
where ``mask == 0``.

Geometry: views of one pair cover the same sky: a Rubin crop at (x, y) of size C
pairs with the Euclid crop at (2x, 2y) of size 2C, and flips / rot90 are applied
identically to both, so token (i, j) of every view is the same patch of sky.
"""

from __future__ import annotations

import itertools

import numpy as np

from jaisp_jax import bands as bands_lib

# Pairing strategies (the seeds' pairing table); index = value of `kind`.
PAIR_KINDS = ('cross_instrument', 'hard', 'random')


def combo_key(inst_a: str, inst_b: str) -> str:
  """Name of the pair group for two instruments (in registry order)."""
  return f'{inst_a}-{inst_b}'


def combos(registry: bands_lib.BandRegistry) -> list[tuple[str, str]]:
  """All instrument combinations (a <= b in registry order)."""
  return list(itertools.combinations_with_replacement(registry.instruments, 2))


def view_shape(registry: bands_lib.BandRegistry, instrument: str,
               crop_arcsec: float) -> tuple[int, int]:
  """Pixel shape of a square view of `crop_arcsec` on a side."""
  scale = registry.pixel_scale(instrument)
  n = int(round(crop_arcsec / scale))
  if abs(n * scale - crop_arcsec) > 1e-6:
    raise ValueError(f'crop of {crop_arcsec}" is not a whole number of {instrument} '
                     f'pixels ({scale}"/px)')
  return n, n


def synthetic_sources(rng: np.random.Generator, n: int, k: int = 3) -> np.ndarray:
  """(n, k, 3) random sources: (y, x) as fractions of the view side, peak S/N."""
  pos = rng.uniform(0.2, 0.8, size=(n, k, 2))
  amp = rng.uniform(10, 100, size=(n, k, 1))
  return np.concatenate([pos, amp], axis=-1)


def synthetic_view(rng: np.random.Generator, registry: bands_lib.BandRegistry,
                   instrument: str, n: int, crop_arcsec: float,
                   sources: np.ndarray | None = None,
                   band: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """A random view batch in the documented format (for tests and benchmarks).

  Gaussian sources (0.4" sigma) on unit white noise; pass the same `sources`
  to views of other bands/instruments to get views of the same sky.
  """
  h, w = view_shape(registry, instrument, crop_arcsec)
  if band is None:
    members = registry.instrument_bands(instrument)
    band = rng.choice([registry.band_id(b.name) for b in members], size=n)
  if sources is None:
    sources = synthetic_sources(rng, n)
  sigma = 0.4 / registry.pixel_scale(instrument)
  yy, xx = np.mgrid[0:h, 0:w]
  image = rng.normal(size=(n, h, w)).astype(np.float32)
  for i in range(n):
    for fy, fx, amp in sources[i]:
      image[i] += (amp * np.exp(-((yy - fy * h) ** 2 + (xx - fx * w) ** 2)
                                / (2 * sigma ** 2))).astype(np.float32)
  rms = np.ones((n, h, w), np.float32)
  return dict(image=image, rms=rms, mask=np.ones_like(rms),
              band=np.asarray(band, np.int32))


def synthetic_pairs_batch(seed: int, registry: bands_lib.BandRegistry,
                          quotas: dict[str, int], crop_arcsec: float) -> dict:
  """A random `batch['pairs']` with `quotas[combo]` pairs per group."""
  rng = np.random.default_rng(seed)
  out = {}
  for inst_a, inst_b in combos(registry):
    g = quotas.get(combo_key(inst_a, inst_b), 0)
    if g == 0:
      continue
    sources = synthetic_sources(rng, g)
    out[combo_key(inst_a, inst_b)] = dict(
        a=synthetic_view(rng, registry, inst_a, g, crop_arcsec, sources),
        b=synthetic_view(rng, registry, inst_b, g, crop_arcsec, sources),
        kind=rng.integers(0, len(PAIR_KINDS), size=g).astype(np.int32))
  return out


def synthetic_chips_batch(seed: int, registry: bands_lib.BandRegistry, n: int,
                          crop_arcsec: float) -> dict:
  """A random `batch['chips']` of `n` samples."""
  rng = np.random.default_rng(seed)
  sources = synthetic_sources(rng, n)
  out = {}
  for inst in registry.instruments:
    members = registry.instrument_bands(inst)
    views = [synthetic_view(rng, registry, inst, n, crop_arcsec, sources,
                            band=np.full(n, registry.band_id(b.name)))
             for b in members]
    out[inst] = {k: np.stack([v[k] for v in views], axis=1) for k in ('image', 'rms', 'mask')}
    out[inst]['band_valid'] = np.ones((n, len(members)), bool)
  return out
