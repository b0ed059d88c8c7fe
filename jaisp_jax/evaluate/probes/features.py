"""Frozen features for the probes: batched embedding, token grids, sampling, sub-pixel shifts.

A *model* here is anything with ``get_representation(image, rms, band)`` taking
(B, 1, H, W) arrays and returning at least ``tokens`` (B, N, D) (the public inference
API, `jaisp_jax.inference.Representation`); ``weights`` / ``token_weights`` and
``objects`` are used when present. Tokens form a square-pixel grid: N = h * w with
stride s = sqrt(H * W / N) pixels of the band, so h = H / s, w = W / s.

Token coordinates: the centre of token (i, j) sits at pixel ((j + 0.5) s - 0.5,
(i + 0.5) s - 0.5) of its band, so a pixel position x maps to u = (x + 0.5) / s - 0.5.
Token grids are sky-aligned across instruments (a token is the same arcsec in every
band), so one u serves every band of a chip.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def fourier_shift(images: np.ndarray, dx: np.ndarray | float, dy: np.ndarray | float) -> np.ndarray:
  """Shifts images (..., H, W) by (dx, dy) pixels (content moves towards +x / +y).

  Exact for band-limited data: multiplies the 2-D DFT by exp(-2 pi i (kx dx + ky dy)).
  The shift is periodic (content leaving one edge re-enters at the other). `dx`, `dy`
  broadcast against the leading axes. float32 in, float32 out (real FFTs, scipy).
  """
  import scipy.fft  # pylint: disable=g-import-not-at-top
  images = np.asarray(images, np.float32)
  hgt, wid = images.shape[-2:]
  ky = np.fft.fftfreq(hgt).astype(np.float32)[:, None]
  kx = np.fft.rfftfreq(wid).astype(np.float32)[None, :]
  dx = np.asarray(dx, np.float32)[..., None, None]
  dy = np.asarray(dy, np.float32)[..., None, None]
  phase = np.exp((-2j * np.pi) * (kx * dx + ky * dy)).astype(np.complex64)
  spec = scipy.fft.rfft2(images, workers=-1)
  return scipy.fft.irfft2(spec * phase, s=(hgt, wid), workers=-1).astype(np.float32)


def shift_view(image: np.ndarray, rms: np.ndarray, dx, dy) -> tuple[np.ndarray, np.ndarray]:
  """Fourier-shifts a view (image, rms (..., H, W)) by (dx, dy) pixels.

  The rms map is smooth on the scale of a pixel, so shifting it by a fraction of one
  changes nothing measurable; it is shifted only where it has masked (rms 0) pixels,
  which must move with the image (and are then re-binarised).
  """
  image = fourier_shift(image, dx, dy)
  rms = np.asarray(rms, np.float32)
  if not np.any(rms <= 0):
    return image, rms
  valid = fourier_shift((rms > 0).astype(np.float32), dx, dy) > 0.5
  shifted = np.maximum(fourier_shift(rms, dx, dy), 1e-6)
  return np.where(valid, image, 0.0), np.where(valid, shifted, 0.0).astype(np.float32)


class Embedder:
  """Embeds views in fixed-size batches (one compilation per shape and band)."""

  def __init__(self, model: Any, batch_size: int = 32):
    self.model = model
    self.batch_size = int(batch_size)

  def __call__(self, image: np.ndarray, rms: np.ndarray, band: str) -> dict[str, np.ndarray]:
    """image, rms (n, H, W) -> {'tokens': (n, h, w, D), 'token_weights': (n, h, w) or None,
    'weights': (n, H, W) or None, 'objects': {...} or None}."""
    image = np.asarray(image, np.float32)
    rms = np.asarray(rms, np.float32)
    n, hgt, wid = image.shape
    out: dict[str, list] = {'tokens': [], 'token_weights': [], 'weights': [], 'objects': []}
    bs = self.batch_size
    for s in range(0, n, bs):
      im, rm = image[s:s + bs], rms[s:s + bs]
      k = im.shape[0]
      # Pad to a power of two between 8 and the batch size: few distinct shapes, so
      # few compilations of the model, whatever the number of views.
      size = min(bs, max(8, 1 << max(k - 1, 0).bit_length()))
      if k < size:
        pad = ((0, size - k), (0, 0), (0, 0))
        im, rm = np.pad(im, pad), np.pad(rm, pad, constant_values=1.0)
      rep = self.model.get_representation(im[:, None], rm[:, None], band)
      out['tokens'].append(np.asarray(rep['tokens'], np.float32)[:k])
      tw = rep.get('token_weights')
      out['token_weights'].append(None if tw is None else np.asarray(tw, np.float32)[:k])
      w = rep.get('weights')
      out['weights'].append(None if w is None else np.asarray(w, np.float32)[:k, 0])
      obj = rep.get('objects')
      out['objects'].append(None if obj is None else
                            {key: np.asarray(v, np.float32)[:k] for key, v in obj.items()})
    tokens = np.concatenate(out['tokens'])  # (n, N, D)
    n_tok = tokens.shape[1]
    stride = np.sqrt(hgt * wid / n_tok)
    h, w = int(round(hgt / stride)), int(round(wid / stride))
    if h * w != n_tok:
      raise ValueError(f'{band}: {n_tok} tokens do not tile a {hgt} x {wid} view')
    res = {'tokens': tokens.reshape(n, h, w, -1), 'stride': float(hgt / h),
           'token_weights': None, 'weights': None, 'objects': None}
    if all(t is not None for t in out['token_weights']):
      res['token_weights'] = np.concatenate(out['token_weights']).reshape(n, h, w)
    if all(t is not None for t in out['weights']):
      res['weights'] = np.concatenate(out['weights'])
    if all(t is not None for t in out['objects']):
      res['objects'] = {key: np.concatenate([o[key] for o in out['objects']])
                        for key in out['objects'][0]}
    return res


def token_coords(x: np.ndarray, y: np.ndarray, stride: float) -> tuple[np.ndarray, np.ndarray]:
  """Pixel positions -> token-grid coordinates (u along x, v along y)."""
  return (np.asarray(x) + 0.5) / stride - 0.5, (np.asarray(y) + 0.5) / stride - 0.5


def sample_grid(grid: np.ndarray, chip: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Bilinear samples of grids (n, h, w, D) at (chip[k], v[k], u[k]) -> (K, D).

  Positions outside the grid are clamped to the border tokens.
  """
  n, h, w, _ = grid.shape
  u = np.clip(np.asarray(u, np.float64), 0.0, w - 1.0)
  v = np.clip(np.asarray(v, np.float64), 0.0, h - 1.0)
  j0 = np.clip(np.floor(u).astype(int), 0, max(w - 2, 0))
  i0 = np.clip(np.floor(v).astype(int), 0, max(h - 2, 0))
  j1, i1 = np.minimum(j0 + 1, w - 1), np.minimum(i0 + 1, h - 1)
  fu, fv = (u - j0)[:, None], (v - i0)[:, None]
  c = np.asarray(chip, int)
  return ((1 - fu) * (1 - fv) * grid[c, i0, j0] + fu * (1 - fv) * grid[c, i0, j1]
          + (1 - fu) * fv * grid[c, i1, j0] + fu * fv * grid[c, i1, j1]).astype(np.float32)


