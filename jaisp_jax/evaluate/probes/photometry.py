"""Photometry probe: a source's colour between two bands, from frozen features vs truth.

Truth: colour = mag_a - mag_b of the true total fluxes (`Truth.mag`). Sources: inside
the probe chips, S/N >= `snr_min` in both bands, at least `aperture_arcsec` from the
chip edges. Estimators (fitted on the probe-train chips, scored on the probe-test chips):

  median        chance: the median colour of the probe-train sources, for every source.
  aperture      classical: -2.5 log10 of the ratio of sep.sum_circle fluxes in a circle
                of `aperture_arcsec` radius at the catalogue (WCS) position in each band
                (physical units), plus one constant (the median offset to the truth on
                the probe-train sources: an aperture-correction difference). Sources
                with a non-positive aperture flux in either band are failures.
  head          learned: a 2-layer MLP on [t_a, t_b] (each band's frozen tokens
                bilinearly sampled at the source) -> the colour in NOISE units,
                -2.5 log10((F_a / sigma_a) / (F_b / sigma_b)), sigma the chip's median
                rms of each band (the unit the model sees: get_representation divides
                by it); the prediction + 2.5 log10(sigma_a / sigma_b) is the colour.
  head_shuffled the same head with permuted training labels (chance control).

Figures: ``scatter_mag`` = 1.4826 x median |error - median error| (robust sigma),
``rms_mag`` (failures excluded), ``bias_mag`` = median error, ``n``, ``n_failed``.
Colours are in AB magnitudes.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate.probes import classical
from jaisp_jax.evaluate.probes import features
from jaisp_jax.evaluate.probes import heads


@dataclasses.dataclass(frozen=True)
class PhotometryConfig:
  """Photometry probe settings (module docstring)."""
  pairs: tuple[tuple[str, str], ...] = (('rubin_g', 'rubin_i'), ('rubin_r', 'euclid_vis'))
  snr_min: float = 5.0
  aperture_arcsec: float = 1.0
  head: heads.HeadConfig = heads.HeadConfig(hidden=64, steps=400, weight_decay=1e-3)
  train_fraction: float = 0.5
  split_seed: int = 0
  batch_size: int = 32


def stats(error: np.ndarray, ok: np.ndarray | None = None) -> dict[str, float]:
  """Robust scatter, rms, bias (mag) of colour errors; failures (not ok) counted apart."""
  error = np.asarray(error, float)
  ok = np.ones(error.shape, bool) if ok is None else np.asarray(ok, bool) & np.isfinite(error)
  e = error[ok]
  if e.size == 0:
    return {'scatter_mag': float('nan'), 'rms_mag': float('nan'), 'bias_mag': float('nan'),
            'n': 0, 'n_failed': int((~ok).sum())}
  med = float(np.median(e))
  return {'scatter_mag': float(1.4826 * np.median(np.abs(e - med))),
          'rms_mag': float(np.sqrt(np.mean(e**2))), 'bias_mag': med, 'n': int(e.size),
          'n_failed': int((~ok).sum())}


def select_sources(heldout: heldout_lib.HeldOut, band_a: str, band_b: str,
                   cfg: PhotometryConfig) -> np.ndarray:
  """Truth rows measured for the colour band_a - band_b (module docstring)."""
  tr = heldout.truth
  keep = tr.in_chip.copy()
  for band in (band_a, band_b):
    b = heldout.band_index(band)
    size = heldout.view(band, 'physical')[0].shape[-1]
    edge = cfg.aperture_arcsec / heldout.pixel_scale(band)
    keep &= heldout.band_valid[tr.chip, b] & (tr.snr[:, b] >= cfg.snr_min)
    keep &= ((tr.x[:, b] >= edge - 0.5) & (tr.x[:, b] <= size - 0.5 - edge)
             & (tr.y[:, b] >= edge - 0.5) & (tr.y[:, b] <= size - 0.5 - edge))
  return np.flatnonzero(keep)


def aperture_colours(heldout: heldout_lib.HeldOut, band_a: str, band_b: str, rows: np.ndarray,
                     cfg: PhotometryConfig) -> tuple[np.ndarray, np.ndarray]:
  """(colour (K,), ok (K,)) from circular-aperture fluxes (physical units)."""
  tr = heldout.truth
  flux = {}
  for band in (band_a, band_b):
    b = heldout.band_index(band)
    scale = heldout.pixel_scale(band)
    image, _, mask = heldout.view(band, 'physical')
    f = np.zeros(len(rows))
    good = np.zeros(len(rows), bool)
    for k in np.unique(tr.chip[rows]):
      sel = tr.chip[rows] == k
      r = rows[sel]
      x = tr.x[r, b] - tr.offset_mas[k, b, 0] / (1000 * scale)
      y = tr.y[r, b] - tr.offset_mas[k, b, 1] / (1000 * scale)
      f[sel], _, good[sel] = classical.aperture_flux(image[k], x, y, cfg.aperture_arcsec / scale,
                                                     mask=mask[k])
    flux[band] = (f, good)
  (fa, ga), (fb, gb) = flux[band_a], flux[band_b]
  ok = ga & gb & (fa > 0) & (fb > 0)
  with np.errstate(divide='ignore', invalid='ignore'):
    colour = np.where(ok, -2.5 * np.log10(np.where(ok, fa / fb, 1.0)), np.nan)
  return colour, ok


def _truth_colour(heldout, band_a, band_b, rows):
  return heldout.truth.colour(heldout.band_index(band_a), heldout.band_index(band_b))[rows]


def baselines(heldout: heldout_lib.HeldOut, cfg: PhotometryConfig = PhotometryConfig()
              ) -> dict[str, Any]:
  """{'<a>-<b>': {'median', 'aperture': figures, 'n_train', 'truth_colour_std'}}."""
  train, test = heldout.split(cfg.train_fraction, cfg.split_seed)
  out = {}
  for band_a, band_b in cfg.pairs:
    if not (heldout.has_band(band_a) and heldout.has_band(band_b)):
      continue
    rtr, rte = (select_sources(h, band_a, band_b, cfg) for h in (train, test))
    ctr, cte = _truth_colour(train, band_a, band_b, rtr), _truth_colour(test, band_a, band_b, rte)
    ap_tr, ok_tr = aperture_colours(train, band_a, band_b, rtr, cfg)
    ap_te, ok_te = aperture_colours(test, band_a, band_b, rte, cfg)
    offset = float(np.median((ctr - ap_tr)[ok_tr])) if ok_tr.any() else 0.0
    median = float(np.median(ctr)) if ctr.size else 0.0
    out[f'{band_a}-{band_b}'] = {
        'median': stats(np.full(cte.shape, median) - cte),
        'aperture': {**stats(ap_te + offset - cte, ok_te), 'aperture_correction_mag': offset},
        'n_train': int(rtr.size), 'truth_colour_std': float(np.std(cte)) if cte.size else None}
  return out


def _features(embed, heldout, band_a, band_b, rows):
  """[t_a, t_b] sampled at the sources, and the noise-unit colour offset of each source."""
  tr = heldout.truth
  parts, offsets = [], []
  for band in (band_a, band_b):
    b = heldout.band_index(band)
    image, rms, _ = heldout.view(band, 'noise')
    emb = embed(image, rms, band)
    u, v = features.token_coords(tr.x[rows, b], tr.y[rows, b], emb['stride'])
    parts.append(features.sample_grid(emb['tokens'], tr.chip[rows], u, v))
    inst = heldout.registry[band].instrument
    offsets.append(heldout.rms_scale[inst][tr.chip[rows], heldout.registry[band].index])
  # colour = noise-unit colour - 2.5 log10(sigma_a / sigma_b)
  shift = -2.5 * np.log10(offsets[0] / offsets[1])
  return np.concatenate(parts, axis=1), shift


def run(model: Any, heldout: heldout_lib.HeldOut, cfg: PhotometryConfig = PhotometryConfig()
        ) -> dict[str, Any]:
  """{'<a>-<b>': {'head', 'head_shuffled': figures}} on the probe-test sources."""
  train, test = heldout.split(cfg.train_fraction, cfg.split_seed)
  embed = features.Embedder(model, cfg.batch_size)
  out = {}
  for band_a, band_b in cfg.pairs:
    if not (heldout.has_band(band_a) and heldout.has_band(band_b)):
      continue
    rtr, rte = (select_sources(h, band_a, band_b, cfg) for h in (train, test))
    if rtr.size < 4 or rte.size == 0:
      out[f'{band_a}-{band_b}'] = {'skipped': f'{rtr.size} train / {rte.size} test sources'}
      continue
    x_tr, s_tr = _features(embed, train, band_a, band_b, rtr)
    x_te, s_te = _features(embed, test, band_a, band_b, rte)
    ctr, cte = _truth_colour(train, band_a, band_b, rtr), _truth_colour(test, band_a, band_b, rte)
    res = {}
    for name, shuffle in (('head', False), ('head_shuffled', True)):
      head = heads.fit(x_tr, ctr - s_tr, cfg.head, shuffle_labels=shuffle,
                       groups=train.truth.chip[rtr])
      res[name] = stats(head.predict(x_te)[:, 0] + s_te - cte)
    out[f'{band_a}-{band_b}'] = res
  return out
