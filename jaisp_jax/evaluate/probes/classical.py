"""Classical measurements that need no learning: the baselines every probe is compared with.

* `windowed_centroids`: SExtractor XWIN/YWIN positions (sep.winpos), Gaussian window.
* `xcorr_shift`: sub-pixel shift between two images from the peak of their
  cross-correlation, evaluated from the DFT cross-power spectrum on finer and finer
  local grids (upsampled-DFT registration, Guizar-Sicairos et al. 2008).
* `detect`: sep.extract (SExtractor's detection: threshold in sigma, minimum area,
  3x3 pyramid filter, deblending) on noise-unit images.
* `aperture_flux`: sep.sum_circle.
* `bin_to`: block-average a finer instrument's image onto a coarser pixel grid.
* `upsample_to`: band-limited (DFT) interpolation of a coarser instrument's image onto a
  finer pixel grid (for well-sampled images; binning an undersampled one instead aliases
  its sub-pixel structure, which biases a cross-correlation).

All positions are 0-based pixel coordinates with pixel centres at integers (sep's too).
sep (1.4.1) is a dependency of the evaluation suite.
"""

from __future__ import annotations

import numpy as np


def _c(a: np.ndarray) -> np.ndarray:
  """sep wants C-contiguous native-endian float arrays."""
  return np.ascontiguousarray(np.asarray(a, dtype=np.float64))


