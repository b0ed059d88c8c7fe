"""Per-sample convolutions of the band stems: a different kernel for every sample.

The band stems gather each sample's kernels by band id (stems.py), so the reference
stem is, per sample g with its band's parameters,

    features[g] = gelu(conv3x3(gelu(conv3x3(x[g], k1[g]) + b1[g]), k2[g]) + b2[g]) * mask[g]

XLA has no fast batched form of a per-sample convolution on every platform, so there
are two implementations of the same function (`conv_stem`, and `conv3x3` for one layer):

* ``'im2col'``: the 3x3 neighbourhoods concatenated into (G, H, W, 9 Ci) columns and
  one batched matmul per layer, then element-wise GELU / mask and patchify passes.
  Plain XLA ops: every backend, sharding and XLA's cost analysis handle it. The price
  is a column buffer 9x the input and a full pass over memory for every step.
* ``'loop'``: a loop over the samples (`lax.map`) whose body runs the WHOLE stem of one
  sample -- native convolutions, GELU, mask, patchify -- on a working set of a few MB
  that stays in cache, with a custom VJP: the backward loop recomputes the sample's
  forward (nothing but the inputs is saved) and differentiates it with the fast
  convolution forms (input gradient: the convolution with the kernel rotated by 180
  degrees and its channel axes swapped; kernel gradient: a convolution of the padded
  input with the output gradient as the window); XLA:CPU's own backward convolutions
  are several times slower. Under SPMD a loop over a sharded batch would gather the
  whole batch onto every device, so the loops are wrapped in `custom_partitioning`:
  each device loops over its own samples.

Measured on CPU (2 cores, AMD EPYC, 32 Rubin views of 128 x 128 px, 2 -> 32 -> 64
channels, stride-16 patchify, forward + backward; load ~5): 'loop' ~1.3 CPU s and
0.2 GB of temporaries per call, 'im2col' ~3.3 CPU s and 1.6 GB.

``'auto'`` (the default) takes 'loop' on CPU and 'im2col' elsewhere (GPU/TPU fuse the
matmul form well; a grouped convolution is the other candidate there, pending
measurement). XLA's cost analysis counts a loop body once, so FLOP counts of a
program that uses 'loop' are too low: count FLOPs on the 'im2col' form
(`implementation('im2col')`), as the benchmark harness does.
"""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

IMPLEMENTATIONS = ('auto', 'loop', 'im2col')
_DN = ('NHWC', 'HWIO', 'NHWC')
_impl = 'auto'


@contextlib.contextmanager
def implementation(name: str):
  """Selects the implementation for functions TRACED inside the block."""
  global _impl
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'unknown per-sample conv implementation {name!r}; '
                     f'expected one of {IMPLEMENTATIONS}')
  previous, _impl = _impl, name
  try:
    yield
  finally:
    _impl = previous


def _dispatch(loop_fn, im2col_fn, *args):
  if _impl == 'im2col':
    return im2col_fn(*args)
  if _impl == 'loop':
    return loop_fn(*args)
  return jax.lax.platform_dependent(*args, cpu=loop_fn, default=im2col_fn)


def _gelu(x):
  return nn.gelu(x, approximate=False)


def patchify(x: jax.Array, stride: int) -> jax.Array:
  """(..., H, W, C) -> (..., H/s, W/s, s*s*C), patch pixels in (dy, dx, c) order."""
  *lead, hgt, wid, c = x.shape
  if hgt % stride or wid % stride:
    raise ValueError(f'view of {hgt}x{wid} px is not a whole number of {stride}-px tokens')
  h, w = hgt // stride, wid // stride
  x = x.reshape(*lead, h, stride, w, stride, c)
  n = len(lead)
  x = jnp.moveaxis(x, n + 2, n + 1)  # (..., h, w, s, s, C)
  return x.reshape(*lead, h, w, stride * stride * c)


# -- public functions ------------------------------------------------------------------

