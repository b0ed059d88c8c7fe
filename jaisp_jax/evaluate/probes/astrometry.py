"""Astrometry probe: can the frozen representation see sub-pixel offsets between bands?

Truth: in the simulator every band b of a tile is displaced by an astrometric offset
o_b (tens of mas, `Truth.offset_mas`). The task is the RELATIVE offset of band b to the
reference band r, delta_b = o_b - o_r (mas, along +x / +y pixels), per chip (all
sources of a tile share it) and per source. Everything is measured on the probe-test
chips (`HeldOut.split`: sky regions the probe heads never trained on).

Estimators of delta_b (each returns a 2-vector in mas):

  zero          0: the residual is the truth itself (what doing nothing costs).
  centroid      classical: windowed centroids (sep.winpos, PSF-sized window) of the
                catalogue sources in band b and in band r, both started at the source's
                catalogue (WCS) position; per-source offset = position_b - position_r
                on the sky (failed where sep flags it or a centroid moves more than
                `centroid_max_move_arcsec` from its start). Per chip (tile): the
                inverse-variance weighted mean over its sources (`combine`), weights
                1 / sigma^2 with sigma = the per-source expected error (background-
                limited bound of both bands in quadrature, plus `sigma_floor_mas`).
  xcorr         classical, per chip: sub-pixel peak of the cross-correlation of the two
                images within +-`xcorr_max_shift_arcsec` (noise units; for cross-
                instrument pairs the coarser image DFT-interpolated onto the finer
                grid); per tile the mean over its chips.
  head          learned, per source: a 2-layer MLP on the frozen tokens of band b and r
                bilinearly sampled at the source, [t_b, t_r, t_b - t_r, band one-hot] ->
                delta (mas). Trained on the probe-train chips with band b Fourier-shifted
                by random known amounts s (|s| <= max_shift_mas per axis; label
                delta_b + s), tested on unshifted probe-test chips. Per chip: the
                weighted mean of the chip's per-source predictions (as `centroid`).
                ``head_fit``: the step early stopping kept (0 = the initial head, which
                predicts the training mean whatever the features: then a trained and an
                untrained model score identically) and the std of its predictions.
  head_shuffled the same head trained on permuted labels: the chance control (should
                land near `zero`).
  register      NO head, per chip: band b is Fourier-shifted by -t for trial shifts t
                (coarse grid, then a finer grid around the best point, then a parabola
                through the best 3 points per axis), re-embedded, and t maximising the
                token agreement with band r (mean token cosine weighted by r's token
                information weights) is the estimate.

Figures (`stats`): ``rms_mas`` = sqrt(mean |e|^2) of the 2-D residual e = estimate -
delta, ``median_mas`` = median |e|, ``n`` = number of estimates (per chip: (chip, band)
pairs; per tile: (tile, band) pairs; per source: (source, band) pairs), ``n_failed`` =
estimates the method could not make (counted as 0 in the figures). ``chip_level``: one
estimate per chip; ``tile_level``: one per simulated tile, from the sources of all its
held-out chips (the simulator draws one offset per tile and band, so they share it):
the largest area the data gives one offset for. Source-combining methods also give
``formal_rms_mas``: the rms the estimates would have if every source's error were its
sigma (the noise floor of the method on these chips: offsets much smaller than it
cannot be measured); ``centroid_error_scale`` = robust std of the per-source centroid
residuals in units of sigma (1 = errors at that floor). Per-source figures come for all
sources, for isolated ones (no other source with S/N > 1 within `isolation_arcsec`) and
by S/N bin (S/N = min over the two bands of `Truth.snr`).

Shift sensitivity (diagnostic, needs no truth): mean token cosine between a view and
its own copy Fourier-shifted by s mas along x (and along y; averaged), weighted by the
view's token information weights, for s in `sensitivity_shifts_mas`. ``drop_at_100mas``
= 1 - cosine(100 mas). The same curve on the raw pixels of each token (noise units) is
the baseline: a representation that keeps sub-pixel position falls off like the pixels;
one that is flat near zero cannot do astrometry.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate.probes import classical
from jaisp_jax.evaluate.probes import features
from jaisp_jax.evaluate.probes import heads


@dataclasses.dataclass(frozen=True)
class AstrometryConfig:
  """Astrometry probe settings (figures: module docstring)."""
  reference_band: str = 'rubin_r'
  bands: tuple[str, ...] = ('rubin_g', 'rubin_i', 'euclid_vis', 'euclid_h')  # () = all
  snr_min: float = 5.0                  # per-source sources: S/N >= this in both bands
  snr_bins: tuple[float, ...] = (5.0, 10.0, 20.0, 50.0, math.inf)
  isolation_arcsec: float = 2.0         # 'isolated': no S/N > 1 neighbour this close
  edge_arcsec: float = 1.0              # sources closer to a chip edge are left out
  centroid_max_move_arcsec: float = 0.25  # a centroid further than this from its start fails
  sigma_floor_mas: float = 20.0         # per-source error floor (blends, shapes) in weights
  xcorr_max_shift_arcsec: float = 0.4   # cross-correlation peak searched within +-this
  train_fraction: float = 0.5           # share of sky regions for the probe-train chips
  split_seed: int = 0
  n_train_shifts: int = 4               # synthetic shifts per (train chip, band)
  max_shift_mas: float = 150.0          # synthetic shifts uniform in +-this per axis
  head: heads.HeadConfig = heads.HeadConfig(hidden=64, steps=400)
  register_half_mas: float = 150.0      # coarse registration grid: +-this ...
  register_step_mas: float = 50.0       # ... in steps of this; then a fine grid of
  register_fine_mas: float = 12.5       # this step over +-register_step_mas / 2
  register_max_chips: int = 8           # test chips registered (the costly part)
  sensitivity_shifts_mas: tuple[float, ...] = (0.0, 10.0, 25.0, 50.0, 100.0, 150.0, 200.0)
  sensitivity_bands: tuple[str, ...] = ('rubin_r', 'euclid_vis')
  sensitivity_max_chips: int = 8
  batch_size: int = 32
  seed: int = 0                         # synthetic shifts


# -- shared helpers --------------------------------------------------------------------


def stats(residual: np.ndarray, n_failed: int = 0) -> dict[str, float]:
  """{'rms_mas', 'median_mas', 'n', 'n_failed'} of 2-D residuals (K, 2) in mas."""
  residual = np.asarray(residual, float).reshape(-1, 2)
  if residual.shape[0] == 0:
    return {'rms_mas': float('nan'), 'median_mas': float('nan'), 'n': 0, 'n_failed': n_failed}
  r = np.hypot(residual[:, 0], residual[:, 1])
  return {'rms_mas': float(np.sqrt(np.mean(r**2))), 'median_mas': float(np.median(r)),
          'n': int(r.size), 'n_failed': int(n_failed)}


def _bands(heldout: heldout_lib.HeldOut, cfg: AstrometryConfig) -> list[str]:
  names = cfg.bands or tuple(b for b in heldout.bands if b != cfg.reference_band)
  return [b for b in names if b != cfg.reference_band and heldout.has_band(b)]


def _sky(x, scale):
  """Pixel coordinate -> arcsec from the chip corner (shared by all instruments)."""
  return (np.asarray(x) + 0.5) * scale


@dataclasses.dataclass
class _Sources:
  """Per-source rows of one band pair on some chips."""
  rows: np.ndarray       # truth rows
  chip: np.ndarray
  band: np.ndarray       # index into the measured bands list
  snr: np.ndarray        # min S/N of the two bands
  isolated: np.ndarray
  truth_mas: np.ndarray  # (K, 2) delta_b of the source's chip
  sigma_mas: np.ndarray  # (K,) expected error of the source's offset per axis (below)


def _position_sigma_mas(tr, rows, band_idx) -> np.ndarray:
  """(K,) background-limited position error per axis (mas) of sources in one band: the
  Cramer-Rao bound sqrt(2) s / (S/N) of a Gaussian of sigma s = sqrt(s_psf^2 + s_src^2)
  (S/N the matched-filter `Truth.snr`). Real centroids do worse (blends, source noise,
  non-Gaussian profiles): this sets relative weights and the `formal_rms_mas` figures."""
  s_psf = tr.psf_fwhm_arcsec[tr.chip[rows], band_idx] / 2.3548
  s_src = tr.size_arcsec[rows] / 1.1774
  snr = np.maximum(tr.snr[rows, band_idx], 1e-3)
  return np.sqrt(2.0) * np.hypot(s_psf, s_src) / snr * 1000.0


def select_sources(heldout: heldout_lib.HeldOut, bands: list[str],
                   cfg: AstrometryConfig) -> _Sources:
  """Sources of `heldout` measured in every (band, reference) pair (module docstring)."""
  tr = heldout.truth
  r = heldout.band_index(cfg.reference_band)
  ref_scale = heldout.pixel_scale(cfg.reference_band)
  parts = []
  for j, band in enumerate(bands):
    b = heldout.band_index(band)
    scale = heldout.pixel_scale(band)
    size_px = heldout.view(band, 'physical')[0].shape[-1]
    size_ref = heldout.view(cfg.reference_band, 'physical')[0].shape[-1]
    edge_b, edge_r = cfg.edge_arcsec / scale, cfg.edge_arcsec / ref_scale
    valid = heldout.band_valid[tr.chip, b] & heldout.band_valid[tr.chip, r]
    inner = ((tr.x[:, b] >= edge_b - 0.5) & (tr.x[:, b] <= size_px - 0.5 - edge_b)
             & (tr.y[:, b] >= edge_b - 0.5) & (tr.y[:, b] <= size_px - 0.5 - edge_b)
             & (tr.x[:, r] >= edge_r - 0.5) & (tr.x[:, r] <= size_ref - 0.5 - edge_r)
             & (tr.y[:, r] >= edge_r - 0.5) & (tr.y[:, r] <= size_ref - 0.5 - edge_r))
    snr = np.minimum(tr.snr[:, b], tr.snr[:, r])
    rows = np.flatnonzero(tr.in_chip & valid & inner & (snr >= cfg.snr_min))
    # Isolation: any other source of the same chip with S/N > 1 in either band nearby.
    xs, ys = _sky(tr.x[:, r], ref_scale), _sky(tr.y[:, r], ref_scale)
    seen = np.maximum(tr.snr[:, b], tr.snr[:, r]) > 1.0
    isolated = np.ones(len(rows), bool)
    for k, s in enumerate(rows):
      near = (tr.chip == tr.chip[s]) & seen & (np.arange(tr.n_sources) != s)
      d = np.hypot(xs[near] - xs[s], ys[near] - ys[s])
      isolated[k] = not np.any(d < cfg.isolation_arcsec)
    delta = tr.offset_mas[tr.chip[rows], b] - tr.offset_mas[tr.chip[rows], r]
    sigma = np.sqrt(_position_sigma_mas(tr, rows, b)**2 + _position_sigma_mas(tr, rows, r)**2
                    + cfg.sigma_floor_mas**2)
    parts.append(_Sources(rows, tr.chip[rows], np.full(len(rows), j), snr[rows], isolated, delta,
                          sigma))
  cat = lambda key: np.concatenate([getattr(p, key) for p in parts])  # noqa: E731
  return _Sources(*(cat(f.name) for f in dataclasses.fields(_Sources))) if parts else None


def binned(residual: np.ndarray, failed: np.ndarray, src: _Sources,
           cfg: AstrometryConfig) -> dict[str, Any]:
  """Per-source figures: all, isolated, and by S/N bin (failed estimates count as 0)."""
  out = {'all': stats(residual, int(failed.sum())),
         'isolated': stats(residual[src.isolated], int(failed[src.isolated].sum())),
         'snr_bins': []}
  edges = cfg.snr_bins
  for lo, hi in zip(edges[:-1], edges[1:]):
    sel = (src.snr >= lo) & (src.snr < hi)
    out['snr_bins'].append({'snr_lo': float(lo), 'snr_hi': float(hi) if np.isfinite(hi) else None,
                            **stats(residual[sel], int(failed[sel].sum()))})
  return out


def _chip_truth(heldout, band, cfg):
  tr = heldout.truth
  b, r = heldout.band_index(band), heldout.band_index(cfg.reference_band)
  return tr.offset_mas[:, b] - tr.offset_mas[:, r]  # (n, 2)


def _chip_pairs(heldout, bands, cfg):
  """[(chip, j)] of chips where band j and the reference are valid."""
  r = heldout.band_index(cfg.reference_band)
  return [(k, j) for j, band in enumerate(bands) for k in range(heldout.n_chips)
          if heldout.band_valid[k, heldout.band_index(band)] and heldout.band_valid[k, r]]


@dataclasses.dataclass
class _Units:
  """What one estimate covers: a chip ('chip' level) or every chip of a tile ('tile'
  level: the simulator draws one offset per tile and band, so its chips share it)."""
  group: np.ndarray   # (n_chips,) group of each chip
  units: list         # [(group, j)] estimated pairs
  truth: np.ndarray   # (U, 2) delta_b of each unit
  members: list       # [indices into `pairs`] of each unit


def _units(heldout, bands, pairs, cfg, level: str) -> _Units:
  if level == 'chip':
    group = np.arange(heldout.n_chips)
  else:
    group = np.unique(heldout.tile, return_inverse=True)[1].reshape(-1)
  units = sorted({(int(group[k]), j) for k, j in pairs})
  index = {u: i for i, u in enumerate(units)}
  members = [[] for _ in units]
  truth = np.zeros((len(units), 2))
  for p, (k, j) in enumerate(pairs):
    i = index[(int(group[k]), j)]
    members[i].append(p)
    truth[i] = _chip_truth(heldout, bands[j], cfg)[k]
  return _Units(group, units, truth, members)


def combine(values: np.ndarray, src: _Sources, units: _Units, ok: np.ndarray):
  """Per unit (chip or tile, band): inverse-variance weighted mean of its sources'
  offsets, weights 1 / sigma_mas^2 (bright, compact sources count most; a plain median
  gives the many faint ones the say). Returns (est (U, 2) mas, failed (U,): no usable
  source, formal (U,): the mean's expected error per axis, 1 / sqrt(sum of weights))."""
  est = np.zeros((len(units.units), 2))
  failed = np.zeros(len(units.units), bool)
  formal = np.full(len(units.units), np.nan)
  weight = 1.0 / np.maximum(src.sigma_mas, 1e-6) ** 2
  group = units.group[src.chip]
  for u, (g, j) in enumerate(units.units):
    sel = (group == g) & (src.band == j) & ok
    if sel.any():
      est[u] = np.sum(weight[sel, None] * values[sel], axis=0) / np.sum(weight[sel])
      formal[u] = 1.0 / np.sqrt(np.sum(weight[sel]))
    else:
      failed[u] = True
  return est, failed, formal


def _unit_stats(est, failed, formal, units: _Units) -> dict[str, float]:
  """`stats` of (est - truth) (failed units count as estimate 0), plus `formal_rms_mas`:
  the rms the estimates would have if every source's error were its `sigma_mas`."""
  out = stats(np.where(failed[:, None], 0.0, est) - units.truth, int(failed.sum()))
  good = ~failed
  out['formal_rms_mas'] = float(np.sqrt(2 * np.mean(formal[good] ** 2))) if good.any() else float(
      'nan')
  return out


# -- classical baselines ----------------------------------------------------------------


def centroid_offsets(heldout: heldout_lib.HeldOut, bands: list[str], src: _Sources,
                     cfg: AstrometryConfig) -> tuple[np.ndarray, np.ndarray]:
  """(offsets (K, 2) mas, ok (K,)) of windowed centroids band - reference per source."""
  tr = heldout.truth
  ref = cfg.reference_band
  r = heldout.band_index(ref)
  out = np.zeros((len(src.rows), 2))
  ok = np.zeros(len(src.rows), bool)
  for j, band in enumerate(bands):
    b = heldout.band_index(band)
    for k in np.unique(src.chip[src.band == j]):
      sel = np.flatnonzero((src.band == j) & (src.chip == k))
      rows = src.rows[sel]
      pos = {}
      for name, idx in ((band, b), (ref, r)):
        scale = heldout.pixel_scale(name)
        image, _, mask = heldout.view(name, 'noise', [k])
        # Catalogue (WCS) position: the truth position without the band's offset.
        x0 = tr.x[rows, idx] - tr.offset_mas[k, idx, 0] / (1000 * scale)
        y0 = tr.y[rows, idx] - tr.offset_mas[k, idx, 1] / (1000 * scale)
        sigma = max(tr.psf_fwhm_arcsec[k, idx] / 2.3548 / scale, 0.5)
        x, y, good = classical.windowed_centroids(image[0], x0, y0, sigma, mask[0])
        # Offsets are a small fraction of the PSF: a centroid that wandered further was
        # pulled by a neighbour or by noise.
        good &= np.hypot(x - x0, y - y0) * scale < cfg.centroid_max_move_arcsec
        pos[name] = (_sky(x, scale), _sky(y, scale), good)
      xb, yb, gb = pos[band]
      xr, yr, gr = pos[ref]
      out[sel] = np.stack([xb - xr, yb - yr], axis=1) * 1000.0
      ok[sel] = gb & gr
  return out, ok


def xcorr_offsets(heldout: heldout_lib.HeldOut, bands: list[str], pairs,
                  cfg: AstrometryConfig) -> np.ndarray:
  """(P, 2) mas: cross-correlation offset of band j to the reference per (chip, j) pair.

  Cross-instrument pairs are compared on the FINER grid: the coarser (well-sampled,
  ground-based) image is DFT-interpolated onto it. Block-averaging the finer image
  instead aliases its undersampled sub-pixel structure (Euclid VIS: 0.17" PSF in 0.1"
  pixels) and biases the peak: a 150 mas shift of VIS then read as ~115 mas.
  """
  ref = cfg.reference_band
  ref_scale = heldout.pixel_scale(ref)
  est = np.zeros((len(pairs), 2))
  for p, (k, j) in enumerate(pairs):
    band = bands[j]
    scale = heldout.pixel_scale(band)
    img_b, _, mask_b = heldout.view(band, 'noise', [k])
    img_r, _, mask_r = heldout.view(ref, 'noise', [k])
    fine = min(scale, ref_scale)
    img_b = classical.upsample_to(img_b[0] * mask_b[0], int(round(scale / fine)))
    img_r = classical.upsample_to(img_r[0] * mask_r[0], int(round(ref_scale / fine)))
    dx, dy = classical.xcorr_shift(img_b, img_r, max_shift_px=cfg.xcorr_max_shift_arcsec / fine)
    est[p] = np.array([dx, dy]) * fine * 1000.0
  return est


def _mean_over_units(est_pairs: np.ndarray, units: _Units) -> np.ndarray:
  """(U, 2) plain mean of per-pair estimates over each unit's chips."""
  return np.array([est_pairs[m].mean(axis=0) for m in units.members]).reshape(-1, 2)


def _pull(values, ok, src) -> float:
  """Robust std (1.4826 MAD) of the per-source residuals in units of `sigma_mas`: how
  far the real errors exceed the background-limited bound (1 = at the bound)."""
  z = ((values - src.truth_mas) / src.sigma_mas[:, None])[ok]
  return float(1.4826 * np.median(np.abs(z))) if z.size else float('nan')


def classical_estimates(heldout: heldout_lib.HeldOut, cfg: AstrometryConfig = AstrometryConfig(),
                        level: str = 'chip') -> dict[str, Any]:
  """The classical estimates of delta_b on ALL chips of `heldout` (no split), per unit
  of `level` ('chip' or 'tile'): {'units': [(chip or tile number, band)], 'bands',
  'truth', 'centroid', 'xcorr': (U, 2) mas, 'centroid_failed': (U,) bool}."""
  bands = _bands(heldout, cfg)
  src = select_sources(heldout, bands, cfg)
  pairs = _chip_pairs(heldout, bands, cfg)
  units = _units(heldout, bands, pairs, cfg, level)
  cen, ok = centroid_offsets(heldout, bands, src, cfg)
  est, failed, _ = combine(cen, src, units, ok)
  xc = _mean_over_units(xcorr_offsets(heldout, bands, pairs, cfg), units)
  return {'units': units.units, 'bands': bands, 'truth': units.truth, 'centroid': est,
          'centroid_failed': failed, 'xcorr': xc}


def baselines(heldout: heldout_lib.HeldOut, cfg: AstrometryConfig = AstrometryConfig()
              ) -> dict[str, Any]:
  """Classical figures (zero, centroid, xcorr) on the probe-test chips."""
  _, test = heldout.split(cfg.train_fraction, cfg.split_seed)
  bands = _bands(test, cfg)
  if not bands or not test.has_band(cfg.reference_band):
    return {'skipped': f'no band to measure against {cfg.reference_band} in the data'}
  src = select_sources(test, bands, cfg)
  pairs = _chip_pairs(test, bands, cfg)
  cen, ok = centroid_offsets(test, bands, src, cfg)
  xc = xcorr_offsets(test, bands, pairs, cfg)
  per_source_zero = binned(src.truth_mas, np.zeros(len(src.rows), bool), src, cfg)
  cen_res = np.where(ok[:, None], cen - src.truth_mas, -src.truth_mas)
  out = {
      'per_source': {'zero': per_source_zero, 'centroid': binned(cen_res, ~ok, src, cfg)},
      'centroid_error_scale': _pull(cen, ok, src),
      'n_test_chips': test.n_chips, 'n_chip_estimates': len(pairs),
      'n_sources': int(len(src.rows)), 'n_isolated': int(src.isolated.sum()),
      'bands': bands, 'reference_band': cfg.reference_band,
  }
  for level in ('chip', 'tile'):
    units = _units(test, bands, pairs, cfg, level)
    if level == 'chip':
      out['truth_offsets_mas'] = {'rms': stats(units.truth)['rms_mas'], 'max_abs': float(
          np.max(np.abs(units.truth))) if units.truth.size else float('nan')}
    out[f'n_{level}_estimates'] = len(units.units)
    out[f'{level}_level'] = {
        'zero': stats(units.truth),
        'centroid': _unit_stats(*combine(cen, src, units, ok), units),
        'xcorr': stats(_mean_over_units(xc, units) - units.truth)}
  return out


# -- learned head ----------------------------------------------------------------------


def _source_features(grid_b, grid_r, stride_r, chips, x_ref, y_ref, band_j, n_bands):
  u, v = features.token_coords(x_ref, y_ref, stride_r)
  fb = features.sample_grid(grid_b, chips, u, v)
  fr = features.sample_grid(grid_r, chips, u, v)
  onehot = np.eye(n_bands, dtype=np.float32)[band_j]
  diff = [fb - fr] if fb.shape == fr.shape else []  # (toy models may differ in D)
  return np.concatenate([fb, fr] + diff + [onehot], axis=1)


def _head_examples(embed, heldout, bands, cfg, shifts_per_view: int, rng):
  """Features and labels (mas) of the sources of `heldout`; band b shifted by random s."""
  tr = heldout.truth
  ref = cfg.reference_band
  r = heldout.band_index(ref)
  src = select_sources(heldout, bands, cfg)
  if src is None or len(src.rows) == 0:
    return np.zeros((0, 1)), np.zeros((0, 2)), np.zeros(0, int), src
  ref_img, ref_rms, _ = heldout.view(ref, 'noise')
  ref_emb = embed(ref_img, ref_rms, ref)
  xs, ys, gs = [], [], []
  for j, band in enumerate(bands):
    sel = src.band == j
    if not sel.any():
      continue
    chips = np.unique(src.chip[sel])
    img, rms, _ = heldout.view(band, 'noise', chips)
    scale = heldout.pixel_scale(band)
    for _ in range(max(shifts_per_view, 1)):
      if shifts_per_view > 0:
        s = rng.uniform(-cfg.max_shift_mas, cfg.max_shift_mas, size=(len(chips), 2))
        im, rm = features.shift_view(img, rms, s[:, 0] / (1000 * scale), s[:, 1] / (1000 * scale))
      else:
        s = np.zeros((len(chips), 2))
        im, rm = img, rms
      emb = embed(im, rm, band)
      local = np.searchsorted(chips, src.chip[sel])
      rows = src.rows[sel]
      f = _source_features(emb['tokens'], ref_emb['tokens'][chips], ref_emb['stride'],
                           local, tr.x[rows, r], tr.y[rows, r], src.band[sel], len(bands))
      xs.append(f)
      ys.append(src.truth_mas[sel] + s[local])
      gs.append(src.chip[sel])
  return np.concatenate(xs), np.concatenate(ys), np.concatenate(gs), src


def _register(embed, heldout, band, ref_emb, k, cfg) -> np.ndarray:
  """(dx, dy) mas maximising token agreement of band (shifted by -t) with the reference."""
  img, rms, _ = heldout.view(band, 'noise', [k])
  scale = heldout.pixel_scale(band)
  ref_tok = ref_emb['tokens'][k]  # (h, w, D)
  tw = ref_emb['token_weights']
  weight = np.ones(ref_tok.shape[:2]) if tw is None else tw[k] + 1e-3

  def scores(trials):  # trials (T, 2) mas -> (T,)
    im, rm = features.shift_view(np.repeat(img, len(trials), 0), np.repeat(rms, len(trials), 0),
                                 -trials[:, 0] / (1000 * scale), -trials[:, 1] / (1000 * scale))
    tok = embed(im, rm, band)['tokens']  # (T, h, w, D)
    cos = features.cosine(tok, ref_tok[None])  # (T, h, w)
    return np.sum(cos * weight, axis=(1, 2)) / np.sum(weight)

  def grid(center, half, step):
    offs = np.arange(-half, half + step / 2, step)
    gx, gy = np.meshgrid(center[0] + offs, center[1] + offs)
    return offs, np.stack([gx.ravel(), gy.ravel()], axis=1)

  offs, trials = grid(np.zeros(2), cfg.register_half_mas, cfg.register_step_mas)
  s = scores(trials)
  best = trials[np.argmax(s)]
  offs, trials = grid(best, cfg.register_step_mas / 2, cfg.register_fine_mas)
  s = scores(trials).reshape(len(offs), len(offs))  # [y, x]
  iy, ix = np.unravel_index(np.argmax(s), s.shape)
  est = np.array([best[0] + offs[ix], best[1] + offs[iy]])
  # Parabola through the best point and its neighbours, per axis (sub-step refinement).
  for axis, (line, i) in enumerate(((s[iy, :], ix), (s[:, ix], iy))):
    if 0 < i < len(line) - 1:
      den = line[i - 1] - 2 * line[i] + line[i + 1]
      if den < 0:
        est[axis] += 0.5 * (line[i - 1] - line[i + 1]) / den * cfg.register_fine_mas
  return est


def shift_sensitivity(model: Any, heldout: heldout_lib.HeldOut,
                      cfg: AstrometryConfig = AstrometryConfig()) -> dict[str, Any]:
  """Token cosine between views and their own shifted copies (module docstring).

  Returns {'shifts_mas', 'bands': {band: {'cosine': [...], 'drop_at_100mas'}},
  'cosine' (mean over bands), 'drop_at_100mas'}; with `model` None, the raw-pixel
  baseline (each token's pixels as its feature vector).
  """
  embed = features.Embedder(model, cfg.batch_size) if model is not None else None
  shifts = np.asarray(cfg.sensitivity_shifts_mas, float)
  chips = np.arange(min(cfg.sensitivity_max_chips, heldout.n_chips))
  out = {'shifts_mas': shifts.tolist(), 'bands': {}}
  for band in cfg.sensitivity_bands:
    if not heldout.has_band(band):
      continue
    ok = heldout.band_valid[chips, heldout.band_index(band)]
    if not ok.any():
      continue
    img, rms, mask = heldout.view(band, 'noise', chips[ok])
    scale = heldout.pixel_scale(band)
    n = img.shape[0]
    curve = np.zeros(len(shifts))
    base = embed(img, rms, band) if embed else None
    stride = base['stride'] if base else _pixel_stride(heldout, band)
    feats0 = base['tokens'] if base else _pixel_tokens(img * mask, stride)
    weight = _token_weight(base, img, rms, mask, stride)
    for axis in (0, 1):
      d = np.zeros((len(shifts), 2))
      d[:, axis] = shifts / (1000 * scale)
      im, rm = features.shift_view(np.tile(img, (len(shifts), 1, 1)),
                                   np.tile(rms, (len(shifts), 1, 1)),
                                   np.repeat(d[:, 0], n), np.repeat(d[:, 1], n))
      if embed:
        f = embed(im, rm, band)['tokens']
      else:
        f = _pixel_tokens(im * np.tile(mask, (len(shifts), 1, 1)), stride)
      cos = features.cosine(f, np.tile(feats0, (len(shifts), 1, 1, 1)))  # (S n, h, w)
      w = np.tile(weight, (len(shifts), 1, 1))
      per = np.sum((cos * w).reshape(len(shifts), -1), axis=1) / np.sum(w.reshape(len(shifts), -1),
                                                                         axis=1)
      curve += per / 2
    out['bands'][band] = {'cosine': curve.tolist(),
                          'drop_at_100mas': float(1 - np.interp(100.0, shifts, curve))}
  if out['bands']:
    mean = np.mean([v['cosine'] for v in out['bands'].values()], axis=0)
    out['cosine'] = mean.tolist()
    out['drop_at_100mas'] = float(1 - np.interp(100.0, shifts, mean))
  return out


def _pixel_stride(heldout, band) -> float:
  return 3.2 / heldout.pixel_scale(band)  # the models' default token size (3.2")


def _pixel_tokens(img: np.ndarray, stride: float) -> np.ndarray:
  """(n, H, W) -> (n, h, w, s*s) raw pixel patches (the pixel baseline's tokens)."""
  s = int(round(stride))
  n, hgt, wid = img.shape
  h, w = hgt // s, wid // s
  x = img[:, :h * s, :w * s].reshape(n, h, s, w, s).transpose(0, 1, 3, 2, 4)
  return x.reshape(n, h, w, s * s)


def _token_weight(base, img, rms, mask, stride) -> np.ndarray:
  """Token weights: the model's information weights, else the mean pixel S/N > 3."""
  if base is not None and base['token_weights'] is not None:
    return base['token_weights'] + 1e-3
  snr = np.where(rms > 0, np.abs(img) / np.maximum(rms, 1e-6), 0) * mask
  tok = _pixel_tokens((snr > 3).astype(np.float32), stride)
  return tok.mean(axis=-1) + 1e-3


def run(model: Any, heldout: heldout_lib.HeldOut, cfg: AstrometryConfig = AstrometryConfig()
        ) -> dict[str, Any]:
  """The model's figures: head, head_shuffled, register (chip level and per source),
  and shift sensitivity. Same split and sources as `baselines`."""
  train, test = heldout.split(cfg.train_fraction, cfg.split_seed)
  bands = _bands(test, cfg)
  if not bands or not test.has_band(cfg.reference_band):
    return {'skipped': f'no band to measure against {cfg.reference_band} in the data',
            'shift_sensitivity': shift_sensitivity(model, test, cfg)}
  embed = features.Embedder(model, cfg.batch_size)
  rng = np.random.default_rng(cfg.seed)
  x_tr, y_tr, g_tr, _ = _head_examples(embed, train, bands, cfg, cfg.n_train_shifts, rng)
  x_te, _, _, src = _head_examples(embed, test, bands, cfg, 0, rng)
  pairs = _chip_pairs(test, bands, cfg)
  levels = {level: _units(test, bands, pairs, cfg, level) for level in ('chip', 'tile')}
  truth = np.array([_chip_truth(test, bands[j], cfg)[k] for k, j in pairs]).reshape(-1, 2)
  out: dict[str, Any] = {'chip_level': {}, 'tile_level': {}, 'per_source': {}, 'head_fit': {},
                         'n_train_examples': int(x_tr.shape[0])}
  ok = np.ones(len(src.rows), bool)
  for name, shuffle in (('head', False), ('head_shuffled', True)):
    if x_tr.shape[0] < 4 or len(src.rows) == 0:
      out['chip_level'][name] = {'skipped': f'{x_tr.shape[0]} training / {len(src.rows)} '
                                            'test sources'}
      continue
    head = heads.fit(x_tr, y_tr, cfg.head, shuffle_labels=shuffle, groups=g_tr)
    pred = head.predict(x_te)
    # best_step 0: early stopping kept the initial head, which predicts the training
    # mean whatever the features (then a trained and an untrained model score the same).
    out['head_fit'][name] = {'best_step': int(head.best_step),
                             'prediction_std_mas': float(np.mean(np.std(pred, axis=0)))}
    out['per_source'][name] = binned(pred - src.truth_mas, ~ok, src, cfg)
    for level, units in levels.items():
      out[f'{level}_level'][name] = _unit_stats(*combine(pred, src, units, ok), units)
  # Registration without a head on the first `register_max_chips` test chips.
  ref = cfg.reference_band
  reg_chips = set(range(min(cfg.register_max_chips, test.n_chips)))
  sub = [p for p, (k, _) in enumerate(pairs) if k in reg_chips]
  if sub:
    ref_img, ref_rms, _ = test.view(ref, 'noise')
    ref_emb = embed(ref_img, ref_rms, ref)
    est = np.array([_register(embed, test, bands[pairs[p][1]], ref_emb, pairs[p][0], cfg)
                    for p in sub])
    out['chip_level']['register'] = stats(est - truth[sub])
    out['chip_level']['register']['zero_same_chips'] = stats(truth[sub])
  out['shift_sensitivity'] = shift_sensitivity(model, test, cfg)
  return out