def neighbourhood(grid: np.ndarray, radius: int = 1) -> np.ndarray:
  """(n, h, w, D) -> (n, h, w, (2r+1)^2 D): each token with its neighbours (zero-padded)."""
  n, h, w, d = grid.shape
  pad = np.pad(grid, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
  parts = [pad[:, i:i + h, j:j + w] for i in range(2 * radius + 1) for j in range(2 * radius + 1)]
  return np.concatenate(parts, axis=-1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Cosine similarity along the last axis."""
  na = np.linalg.norm(a, axis=-1)
  nb = np.linalg.norm(b, axis=-1)
  return np.sum(a * b, axis=-1) / np.maximum(na * nb, 1e-12)


class Pca:
  """Principal components of token features (fitted on training tokens only)."""

  def __init__(self, tokens: np.ndarray, dim: int):
    x = np.asarray(tokens, np.float64).reshape(-1, tokens.shape[-1])
    self.mean = x.mean(axis=0)
    if dim <= 0 or dim >= x.shape[1]:
      self.components = None
      return
    _, _, vt = np.linalg.svd(x - self.mean, full_matrices=False)
    self.components = vt[:dim].T  # (D, dim)

  def __call__(self, tokens: np.ndarray) -> np.ndarray:
    """(..., D) -> (..., dim) (unchanged when dim >= D)."""
    if self.components is None:
      return np.asarray(tokens, np.float32)
    return ((np.asarray(tokens, np.float64) - self.mean) @ self.components).astype(np.float32)