def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """'SAME' 3x3 convolution, one kernel per sample.

  Args:
    x: (G, H, W, Ci); kernel: (G, 3, 3, Ci, Co).
  Returns:
    (G, H, W, Co).
  """
  return _dispatch(_loop_conv3x3, conv3x3_im2col, x, kernel)


def conv_stem(x, mask, k1, b1, k2, b2, stride: int) -> jax.Array:
  """The two-layer reference stem of every sample, patchified (module docstring).

  Args:
    x: (G, H, W, Ci) input; mask: (G, H, W) valid pixels (features are zeroed elsewhere).
    k1: (G, 3, 3, Ci, C1), b1: (G, C1), k2: (G, 3, 3, C1, C2), b2: (G, C2): each
      sample's kernels and biases.
    stride: patch side s.
  Returns:
    (G, H/s, W/s, s*s*C2) patchified features, pixels in (dy, dx, c) order.
  """
  return _dispatch(lambda *a: patchify(_loop_stem(*a), stride),
                   functools.partial(conv_stem_im2col, stride=stride),
                   x, mask, k1, b1, k2, b2)


def conv3x3_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` as im2col + one batched matmul."""
  g, hgt, wid, ci = x.shape
  co = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate(
      [xp[:, dy:dy + hgt, dx:dx + wid] for dy in range(3) for dx in range(3)],
      axis=-1)  # (G, H, W, 9*Ci), (dy, dx, c) order = kernel's row-major order
  return jnp.einsum('ghwk,gkd->ghwd', cols, kernel.reshape(g, 9 * ci, co))


def conv_stem_im2col(x, mask, k1, b1, k2, b2, stride: int) -> jax.Array:
  """`conv_stem` from `conv3x3_im2col` and element-wise passes."""
  h = _gelu(conv3x3_im2col(x, k1) + b1[:, None, None, :])
  f = _gelu(conv3x3_im2col(h, k2) + b2[:, None, None, :]) * mask[..., None].astype(h.dtype)
  return patchify(f, stride)


# -- one sample ------------------------------------------------------------------------

def _conv_one_raw(x, kernel):  # (H, W, Ci), (3, 3, Ci, Co) -> (H, W, Co)
  return jax.lax.conv_general_dilated(x[None], kernel, (1, 1), 'SAME',
                                      dimension_numbers=_DN)[0]


def _kernel_grad_one(x, dy):  # (H, W, Ci), (H, W, Co) -> (3, 3, Ci, Co)
  # dk[a, b, i, o] = sum_hw xpad[h + a, w + b, i] dy[h, w, o]: a VALID convolution
  # with the channels of x as the batch and dy as a (H, W, 1, Co) window.
  xp = jnp.pad(x, ((1, 1), (1, 1), (0, 0)))
  out = jax.lax.conv_general_dilated(xp.transpose(2, 0, 1)[..., None], dy[:, :, None, :],
                                     (1, 1), 'VALID', dimension_numbers=_DN)  # (Ci, 3, 3, Co)
  return out.transpose(1, 2, 0, 3)


def _conv_one_bwd(x, kernel, dy):
  """(dx, dkernel) of one sample's convolution, from its output gradient `dy`."""
  # The transpose of a stride-1 'SAME' 3x3 convolution is the 'SAME' convolution with
  # the kernel rotated by 180 degrees and its channel axes swapped.
  flipped = jnp.flip(kernel, axis=(0, 1)).swapaxes(2, 3)  # (3, 3, Co, Ci)
  return _conv_one_raw(dy, flipped), _kernel_grad_one(x, dy)


def _stem_fwd_one(x, mask, k1, b1, k2, b2):
  """One sample's stem features (H, W, C2) and the pre-activations the backward needs."""
  z1 = _conv_one_raw(x, k1) + b1[None, None, :]  # (H, W, C1)
  z2 = _conv_one_raw(_gelu(z1), k2) + b2[None, None, :]  # (H, W, C2)
  return _gelu(z2) * mask[..., None].astype(z2.dtype), (z1, z2)


def _stem_one(x, mask, k1, b1, k2, b2):
  return _stem_fwd_one(x, mask, k1, b1, k2, b2)[0]


def _stem_bwd_one(x, mask, k1, b1, k2, b2, z1, z2, df):
  """Gradients of one sample's stem w.r.t. (x, mask, k1, b1, k2, b2)."""
  del b1, b2
  m = mask[..., None].astype(df.dtype)
  a2, gelu2_vjp = jax.vjp(_gelu, z2)
  g2 = gelu2_vjp(df * m)[0]  # d z2, (H, W, C2)
  dmask = jnp.sum(df * a2, axis=-1).astype(mask.dtype)
  h1, gelu1_vjp = jax.vjp(_gelu, z1)
  dh1, dk2 = _conv_one_bwd(h1, k2, g2)
  g1 = gelu1_vjp(dh1)[0]  # d z1, (H, W, C1)
  dx, dk1 = _conv_one_bwd(x, k1, g1)
  return dx, dmask, dk1, jnp.sum(g1, axis=(0, 1)), dk2, jnp.sum(g2, axis=(0, 1))


# -- loops over the samples, partitioned along the batch --------------------------------

def _ranks(types) -> list[int]:
  return [len(mlir.ir.RankedTensorType(t).shape) for t in types]


def _batch_rule(mesh, operand_types, result_types):
  """Einsum-like Shardy rule: axis 0 is one shared factor 'b', every other axis its own."""
  del mesh
  side = lambda prefix, ranks: ', '.join(
      ' '.join(['b'] + [f'{prefix}{i}_{d}' for d in range(1, r)]) for i, r in enumerate(ranks))
  return f'{side("x", _ranks(operand_types))} -> {side("y", _ranks(result_types))}'


def _batch_spec(sharding, ndim: int) -> P:
  """The spec that keeps only `sharding`'s split of axis 0 (the batch)."""
  spec = getattr(sharding, 'spec', None)
  first = spec[0] if spec is not None and len(spec) else None
  return P(first, *([None] * (ndim - 1)))


def _batch_parallel(fn):
  """`fn` (a loop over axis 0) partitioned so that each device loops over its samples."""
  wrapped = custom_partitioning(fn)

  def infer(mesh, arg_shapes, result_shape):
    first = arg_shapes[0].sharding
    return jax.tree.map(lambda r: NamedSharding(mesh, _batch_spec(first, len(r.shape))),
                        result_shape)

  def partition(mesh, arg_shapes, result_shape):
    first = arg_shapes[0].sharding
    sh = lambda a: NamedSharding(mesh, _batch_spec(first, len(a.shape)))
    return mesh, fn, jax.tree.map(sh, result_shape), tuple(sh(a) for a in arg_shapes)

  wrapped.def_partition(partition=partition, infer_sharding_from_operands=infer,
                        sharding_rule=_batch_rule)
  return wrapped


def _per_sample(primal_one, fwd_one, bwd_one):
  """A batched function over axis 0 of every argument: loops, custom VJP, batch-partitioned.

  primal_one(*args) -> out and fwd_one(*args) -> (out, residuals) compute one sample;
  bwd_one(*args, *residuals, cotangent) -> the sample's input gradients.
  """
  primal = _batch_parallel(lambda *a: jax.lax.map(lambda t: primal_one(*t), a))
  forward = _batch_parallel(
      lambda *a: jax.lax.map(lambda t: (lambda o, r: (o, *r))(*fwd_one(*t)), a))
  backward = _batch_parallel(lambda *a: jax.lax.map(lambda t: bwd_one(*t), a))

  @jax.custom_vjp
  def batched(*args):
    return primal(*args)

  def fwd(*args):
    out, *res = forward(*args)
    return out, (args, res)

  def bwd(saved, ct):
    args, res = saved
    return tuple(backward(*args, *res, ct))

  batched.defvjp(fwd, bwd)
  return batched


_loop_conv3x3 = _per_sample(_conv_one_raw, lambda x, k: (_conv_one_raw(x, k), ()),
                            _conv_one_bwd)
_loop_stem = _per_sample(_stem_one, _stem_fwd_one, _stem_bwd_one)
