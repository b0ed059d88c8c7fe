"""Band stems: per-band (image, rms) -> token embeddings on a sky-aligned grid.

Every band has its own small CNN (its PSF and noise are its own), but the stems of
the bands of one instrument are stored as ONE set of parameters with a leading band
axis and gathered per sample by band id. Band identity is therefore data, not
program structure: a batch with any band mix runs through the same compiled
program (no retracing when the band ids change).

Two stem kinds (``config.stem.kind``):

* ``'conv'`` -- the seeds' / PyTorch reference stem: on the 2-channel input
  [stretch(image), rms] at full resolution, conv3x3 (2 -> hidden) + GELU,
  conv3x3 (hidden -> channels) + GELU, per band; then a patch embedding of stride
  ``s`` (s x s x channels -> D), shared by the bands of one instrument. In the
  reference the patch embedding is part of the shared trunk; here the stride
  differs between instruments (Rubin 0.2"/px and Euclid 0.1"/px need 16 and 32 px
  for a 3.2" token), so there is one patch embedding per instrument.
* ``'patch'`` -- a cheap per-band linear patch embedding (s x s x 2 -> D), for
  large configs or smoke tests where full-resolution convolutions cost too much.

The stride ``s`` of a band is ``registry.stride(name, token_arcsec)`` so that
token (i, j) covers the same patch of sky in every band.

The 'conv' stem's per-sample 3x3 convolutions (a different kernel for each sample)
have two implementations (models/sample_conv.py): on CPU one loop over the samples
running each sample's whole stem in cache, with a custom VJP (~2.5x faster than the
alternative and without its 9x column buffer); elsewhere im2col + one batched matmul
per layer. `jax.vmap` of `lax.conv` (a grouped convolution) took ~20x a shared
convolution on CPU, and computing every band's stem then selecting ~7x.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.models import sample_conv

Dtype = Any


def stretch(image: jax.Array, softening: float) -> jax.Array:
  """Noise-unit asinh stretch: ``softening * asinh(image / softening)``.

  Inputs are in units of sky rms, so the stretch is the identity for pixels well
  below `softening` sigma (noise keeps its statistics) and logarithmic for bright
  sources, which span 4 decades of S/N. `softening <= 0` disables it.
  """
  if softening <= 0:
    return image
  return softening * jnp.arcsinh(image / softening)


def patchify(x: jax.Array, stride: int) -> jax.Array:
  """(G, H, W, C) -> (G, H/s, W/s, s*s*C), patch pixels in (dy, dx, c) order."""
  g, hgt, wid, c = x.shape
  if hgt % stride or wid % stride:
    raise ValueError(f'view of {hgt}x{wid} px is not a whole number of {stride}-px tokens')
  h, w = hgt // stride, wid // stride
  x = x.reshape(g, h, stride, w, stride, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (G, h, w, s, s, C)
  return x.reshape(g, h, w, stride * stride * c)


def per_sample_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
  """'SAME' 3x3 convolution with a different kernel for every sample.

  Args:
    x: (G, H, W, Ci) input.
    kernel: (G, 3, 3, Ci, Co) one kernel per sample.
    bias: (G, Co).
  Returns:
    (G, H, W, Co). Implementation per platform: models/sample_conv.py.
  """
  return sample_conv.conv3x3(x, kernel) + bias[:, None, None, :]


def _stacked_init(in_axis):
  # lecun-normal per band: fan-in from the kernel axes, the band axis is a batch axis.
  return nn.initializers.variance_scaling(
      1.0, 'fan_in', 'truncated_normal', in_axis=in_axis, out_axis=-1, batch_axis=(0,))


class _PatchEmbed(nn.Module):
  """The parameters of the 'conv' stem's patch embedding, laid out as nn.Dense's
  (kernel (K, D), lecun-normal; bias (D,), zeros) and applied by the caller."""

  in_features: int
  features: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    """(kernel, bias)."""
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (self.in_features, self.features), self.param_dtype)
    return kernel, self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)


class InstrumentStems(nn.Module):
  """The stems of all bands of ONE instrument (same pixel scale, same stride).

  Attributes:
    n_bands: bands of the instrument; parameters have a leading axis of this size,
      ordered by the band's `index` in the registry.
    stride: pixels per token side (registry.stride).
    kind: 'conv' (reference stem) or 'patch' (linear per-band patch embedding).
    hidden: channels of the first 3x3 conv ('conv').
    channels: stem output channels C ('conv'); 64 in the reference.
    embed_dim: token dimension D.
    asinh_softening: softening of the input stretch, in sky-rms units.
  """

  n_bands: int
  stride: int
  kind: str = 'conv'
  hidden: int = 32
  channels: int = 64
  embed_dim: int = 256
  asinh_softening: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, image, rms, mask, band, return_features: bool = False):
    """Stems of a batch of views of this instrument.

    Args:
      image, rms, mask: (G, H, W) float32, noise units, masked pixels zero.
      band: (G,) int32 index of each view's band WITHIN this instrument.
      return_features: also return the full-resolution stem features.
    Returns:
      tokens (G, h, w, D) in `dtype`; with `return_features`, also features
      (G, H, W, C) ('conv') or None ('patch').
    """
    s, nb = self.stride, self.n_bands
    mask = mask[..., None].astype(self.dtype)  # (G, H, W, 1)
    x = jnp.stack([stretch(image, self.asinh_softening), rms], axis=-1)
    x = x.astype(self.dtype) * mask  # (G, H, W, 2)
    cast = lambda p: p.astype(self.dtype)
    features = None
    if self.kind == 'conv':
      k1 = self.param('conv1_kernel', _stacked_init((1, 2, 3)), (nb, 3, 3, 2, self.hidden),
                      self.param_dtype)
      b1 = self.param('conv1_bias', nn.initializers.zeros, (nb, self.hidden), self.param_dtype)
      k2 = self.param('conv2_kernel', _stacked_init((1, 2, 3)),
                      (nb, 3, 3, self.hidden, self.channels), self.param_dtype)
      b2 = self.param('conv2_bias', nn.initializers.zeros, (nb, self.channels),
                      self.param_dtype)
      take = lambda p: cast(jnp.take(p, band, axis=0))  # (G, ...) this sample's band
      # conv3x3 + GELU, conv3x3 + GELU, times the mask (masked pixels contribute
      # nothing to the tokens: GELU(bias) would otherwise paint a constant there),
      # then the patch embedding shared by the instrument's bands (a stride-s conv,
      # patchify + matmul; parameters as nn.Dense's, under 'patch_embed'). On CPU one
      # fused loop over chunks of samples computes the stem AND the embedding, so the
      # full-resolution features never exist as a batch (models/sample_conv.py).
      kernel, bias = map(cast, _PatchEmbed(s * s * self.channels, self.embed_dim,
                                           self.param_dtype, name='patch_embed')())
      stem_args = (x, mask[..., 0], take(k1), take(b1), take(k2), take(b2))
      if return_features:
        patches = sample_conv.conv_stem(*stem_args, s)  # (G, h, w, s*s*C)
        g, h, w, _ = patches.shape
        features = patches.reshape(g, h, w, s, s, self.channels).transpose(
            0, 1, 3, 2, 4, 5).reshape(g, h * s, w * s, self.channels)  # (G, H, W, C)
        tokens = jnp.einsum('ghwk,kd->ghwd', patches, kernel)
      else:
        tokens = sample_conv.stem_tokens(*stem_args, kernel, s)  # (G, h, w, D)
      tokens = tokens + bias[None, None, None, :]
    elif self.kind == 'patch':
      kernel = self.param('patch_kernel', _stacked_init((1,)), (nb, s * s * 2, self.embed_dim),
                          self.param_dtype)
      bias = self.param('patch_bias', nn.initializers.zeros, (nb, self.embed_dim),
                        self.param_dtype)
      tokens = jnp.einsum('ghwk,gkd->ghwd', patchify(x, s), cast(jnp.take(kernel, band, axis=0)))
      tokens = tokens + cast(jnp.take(bias, band, axis=0))[:, None, None, :]
    else:
      raise ValueError(f"unknown stem kind {self.kind!r}; expected 'conv' or 'patch'")
    if return_features:
      return tokens, features
    return tokens


class BandStems(nn.Module):
  """Stems of every band of the registry, one stacked-parameter set per instrument.

  `__call__(instrument, ...)` takes REGISTRY band ids (as in the batch) and maps
  them to the instrument's local index with a constant lookup table.
  """

  registry: bands_lib.BandRegistry
  token_arcsec: float
  kind: str = 'conv'
  hidden: int = 32
  channels: int = 64
  embed_dim: int = 256
  asinh_softening: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    stems = {}
    for inst in self.registry.instruments:
      members = self.registry.instrument_bands(inst)
      stems[inst] = InstrumentStems(
          n_bands=len(members), stride=self.stride(inst), kind=self.kind,
          hidden=self.hidden, channels=self.channels, embed_dim=self.embed_dim,
          asinh_softening=self.asinh_softening, dtype=self.dtype,
          param_dtype=self.param_dtype)
    self.stem = stems  # parameters under 'stem_<instrument>'
    # registry band id -> index within its instrument (= stacked-parameter row).
    self._local = np.array([b.index for b in self.registry.bands], np.int32)

  def stride(self, instrument: str) -> int:
    """Pixels per token side for an instrument's bands."""
    return self.registry.stride(self.registry.instrument_bands(instrument)[0].name,
                                self.token_arcsec)

  def __call__(self, instrument, image, rms, mask, band, return_features=False):
    """Tokens (G, h, w, D) of views of `instrument`; `band` (G,) registry ids."""
    local = jnp.take(jnp.asarray(self._local), band, axis=0)
    return self.stem[instrument](image, rms, mask, local,
                                             return_features=return_features)
