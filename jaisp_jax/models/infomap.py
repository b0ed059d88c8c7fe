"""Information map: where in a view is there something to learn (no parameters).

About 90% of the pixels of a tile are empty sky. A loss that weighs every token alike
is dominated by sky and is minimised by a model that has learned what noise looks
like (the JAISP authors' collapse). The information map gives each pixel a weight in
[0, 1] that is ~1 on sources and ~0 on sky, and each token the mean of its pixels'
weights (the fraction of its area that carries signal).

Formula (inputs in noise units, as the batch contract guarantees)::

  snr(p)  = |image(p)| / rms(p)
  gsnr(p) = |Sobel(image)(p)| / rms(p)      Sobel kernels / sqrt(12): white noise
                                            gives unit-variance gradient components
  w(p)    = max(sigmoid((snr - t) / s), sigmoid((gsnr - t) / s)) * mask(p)
  token weight = mean of w over the token's s x s pixels

with t = 3.5 sigma and s = 0.25 (the PyTorch reference's values). Why:

* The S/N term finds every significant pixel: a detection threshold in sigma is
  the same statement for every band and depth because pixels are in noise units.
  `|image|` (not `image`) keeps negative residuals / artefacts informative.
* The gradient term adds the edges and cores of sources whose pixels are not
  individually significant but whose structure is (compact sources on a sloped
  background, the flanks of bright galaxies); it is what carries the position
  information that astrometry needs.
* The soft threshold (sigmoid of width 0.25 sigma) keeps the weights smooth in the
  data. On pure white noise a pixel passes 3.5 sigma with probability ~5e-4 (S/N) or
  ~2e-3 (gradient, Rayleigh tail), so the mean token weight on empty sky is ~0.01,
  while tokens holding a source reach 0.3-1.
* Masked pixels get exactly 0, and the gradient term is used only where the whole
  3x3 neighbourhood is valid (the zero-filled masked pixels would otherwise create
  fake edges along the mask border).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SNR_THRESHOLD = 3.5
SOFTNESS = 0.25

# Sobel x kernel scaled so that unit white noise gives unit-std gradients: the sum
# of its squared taps is 12.
_SOBEL_X = np.array([[-1., 0., 1.], [-2., 0., 2.], [-1., 0., 1.]]) / np.sqrt(12.0)


def _neighbourhood(x: jax.Array) -> list[list[jax.Array]]:
  """The 3x3 shifted copies of x (..., H, W) with edge padding: [dy][dx]."""
  hgt, wid = x.shape[-2:]
  pad = [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)]
  xp = jnp.pad(x, pad, mode='edge')
  return [[xp[..., dy:dy + hgt, dx:dx + wid] for dx in range(3)] for dy in range(3)]


def pixel_weights(image: jax.Array, rms: jax.Array, mask: jax.Array,
                  snr_threshold: float = SNR_THRESHOLD,
                  softness: float = SOFTNESS) -> jax.Array:
  """Per-pixel information weights in [0, 1] (formula in the module docstring).

  Args:
    image, rms, mask: (..., H, W) in noise units; mask 1 valid, 0 masked.
  Returns:
    (..., H, W) float32 weights, exactly 0 where mask == 0. No gradient flows
    through (it is a function of the data only).
  """
  image = jnp.asarray(image, jnp.float32)
  rms = jnp.asarray(rms, jnp.float32)
  valid = jnp.asarray(mask) > 0
  safe_rms = jnp.where(valid & (rms > 0), rms, 1.0)
  img = jnp.where(valid, image, 0.0)
  snr = jnp.abs(img) / safe_rms
  nb = _neighbourhood(img)
  gx = sum(float(_SOBEL_X[dy, dx]) * nb[dy][dx]
           for dy in range(3) for dx in range(3) if _SOBEL_X[dy, dx])
  gy = sum(float(_SOBEL_X.T[dy, dx]) * nb[dy][dx]
           for dy in range(3) for dx in range(3) if _SOBEL_X.T[dy, dx])
  gsnr = jnp.sqrt(gx * gx + gy * gy) / safe_rms
  vn = _neighbourhood(valid.astype(jnp.float32))
  valid3 = jnp.min(jnp.stack([v for row in vn for v in row]), axis=0) > 0
  gsnr = jnp.where(valid3, gsnr, 0.0)
  w = jnp.maximum(jax.nn.sigmoid((snr - snr_threshold) / softness),
                  jax.nn.sigmoid((gsnr - snr_threshold) / softness))
  return jax.lax.stop_gradient(jnp.where(valid, w, 0.0))


def token_weights(pixel_w: jax.Array, stride: int) -> jax.Array:
  """Mean-pools pixel weights (G, H, W) over s x s tokens -> (G, h*w), row-major.

  Token order matches the token sequences of the stems / trunk.
  """
  g, hgt, wid = pixel_w.shape
  h, w = hgt // stride, wid // stride
  return pixel_w.reshape(g, h, stride, w, stride).mean(axis=(2, 4)).reshape(g, h * w)


def information_map(image, rms, mask, stride: int,
                    snr_threshold: float = SNR_THRESHOLD,
                    softness: float = SOFTNESS) -> tuple[jax.Array, jax.Array]:
  """(pixel weights (G, H, W), token weights (G, N)) of a batch of views."""
  pw = pixel_weights(image, rms, mask, snr_threshold, softness)
  return pw, token_weights(pw, stride)
