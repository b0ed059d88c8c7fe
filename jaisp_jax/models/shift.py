"""Sub-pixel shift auxiliary of the `jepa` variant (off by default).

Why: a PyTorch version of the seeds' design retrieved tiles across instruments
almost perfectly, yet its 16-px tokens could not tell a copy of an image shifted by
a fraction of a pixel (errors ~100 mas where pixels give 0.1 mas). Token-level JEPA
is only useful for astrometry if tokens keep sub-pixel position, so this auxiliary
asks for exactly that:

1. `shift_pairs` shifts view 'b' of every pair by a random known amount (uniform in
   [-max_mas, max_mas] per axis) with an exact Fourier shift of image and rms,
   in-graph (jnp.fft). The train step calls it ONCE on batch['pairs'] and feeds
   the shifted pairs to both the online model and the EMA target, so the JEPA
   pairs stay consistent (a shift of <= a few hundred mas is < 1/10 of a 3.2"
   token, negligible for the token loss).
2. `ShiftHead` predicts the shift (mas) from the two token grids (a, b): every
   token pair gives an estimate and a confidence logit; the estimate is the
   softmax(confidence)-weighted mean. The objectives regress it on the known
   shift (in mas, information-weighted).

Convention (as objectives/shift.py): shift (dx, dy) in mas moves the content of
view b towards +x / +y (column / row index), i.e. b'(y, x) = b(y - dy, x - dx).
Real views already have small unknown inter-band offsets (tens of mas); they add
noise to the target, and learning to see them is the downstream astrometry task.

The Fourier shift is periodic: content leaving one edge re-enters at the other.
Views are mostly sky in noise units, so the wrap costs little; sources within a
few pixels of the edge get a wrapped sliver.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.models import vit

Dtype = Any


def fourier_shift(image: jax.Array, shift_px: jax.Array) -> jax.Array:
  """Shifts (G, H, W) images by (G, 2) pixels (dx, dy), exactly for band-limited data.

  Multiplies the 2-D DFT by exp(-2 pi i (ky dy + kx dx)) and keeps the real part
  (the same operation as scipy.ndimage.fourier_shift followed by ifft().real).
  """
  hgt, wid = image.shape[-2:]
  ky = jnp.asarray(np.fft.fftfreq(hgt), jnp.float32)  # (H,)
  kx = jnp.asarray(np.fft.fftfreq(wid), jnp.float32)  # (W,)
  dx = shift_px[:, 0, None, None].astype(jnp.float32)
  dy = shift_px[:, 1, None, None].astype(jnp.float32)
  phase = -2.0 * jnp.pi * (ky[None, :, None] * dy + kx[None, None, :] * dx)  # (G, H, W)
  f = jnp.fft.fft2(image.astype(jnp.complex64))
  return jnp.real(jnp.fft.ifft2(f * jnp.exp(1j * phase))).astype(jnp.float32)


def shift_view(view: dict, shift_px: jax.Array) -> dict:
  """Fourier-shifts image, rms and mask of a view (G, H, W) by (G, 2) px.

  The shifted mask is re-binarised at 0.5 and image / rms are zeroed where it is 0
  (batch contract: masked pixels are zeros); rms is clipped at 0 against ringing.
  """
  mask = (fourier_shift(view['mask'], shift_px) > 0.5).astype(jnp.float32)
  image = fourier_shift(view['image'], shift_px) * mask
  rms = jnp.maximum(fourier_shift(view['rms'], shift_px), 0.0) * mask
  return {**view, 'image': image, 'rms': rms, 'mask': mask}


def shift_pairs(pairs: dict, rng: jax.Array, registry: bands_lib.BandRegistry,
                max_mas: float) -> tuple[dict, jax.Array]:
  """Shifts view 'b' of every pair by a random known amount.

  Args:
    pairs: batch['pairs'] (see jaisp_jax.data.batch).
    rng: PRNG key.
    registry: band registry (pixel scales).
    max_mas: shifts are uniform in [-max_mas, max_mas] mas per axis.
  Returns:
    (shifted pairs, shift_mas (P, 2) float32 (dx, dy) in mas), P = all pairs in
    sorted combo order (the order of `jaisp.pair_layout` and the model outputs).
  """
  out, shifts = dict(pairs), []
  for i, combo in enumerate(sorted(pairs)):
    group = pairs[combo]
    inst_b = combo.split('-')[1]
    g = group['b']['image'].shape[0]
    mas = jax.random.uniform(jax.random.fold_in(rng, i), (g, 2), jnp.float32,
                             -max_mas, max_mas)
    px = mas / (1000.0 * registry.pixel_scale(inst_b))
    out[combo] = {**group, 'b': shift_view(group['b'], px)}
    shifts.append(mas)
  return out, jnp.concatenate(shifts, axis=0)


class ShiftHead(nn.Module):
  """Predicts the (dx, dy) shift in mas of view b relative to view a.

  Input tokens_a, tokens_b (P, N, D); output (P, 2) float32 mas. Per token pair,
  an MLP on [a, b, a*b, a-b] gives (dx, dy) / scale_mas and a confidence logit.
  """

  hidden: int = 128
  scale_mas: float = 250.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_a, tokens_b):
    x = jnp.concatenate([tokens_a, tokens_b, tokens_a * tokens_b, tokens_a - tokens_b], -1)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, kernel_init=vit.dense_init)
    x = nn.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm')(x)
    x = nn.gelu(nn.Dense(self.hidden, name='fc1', **kw)(x), approximate=False)
    x = nn.gelu(nn.Dense(self.hidden, name='fc2', **kw)(x), approximate=False)
    x = nn.Dense(3, name='out', **kw)(x).astype(jnp.float32)  # (P, N, 3)
    conf = jax.nn.softmax(x[..., 2], axis=-1)  # (P, N)
    return jnp.einsum('pn,pnc->pc', conf, x[..., :2]) * self.scale_mas
