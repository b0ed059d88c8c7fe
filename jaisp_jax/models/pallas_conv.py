"""Pallas (Triton) kernels for the stems' per-sample 3x3 convolution on GPUs.

The stems convolve every sample with its own band's kernel (models/sample_conv.py).
XLA:GPU runs that as im2col: a (G, H, W, 9 Ci) column buffer and a batched matmul. On
an H200 the column writes alone took 48 ms of a 169 ms ViT-B step (9.85 GB each for the
Euclid stems' second layer, written at 0.3-0.55 TB/s; docs/performance.md, session 5).
These kernels compute the convolution without the buffer: each program loads a tile of
`th` x `tw` pixels of one sample for each of the 9 taps (shifted windows of the padded
input, read from global memory / L2 with the neighbouring taps' overlap) and
accumulates (th*tw, Ci) x (Ci, Co) dots in float32 registers.

* `conv3x3(x, kernel)`: 'SAME' convolution, (G, H, W, Ci) x (G, 3, 3, Ci, Co) ->
  (G, H, W, Co). Also the input gradient: the same convolution of the output gradient
  with each kernel rotated by 180 degrees and its channel axes swapped.
* `kernel_grad(x, dz)`: (G, 3, 3, Ci, Co), the per-sample sum over pixels of the
  shifted input times the output gradient; programs split the rows of a sample and
  one of the 3 kernel rows, and XLA sums the float32 partial results.

`supported(shape, co)` says which shapes the kernels take (power-of-two channels of at
least 16, tiles that divide the image); sample_conv falls back to im2col otherwise.
Off GPUs the kernels run in Pallas's interpret mode (tests on the CPU); status on GPUs:
lowering checked on the CPU (`jax.jit(...).lower(lowering_platforms=('cuda',))`), not yet
run on a GPU (see docs/performance.md for the measurement still owed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_TILE_PIXELS = 256  # pixels per program tile: a (256, Co) float32 accumulator
_SPLIT = 4          # row chunks per sample (and per kernel row) in `kernel_grad`


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _tile(hgt: int, wid: int) -> tuple[int, int]:
  """(th, tw): rows and columns of a program's tile (powers of two, dividing H, W)."""
  tw = min(wid, _TILE_PIXELS)
  th = max(1, _TILE_PIXELS // tw)
  while th > 1 and hgt % th:
    th //= 2
  return th, tw


def supported(shape, co: int) -> bool:
  """Whether the kernels take an input of `shape` (G, H, W, Ci) and Co output channels."""
  _, hgt, wid, ci = shape
  th, tw = _tile(hgt, wid)
  return (ci >= 16 and co >= 16 and _pow2(ci) and _pow2(co) and _pow2(tw)
          and wid % tw == 0 and hgt % th == 0)


def _interpret() -> bool:
  return jax.default_backend() != 'gpu'


def _params():
  if _interpret():
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _pad(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def _conv_kernel(xp_ref, k_ref, o_ref, *, th, tw):
  r0 = pl.program_id(1) * th
  c0 = pl.program_id(2) * tw
  ci, co = xp_ref.shape[-1], o_ref.shape[-1]
  acc = jnp.zeros((th * tw, co), jnp.float32)
  for dy in range(3):
    for dx in range(3):
      xs = xp_ref[pl.ds(r0 + dy, th), pl.ds(c0 + dx, tw), :].reshape(th * tw, ci)
      acc += jnp.dot(xs, k_ref[dy, dx], preferred_element_type=jnp.float32)
  o_ref[...] = acc.reshape(th, tw, co).astype(o_ref.dtype)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' 3x3 convolution with one kernel per sample (module docstring)."""
  g, hgt, wid, ci = x.shape
  co = kernel.shape[-1]
  if kernel.shape != (g, 3, 3, ci, co) or not supported(x.shape, co):
    raise ValueError(f'pallas conv3x3: unsupported input {x.shape} / kernel {kernel.shape}')
  th, tw = _tile(hgt, wid)
  return pl.pallas_call(
      functools.partial(_conv_kernel, th=th, tw=tw),
      out_shape=jax.ShapeDtypeStruct((g, hgt, wid, co), x.dtype),
      grid=(g, hgt // th, wid // tw),
      in_specs=[pl.BlockSpec((None, hgt + 2, wid + 2, ci), lambda s, i, j: (s, 0, 0, 0)),
                pl.BlockSpec((None, 3, 3, ci, co), lambda s, i, j: (s, 0, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, th, tw, co), lambda s, i, j: (s, i, j, 0)),
      compiler_params=_params(), interpret=_interpret(), name='sample_conv3x3',
  )(_pad(x), kernel.astype(x.dtype))


def _kgrad_kernel(xp_ref, dz_ref, o_ref, *, th, tw, rows):
  dy = pl.program_id(1)
  r_base = pl.program_id(2) * rows
  ci, co = xp_ref.shape[-1], dz_ref.shape[-1]
  n_cols = dz_ref.shape[1] // tw

  def body(t, accs):
    # lax.div / lax.rem: C division of non-negative ints (jnp's floor forms do not lower).
    r = r_base + jax.lax.div(t, n_cols) * th
    c = jax.lax.rem(t, n_cols) * tw
    d = dz_ref[pl.ds(r, th), pl.ds(c, tw), :].reshape(th * tw, co)
    out = []
    for dx in range(3):
      xs = xp_ref[pl.ds(r + dy, th), pl.ds(c + dx, tw), :].reshape(th * tw, ci)
      out.append(accs[dx] + jax.lax.dot_general(
          xs, d, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
    return tuple(out)

  zero = jnp.zeros((ci, co), jnp.float32)
  accs = jax.lax.fori_loop(0, (rows // th) * n_cols, body, (zero, zero, zero))
  for dx in range(3):
    o_ref[dx] = accs[dx]


def kernel_grad(x: jax.Array, dz: jax.Array) -> jax.Array:
  """d/dkernel of sum(conv3x3(x, kernel) * dz): (G, 3, 3, Ci, Co) float32."""
  g, hgt, wid, ci = x.shape
  co = dz.shape[-1]
  if dz.shape != (g, hgt, wid, co) or not supported(x.shape, co):
    raise ValueError(f'pallas kernel_grad: unsupported input {x.shape} / gradient {dz.shape}')
  th, tw = _tile(hgt, wid)
  split = _SPLIT if (hgt // th) % _SPLIT == 0 else 1
  rows = hgt // split
  parts = pl.pallas_call(
      functools.partial(_kgrad_kernel, th=th, tw=tw, rows=rows),
      out_shape=jax.ShapeDtypeStruct((g, 3, split, 3, ci, co), jnp.float32),
      grid=(g, 3, split),
      in_specs=[pl.BlockSpec((None, hgt + 2, wid + 2, ci), lambda s, a, b: (s, 0, 0, 0)),
                pl.BlockSpec((None, hgt, wid, co), lambda s, a, b: (s, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, None, None, 3, ci, co),
                             lambda s, a, b: (s, a, b, 0, 0, 0)),
      compiler_params=_params(), interpret=_interpret(), name='sample_conv3x3_kernel_grad',
  )(_pad(x), dz.astype(x.dtype))
  return parts.sum(axis=2)


def input_grad(kernel: jax.Array, dz: jax.Array) -> jax.Array:
  """d/dx of sum(conv3x3(x, kernel) * dz): the convolution of dz with each kernel
  rotated by 180 degrees, channel axes swapped."""
  return conv3x3(dz, jnp.flip(kernel, axis=(1, 2)).swapaxes(3, 4))
