"""Synthetic held-out data and toy representations: known answers for the probes.

`star_field` draws Gaussian stars of known S/N, colour and per-chip band offsets in
white noise; the toy models below are representations whose content is known, so a
probe on them has a known right answer:

  PixelModel     tokens = the raw pixels of each token (noise units): keeps everything,
                 including sub-pixel position (registration must succeed).
  MomentModel    tokens = [centroid x, centroid y (px from the token centre), log10
                 flux] of the significant pixels of each token: sub-pixel position and
                 flux in three numbers, linearly readable (heads must succeed).
  BlindModel     tokens = a constant: carries nothing (heads must land at chance and the
                 shift sensitivity must be flat).

All follow the inference API: get_representation(image, rms, band) with (B, 1, H, W)
inputs -> {'tokens' (B, N, D), 'global' (B, D), 'weights' (B, 1, H, W),
'token_weights' (B, N)}; tokens are `token_arcsec` on a side.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.evaluate import heldout as heldout_lib

AB_NJY = 31.4  # mag = 31.4 - 2.5 log10(flux / nJy)


def star_field(n_chips: int = 8, size: int = 64, n_stars: int = 6,
               bands: Sequence[str] = ('rubin_r', 'rubin_g'), snr_range=(20.0, 400.0),
               colour_range=(-1.0, 1.0), offset_mas: float = 80.0, psf_sigma_px: float = 1.5,
               rms_njy: float = 2.0, token_px: int = 16, jitter_px: float = 2.0, seed: int = 0,
               registry: bands_lib.BandRegistry | None = None) -> heldout_lib.HeldOut:
  """Chips of one instrument with isolated Gaussian stars near token centres.

  The first band is the reference: its stars sit at their catalogue positions; every
  other band of a chip is displaced by a uniform random offset in +-offset_mas per axis
  (`Truth.offset_mas`). The first band's S/N is log-uniform in `snr_range`; the colour
  mag_first - mag_other is uniform in `colour_range`. Images are in nJy with rms
  `rms_njy` (so physical and noise units differ). Every chip is its own sky region.
  """
  registry = registry or bands_lib.default_registry()
  inst = registry[bands[0]].instrument
  if any(registry[b].instrument != inst for b in bands):
    raise ValueError('star_field: all bands must belong to one instrument')
  scale = registry[bands[0]].pixel_scale
  rng = np.random.default_rng(seed)
  nb = registry.n_bands(inst)
  images = np.zeros((n_chips, nb, size, size), np.float32)
  rms = np.full_like(images, rms_njy)
  n_tok = size // token_px
  yy, xx = np.mgrid[:size, :size]
  norm = 4 * np.pi * psf_sigma_px**2
  ids = [registry.band_id(b) for b in bands]
  offsets = np.zeros((n_chips, len(registry), 2))
  rows = []
  for k in range(n_chips):
    for b in bands[1:]:
      offsets[k, registry.band_id(b)] = rng.uniform(-offset_mas, offset_mas, 2)
    cells = rng.choice(n_tok * n_tok, size=min(n_stars, n_tok * n_tok), replace=False)
    for c in cells:
      i, j = divmod(int(c), n_tok)
      x0 = (j + 0.5) * token_px - 0.5 + rng.uniform(-jitter_px, jitter_px)
      y0 = (i + 0.5) * token_px - 0.5 + rng.uniform(-jitter_px, jitter_px)
      snr0 = np.exp(rng.uniform(*np.log(snr_range)))
      flux0 = snr0 * rms_njy * np.sqrt(norm)
      colour = rng.uniform(*colour_range)
      flux = np.zeros(len(registry))
      x = np.zeros(len(registry))
      y = np.zeros(len(registry))
      for n, b in enumerate(bands):
        bid = registry.band_id(b)
        flux[bid] = flux0 if n == 0 else flux0 * 10 ** (0.4 * colour)
        x[bid] = x0 + offsets[k, bid, 0] / (1000 * scale)
        y[bid] = y0 + offsets[k, bid, 1] / (1000 * scale)
        star = np.exp(-((xx - x[bid])**2 + (yy - y[bid])**2) / (2 * psf_sigma_px**2))
        images[k, registry[b].index] += flux[bid] * star / (2 * np.pi * psf_sigma_px**2)
      rows.append((k, x, y, flux))
  images += rng.normal(0.0, rms_njy, images.shape).astype(np.float32)
  valid = np.zeros((n_chips, len(registry)), bool)
  valid[:, ids] = True
  flux = np.stack([r[3] for r in rows])
  with np.errstate(divide='ignore'):
    mag = np.where(flux > 0, AB_NJY - 2.5 * np.log10(np.maximum(flux, 1e-30)), np.inf)
  truth = heldout_lib.Truth(
      chip=np.array([r[0] for r in rows]), row=np.arange(len(rows)),
      type=np.full(len(rows), 'star'), in_chip=np.ones(len(rows), bool),
      x=np.stack([r[1] for r in rows]), y=np.stack([r[2] for r in rows]), flux=flux, mag=mag,
      snr=flux / (rms_njy * np.sqrt(norm)), redshift=np.zeros(len(rows)),
      size_arcsec=np.zeros(len(rows)), offset_mas=offsets,
      psf_fwhm_arcsec=np.full((n_chips, len(registry)), 2.3548 * psf_sigma_px * scale))
  return heldout_lib.HeldOut.from_arrays(
      registry, {inst: images}, {inst: rms}, band_valid=valid, truth=truth,
      pixel_unit='nJy per pixel', source=f'synthetic star field: {n_chips} chips of {size} px')


class _ToyModel:
  """Shared plumbing: per-token features of noise-unit views."""

  def __init__(self, registry: bands_lib.BandRegistry | None = None,
               token_arcsec: float = 3.2):
    self.registry = registry or bands_lib.default_registry()
    self.token_arcsec = token_arcsec

  def _patches(self, image, rms, band):
    image = np.asarray(image, np.float32)[:, 0]
    rms = np.asarray(rms, np.float32)[:, 0]
    med = np.median(np.where(rms > 0, rms, np.nan).reshape(rms.shape[0], -1), axis=1)
    med = np.where(np.isfinite(med) & (med > 0), med, 1.0)[:, None, None]
    img = np.where(rms > 0, image / med, 0.0)
    s = int(round(self.token_arcsec / self.registry[band].pixel_scale))
    n, hgt, wid = img.shape
    h, w = hgt // s, wid // s
    patches = img[:, :h * s, :w * s].reshape(n, h, s, w, s).transpose(0, 1, 3, 2, 4)
    return img, patches, s  # patches (n, h, w, s, s)

  def _features(self, patches, s):
    raise NotImplementedError

  def get_representation(self, image, rms, band):
    img, patches, s = self._patches(image, rms, band)
    n, h, w = patches.shape[:3]
    tokens = self._features(patches, s).reshape(n, h * w, -1).astype(np.float32)
    weights = 1.0 / (1.0 + np.exp(-(np.abs(img) - 3.5) / 0.25))
    tw = weights[:, :h * s, :w * s].reshape(n, h, s, w, s).mean(axis=(2, 4)).reshape(n, -1)
    return {'tokens': tokens, 'global': tokens.mean(axis=1), 'weights': weights[:, None],
            'token_weights': tw}


class PixelModel(_ToyModel):
  """tokens = the token's raw pixels (noise units), D = s^2."""

  def _features(self, patches, s):
    return patches.reshape(*patches.shape[:3], s * s)


class MomentModel(_ToyModel):
  """tokens = [centroid x, centroid y (px from the token centre), log10 flux] of the
  pixels above 5 sigma (zeros where there are none: empty tokens read exactly 0)."""

  def _features(self, patches, s):
    w = np.maximum(patches - 5.0, 0.0)
    total = w.sum(axis=(-2, -1))
    c = np.arange(s) - (s - 1) / 2
    with np.errstate(invalid='ignore', divide='ignore'):
      cx = np.where(total > 0, (w * c[None, :]).sum(axis=(-2, -1)) / total, 0.0)
      cy = np.where(total > 0, (w * c[:, None]).sum(axis=(-2, -1)) / total, 0.0)
    flux = np.log10(np.maximum(patches.sum(axis=(-2, -1)), 1.0))
    return np.stack([cx, cy, flux], axis=-1)


class BlindModel(_ToyModel):
  """tokens = a constant vector: the representation carries nothing."""

  def _features(self, patches, s):
    return np.ones(patches.shape[:3] + (4,), np.float32)
