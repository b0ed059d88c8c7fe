"""Pixel decoder for masked-band reconstruction: tokens -> one band's pixels.

A light head (MAE-style linear decoder + a little local refinement):

  LN(tokens + band query)  --Dense(s*s*c)-->  pixel shuffle  --> (B, H, W, c)
  concat stem skip features (B, H, W, C) of the visible bands at this resolution
  --> conv3x3 (c+C -> c) + GELU --> conv3x3 (c -> 1) --> image (B, H, W)

The linear per-token projection puts each token's content back at the stride of the
target band (s = token_arcsec / pixel_scale, so the output is at the target band's
native resolution); the skip features carry the sub-token detail the visible bands
saw at full resolution (sharp Euclid VIS helps a blurry Rubin band and vice versa),
and the 3x3 convs blend token borders. The output is in the batch's noise units
(linear, not stretched), so the loss can be taken in units of rms.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaisp_jax.models import vit

Dtype = Any


def unpatchify(x, stride: int, channels: int):
  """(B, h, w, s*s*c) -> (B, h*s, w*s, c); inverse of stems.patchify."""
  b, h, w, _ = x.shape
  x = x.reshape(b, h, w, stride, stride, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * stride, w * stride, channels)


class PixelDecoder(nn.Module):
  """tokens (B, h, w, D) [+ skip (B, H, W, C)] -> image (B, H=h*s, W=w*s) float32."""

  stride: int
  channels: int = 16
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, skip=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    s, c = self.stride, self.channels
    x = nn.LayerNorm(name='norm', **kw)(tokens)
    x = nn.Dense(s * s * c, kernel_init=vit.dense_init, name='to_pixels', **kw)(x)
    x = unpatchify(x, s, c)  # (B, H, W, c)
    if skip is not None:
      x = jnp.concatenate([x, skip.astype(self.dtype)], axis=-1)
    x = nn.gelu(nn.Conv(c, (3, 3), padding='SAME', name='conv1', **kw)(x), approximate=False)
    x = nn.Conv(1, (3, 3), padding='SAME', name='conv2', **kw)(x)
    return x[..., 0].astype(jnp.float32)