def windowed_centroids(image: np.ndarray, x0: np.ndarray, y0: np.ndarray, sigma_px,
                       mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(x, y, ok) windowed centroids of sources starting at (x0, y0) in one image (H, W).

  `sigma_px`: the Gaussian window sigma (SExtractor uses the half-light radius / 1.18;
  a PSF-sized window is unbiased for symmetric sources). `ok` is False where sep flags
  the measurement or the result moved more than 2 sigma from the start (a failure).
  """
  import sep  # pylint: disable=g-import-not-at-top
  x0 = np.asarray(x0, np.float64)
  y0 = np.asarray(y0, np.float64)
  if x0.size == 0:
    return x0.copy(), y0.copy(), np.zeros(0, bool)
  sig = np.broadcast_to(np.asarray(sigma_px, np.float64), x0.shape).copy()
  kw = {}
  if mask is not None:
    kw = dict(mask=np.ascontiguousarray(~np.asarray(mask, bool)), maskthresh=0.5)
  x, y, flag = sep.winpos(_c(image), x0, y0, sig, **kw)
  ok = (flag == 0) & np.isfinite(x) & np.isfinite(y) & (np.hypot(x - x0, y - y0) < 2 * sig + 1)
  return np.asarray(x), np.asarray(y), ok


def bin_to(image: np.ndarray, factor: int) -> np.ndarray:
  """Block-averages (..., H, W) by an integer factor: pixel i of the result covers
  pixels [f i, f i + f) and is centred where the coarse grid puts pixel i."""
  if factor == 1:
    return np.asarray(image)
  *lead, hgt, wid = image.shape
  h, w = hgt // factor, wid // factor
  a = np.asarray(image)[..., :h * factor, :w * factor]
  return a.reshape(*lead, h, factor, w, factor).mean(axis=(-3, -1))


def upsample_to(image: np.ndarray, factor: int) -> np.ndarray:
  """(H, W) -> (f H, f W): the image's trigonometric interpolant sampled at the pixel
  centres of a grid `factor` times finer covering the same area (fine pixel j sits at
  coarse coordinate (j + 0.5) / f - 0.5, the inverse of `bin_to`'s geometry). Periodic."""
  if factor == 1:
    return np.asarray(image)
  a = np.asarray(image, np.float64)
  hgt, wid = a.shape
  uy = (np.arange(hgt * factor) + 0.5) / factor - 0.5
  ux = (np.arange(wid * factor) + 0.5) / factor - 0.5
  ey = np.exp(2j * np.pi * np.outer(uy, np.fft.fftfreq(hgt)))  # (f H, H)
  ex = np.exp(2j * np.pi * np.outer(ux, np.fft.fftfreq(wid)))  # (f W, W)
  return np.real(ey @ np.fft.fft2(a) @ ex.T) / (hgt * wid)


def _dft_grid(cps: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
  """Re sum_k cps(k) exp(2 pi i k . (y, x)) on the grid ys x xs (the cross-correlation)."""
  hgt, wid = cps.shape
  ey = np.exp(2j * np.pi * np.outer(ys, np.fft.fftfreq(hgt)))  # (ny, H)
  ex = np.exp(2j * np.pi * np.outer(xs, np.fft.fftfreq(wid)))  # (nx, W)
  return np.real(ey @ cps @ ex.T)


def xcorr_shift(image: np.ndarray, reference: np.ndarray, max_shift_px: float = 2.0,
                rounds: tuple[tuple[float, float], ...] = ((0.1, 0.005),)
                ) -> tuple[float, float]:
  """(dx, dy) pixels such that image(x) ~ reference(x - d): where `image`'s content sits
  relative to `reference`'s.

  The cross-correlation (computed exactly at any shift from the DFT cross-power
  spectrum) is searched on a 0.1 px grid within +-max_shift_px (offsets between bands
  are small; an unrestricted search can lock onto a far, spurious peak), then refined
  on local grids (half-width, step) in pixels, each centred on the previous best point.
  """
  a = np.asarray(image, np.float64)
  r = np.asarray(reference, np.float64)
  cps = np.fft.fft2(a - a.mean()) * np.conj(np.fft.fft2(r - r.mean()))
  best = np.zeros(2)
  for half, step in ((max_shift_px, 0.1),) + tuple(rounds):
    offs = np.arange(-half, half + step / 2, step)
    grid = _dft_grid(cps, best[0] + offs, best[1] + offs)
    j, i = np.unravel_index(np.argmax(grid), grid.shape)
    best = np.array([best[0] + offs[j], best[1] + offs[i]])
  return float(best[1]), float(best[0])


def detect(image: np.ndarray, rms: np.ndarray, mask: np.ndarray | None = None,
           thresh: float = 1.5, minarea: int = 5, subtract_background: bool = False,
           deblend_cont: float = 0.005) -> dict[str, np.ndarray]:
  """sep.extract on one image: {'x', 'y', 'flux', 'snr'} of the detections.

  Args:
    image, rms: (H, W) in any consistent unit (noise units make `thresh` sigma).
    thresh: detection threshold in units of `rms` (SExtractor DETECT_THRESH).
    minarea: minimum connected pixels above threshold (DETECT_MINAREA).
    subtract_background: estimate and subtract a sep.Background first (real images;
      simulated images are already sky-subtracted).
  """
  import sep  # pylint: disable=g-import-not-at-top
  data = _c(image)
  err = _c(rms)
  bad = None if mask is None else np.ascontiguousarray(~np.asarray(mask, bool))
  if subtract_background:
    bkg = sep.Background(data, mask=bad)
    data = data - bkg.back()
  err = np.where(err > 0, err, np.max(err) if np.any(err > 0) else 1.0)
  old = sep.get_extract_pixstack()
  sep.set_extract_pixstack(max(old, 10 * data.size))
  try:
    objs = sep.extract(data, thresh, err=err, mask=bad, minarea=minarea,
                       deblend_cont=deblend_cont)
  except Exception:  # pylint: disable=broad-except
    # sep raises on pathological images (e.g. everything above threshold): no detection.
    return {k: np.zeros(0) for k in ('x', 'y', 'flux', 'snr')}
  snr = objs['flux'] / np.sqrt(np.maximum(objs['npix'], 1)) if len(objs) else np.zeros(0)
  return {'x': np.asarray(objs['x'], float), 'y': np.asarray(objs['y'], float),
          'flux': np.asarray(objs['flux'], float), 'snr': np.asarray(snr, float)}


def aperture_flux(image: np.ndarray, x: np.ndarray, y: np.ndarray, radius_px: float,
                  rms: np.ndarray | None = None, mask: np.ndarray | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(flux, flux_err, ok) in circular apertures (sep.sum_circle, exact overlap)."""
  import sep  # pylint: disable=g-import-not-at-top
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size == 0:
    return np.zeros(0), np.zeros(0), np.zeros(0, bool)
  kw = {}
  if rms is not None:
    kw['err'] = _c(rms)
  if mask is not None:
    kw.update(mask=np.ascontiguousarray(~np.asarray(mask, bool)), maskthresh=0.5)
  flux, err, flag = sep.sum_circle(_c(image), x, y, radius_px, subpix=0, **kw)
  return np.asarray(flux), np.asarray(err), (np.asarray(flag) == 0) & np.isfinite(flux)
