"""Pallas (Triton) kernels for the stems' per-sample 3x3 convolution on GPUs.

The stems convolve every sample with its own band's kernel (models/sample_conv.py).
XLA:GPU runs that as im2col: a (G, H, W, 9 Ci) column buffer and a batched matmul. On
an H200 the column writes alone took 48 ms of a 169 ms ViT-B step (9.85 GB each for the
Euclid stems' second layer, written at 0.3-0.55 TB/s; docs/performance.md, session 5).
These kernels compute the convolution without the buffer: each program loads a tile of
`th` x `tw` pixels of one sample for each of the 9 taps (shifted windows of the input,
read from global memory / L2 with the neighbouring taps' overlap) and
accumulates (th*tw, Ci) x (Ci, Co) dots in float32 registers.

The kernels read the unpadded input and zero the taps outside the image themselves
(`_window`: clamped row / column index arrays and a select), so no `jnp.pad` pass comes
before them (the padded copies were separate XLA passes in the ViT-B step's profile,
~3 ms on an H100). Measured on an H200 (session 12, the check in launch/bench_gpu.sh,
3 interleaved rounds): forward + both gradients at 64 x 256 x 256 x 32 -> 64 in bf16
take 4.26 ms against 4.25 ms for the padded form (`_PAD_FREE = False`, kept for that
A/B) and 6.77 ms for im2col: the selects cost what the padding passes did. The pad-free
form stays the default for the memory it saves (no padded copy of each input).

* `conv3x3(x, kernel)`: 'SAME' convolution, (G, H, W, Ci) x (G, 3, 3, Ci, Co) ->
  (G, H, W, Co). Also the input gradient: the same convolution of the output gradient
  with each kernel rotated by 180 degrees and its channel axes swapped.
* `kernel_grad(x, dz)`: (G, 3, 3, Ci, Co), the per-sample sum over pixels of the
  shifted input times the output gradient; programs split the rows of a sample and
  one of the 3 kernel rows, and XLA sums the float32 partial results.

`supported(shape, co)` says which shapes the kernels take (power-of-two channels of at
least 16, tiles that divide the image); sample_conv falls back to im2col otherwise.
Lowered for CUDA they are Triton kernels; for any other platform, Pallas's interpret
mode (plain XLA ops: the CPU tests). Measured on an H200 (session 8, jax 0.11.2; bf16,
64 x 256 x 256 x 32 -> 64, forward and both gradients): 5.14 ms against im2col's 6.73,
relative error against a float32 reference 2.9e-3 (im2col: 2.9e-3 to 4.8e-3). In the
ViT-B train step they are sample_conv's 'auto' form on CUDA (docs/performance.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Launch parameters, read when a function is traced (a tuning script may set them):
_TILE_PIXELS = 256        # pixels per program tile: a (256, Co) float32 accumulator
_KGRAD_TILE_PIXELS = 256  # pixels per loop iteration of `kernel_grad`
_SPLIT = 16               # row chunks per sample (and per kernel row) in `kernel_grad`
_KGRAD_CO_MAJOR = True    # `kernel_grad` accumulates (Co, Ci) = dz^T x, not (Ci, Co)
# Chosen by launch/tune_pallas.py on an H200 (session 8, 256 x 256 x 256 x 32 -> 64,
# bf16): the forward took 3.7-3.9 ms at tiles of 128 or 256 px with 4 or 8 warps and
# 2 or 3 stages alike (512 px: 4.6-8.1 ms). The kernel gradient took 6.3 ms co-major
# against 8.9-9.0 ms Ci-major (a guess at why: the dots' M dimension is then Co = 64,
# the row count of Hopper's warp-group MMA, rather than Ci = 32); 8 warps were slower
# (8.6-15 ms), 512-px tiles slower or over the shared memory; split 16 or 4 alike
# (6.31 / 6.43 ms).
_NUM_WARPS = 4            # Triton launch of `conv3x3` (forward and input gradient)
_NUM_STAGES = 2
_KGRAD_NUM_WARPS = 4      # and of `kernel_grad`
_KGRAD_NUM_STAGES = 2
# The kernels read the unpadded input and zero the outside taps (`_window`); False: the
# former form, a `jnp.pad`-ded copy read with plain slices (kept for A/B timing on a GPU:
# launch/bench_gpu.sh's pallas check times both in one process).
_PAD_FREE = True


def _pow2(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def _tile(hgt: int, wid: int, pixels: int | None = None) -> tuple[int, int]:
  """(th, tw): rows and columns of a tile of about `pixels` pixels (default
  `_TILE_PIXELS`; powers of two, dividing H, W)."""
  pixels = pixels or _TILE_PIXELS
  tw = min(wid, pixels)
  th = max(1, pixels // tw)
  while th > 1 and hgt % th:
    th //= 2
  return th, tw


def supported(shape, co: int) -> bool:
  """Whether the kernels take an input of `shape` (G, H, W, Ci) and Co output channels."""
  _, hgt, wid, ci = shape
  tiles = (_tile(hgt, wid), _tile(hgt, wid, _KGRAD_TILE_PIXELS))
  return (ci >= 16 and co >= 16 and _pow2(ci) and _pow2(co)
          and all(_pow2(tw) and wid % tw == 0 and hgt % th == 0 for th, tw in tiles))


def _call(kernel, *args, warps: int, stages: int, **kwargs):
  """`pl.pallas_call(kernel, **kwargs)(*args)`: Triton where the program is lowered for
  CUDA, Pallas's interpreter (plain XLA ops) for every other platform. The choice is
  made per lowering platform (`lax.platform_dependent`), not by the default backend, so
  a program lowered on a CPU host for CUDA gets the Triton kernels (tests check that)."""
  def triton(*a):
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    params = pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    return pl.pallas_call(kernel, compiler_params=params, **kwargs)(*a)

  def interpreted(*a):
    return pl.pallas_call(kernel, interpret=True, **kwargs)(*a)

  return jax.lax.platform_dependent(*args, cuda=triton, default=interpreted)


def _kernel_input(x):
  """(x as the kernels read it, its full-sample block shape (H', W', Ci)): x itself, or
  with `_PAD_FREE` False a copy padded by one zero pixel on each side."""
  if _PAD_FREE:
    return x, x.shape[1:]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return xp, xp.shape[1:]


def _window(x_ref, r, c, th, tw, *, rows_inside=False, cols_inside=False, padded=False):
  """(th * tw, Ci): pixels [r, r + th) x [c, c + tw) of the unpadded (H, W, Ci) block
  `x_ref`, zero where a row or column falls outside the image ('SAME' padding without
  a padded copy). `rows_inside` / `cols_inside`: known statically to be in range.

  Out-of-range windows are read with integer index arrays, clamped into the image, and
  the outside pixels are zeroed with `jnp.where` after the load. Not `pl.ds` with a start
  of -1 or H - th + 1: Pallas's interpret mode reads those with `lax.dynamic_slice`,
  which clamps the start and so shifts the whole window. Triton computes a pointer per
  element either way (as for `pl.ds`); the clamped rows / columns are constant along the
  contiguous channel axis, so its loads stay vectorized along Ci. `padded`: `x_ref` is
  the input padded by one zero pixel on each side (`_PAD_FREE` False), read by slices."""
  hgt, wid, ci = x_ref.shape
  if padded:
    return x_ref[pl.ds(r + 1, th), pl.ds(c + 1, tw), :].reshape(th * tw, ci)
  if rows_inside and cols_inside:
    return x_ref[pl.ds(r, th), pl.ds(c, tw), :].reshape(th * tw, ci)
  rows = r + jax.lax.broadcasted_iota(jnp.int32, (th, 1, 1), 0)
  cols = c + jax.lax.broadcasted_iota(jnp.int32, (1, tw, 1), 1)
  chans = jax.lax.broadcasted_iota(jnp.int32, (1, 1, ci), 2)
  valid = None
  if not rows_inside:
    valid = (rows >= 0) & (rows < hgt)
    rows = jnp.minimum(jnp.maximum(rows, 0), hgt - 1)
  if not cols_inside:
    ok = (cols >= 0) & (cols < wid)
    valid = ok if valid is None else valid & ok
    cols = jnp.minimum(jnp.maximum(cols, 0), wid - 1)
  xs = x_ref[rows, cols, chans]
  xs = jnp.where(valid, xs, jnp.zeros((), xs.dtype))
  return xs.reshape(th * tw, ci)


def _conv_kernel(x_ref, k_ref, o_ref, *, th, tw, padded):
  r0 = pl.program_id(1) * th
  c0 = pl.program_id(2) * tw
  co = o_ref.shape[-1]
  acc = jnp.zeros((th * tw, co), jnp.float32)
  for dy in range(3):
    for dx in range(3):
      xs = _window(x_ref, r0 + dy - 1, c0 + dx - 1, th, tw,
                   rows_inside=dy == 1, cols_inside=dx == 1, padded=padded)
      acc += jnp.dot(xs, k_ref[dy, dx], preferred_element_type=jnp.float32)
  o_ref[...] = acc.reshape(th, tw, co).astype(o_ref.dtype)


def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' 3x3 convolution with one kernel per sample (module docstring)."""
  g, hgt, wid, ci = x.shape
  co = kernel.shape[-1]
  if kernel.shape != (g, 3, 3, ci, co) or not supported(x.shape, co):
    raise ValueError(f'pallas conv3x3: unsupported input {x.shape} / kernel {kernel.shape}')
  th, tw = _tile(hgt, wid)
  xin, block = _kernel_input(x)
  return _call(
      functools.partial(_conv_kernel, th=th, tw=tw, padded=not _PAD_FREE),
      xin, kernel.astype(x.dtype),
      out_shape=jax.ShapeDtypeStruct((g, hgt, wid, co), x.dtype),
      grid=(g, hgt // th, wid // tw),
      in_specs=[pl.BlockSpec((None, *block), lambda s, i, j: (s, 0, 0, 0)),
                pl.BlockSpec((None, 3, 3, ci, co), lambda s, i, j: (s, 0, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, th, tw, co), lambda s, i, j: (s, i, j, 0)),
      warps=_NUM_WARPS, stages=_NUM_STAGES, name='sample_conv3x3')


def _kgrad_kernel(x_ref, dz_ref, o_ref, *, th, tw, rows, co_major, padded):
  dy = pl.program_id(1)
  r_base = pl.program_id(2) * rows
  ci, co = x_ref.shape[-1], dz_ref.shape[-1]
  n_cols = dz_ref.shape[1] // tw

  def body(t, accs):
    # lax.div / lax.rem: C division of non-negative ints (jnp's floor forms do not lower).
    r = r_base + jax.lax.div(t, n_cols) * th
    c = jax.lax.rem(t, n_cols) * tw
    d = dz_ref[pl.ds(r, th), pl.ds(c, tw), :].reshape(th * tw, co)
    out = []
    for dx in range(3):
      xs = _window(x_ref, r + dy - 1, c + dx - 1, th, tw, cols_inside=dx == 1,
                   padded=padded)
      a, b = (d, xs) if co_major else (xs, d)
      out.append(accs[dx] + jax.lax.dot_general(
          a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32))
    return tuple(out)

  zero = jnp.zeros((co, ci) if co_major else (ci, co), jnp.float32)
  accs = jax.lax.fori_loop(0, (rows // th) * n_cols, body, (zero, zero, zero))
  for dx in range(3):
    o_ref[dx] = accs[dx].T if co_major else accs[dx]


def kernel_grad(x: jax.Array, dz: jax.Array) -> jax.Array:
  """d/dkernel of sum(conv3x3(x, kernel) * dz): (G, 3, 3, Ci, Co) float32."""
  g, hgt, wid, ci = x.shape
  co = dz.shape[-1]
  if dz.shape != (g, hgt, wid, co) or not supported(x.shape, co):
    raise ValueError(f'pallas kernel_grad: unsupported input {x.shape} / gradient {dz.shape}')
  th, tw = _tile(hgt, wid, _KGRAD_TILE_PIXELS)
  split = _SPLIT
  while (hgt // th) % split:  # the largest power of two up to _SPLIT that divides the rows
    split //= 2
  rows = hgt // split
  xin, block = _kernel_input(x)
  parts = _call(
      functools.partial(_kgrad_kernel, th=th, tw=tw, rows=rows, co_major=_KGRAD_CO_MAJOR,
                        padded=not _PAD_FREE),
      xin, dz.astype(x.dtype),
      out_shape=jax.ShapeDtypeStruct((g, 3, split, 3, ci, co), jnp.float32),
      grid=(g, 3, split),
      in_specs=[pl.BlockSpec((None, *block), lambda s, a, b: (s, 0, 0, 0)),
                pl.BlockSpec((None, hgt, wid, co), lambda s, a, b: (s, 0, 0, 0))],
      out_specs=pl.BlockSpec((None, None, None, 3, ci, co),
                             lambda s, a, b: (s, a, b, 0, 0, 0)),
      warps=_KGRAD_NUM_WARPS, stages=_KGRAD_NUM_STAGES, name='sample_conv3x3_kernel_grad')
  return parts.sum(axis=2)


def input_grad(kernel: jax.Array, dz: jax.Array) -> jax.Array:
  """d/dx of sum(conv3x3(x, kernel) * dz): the convolution of dz with each kernel
  rotated by 180 degrees, channel axes swapped."""
  return conv3x3(dz, jnp.flip(kernel, axis=(1, 2)).swapaxes(3, 4))
