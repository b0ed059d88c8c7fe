"""Per-sample convolutions of the band stems: a different kernel for every sample.

The band stems gather each sample's kernels by band id (stems.py), so the reference
stem is, per sample g with its band's parameters,

    features[g] = gelu(conv3x3(gelu(conv3x3(x[g], k1[g]) + b1[g]), k2[g]) + b2[g]) * mask[g]

XLA has no fast batched form of a per-sample convolution on every platform, so there
are two implementations of the same functions (`conv_stem`; `stem_tokens`, the stem
followed by its shared stride-s patch embedding; `conv3x3` for one layer):

* ``'im2col'``: the 3x3 neighbourhoods concatenated into (G, H, W, 9 Ci) columns and
  one batched matmul per layer, then element-wise GELU / mask and patchify passes.
  Plain XLA ops: every backend, sharding and XLA's cost analysis handle it. The price
  is a column buffer 9x the input and a full pass over memory for every step.
* ``'grouped'``: the im2col functions with each 3x3 layer as one grouped convolution
  (the samples as feature groups, `conv3x3_grouped`): no column buffer; on GPU cuDNN's
  grouped kernels (docs/performance.md has the measured comparison).
* ``'shift'``: the im2col functions with each 3x3 layer of Ci > 2 as 9 batched matmuls
  on shifted views, summed in float32 (`conv3x3_shift`): no column buffer (slower on
  an H200; kept for the record).
* ``'pallas'``: the im2col functions with each 3x3 layer of Ci >= 16 as the Pallas
  (Triton) kernels of models/pallas_conv.py: no column buffer, one kernel each for the
  forward, the input gradient and the kernel gradient (GPUs; interpret mode elsewhere).
* ``'loop'``: a loop over the samples (`lax.map`) whose body runs the WHOLE stem of
  one sample -- native convolutions (the first layer, of at most `_COLS_MAX_CI` input
  channels, as im2col + one matmul), GELU, mask, patchify -- on a working set of a
  few MB, with a custom VJP: the backward recomputes conv1 (2 input channels) and
  differentiates with the fast convolution forms (input gradient: the convolution with
  the kernel rotated by 180 degrees and its channel axes swapped; kernel gradient: a
  convolution of the padded input with the output gradient as the window); XLA:CPU's
  own backward convolutions are several times slower. Only z2 (the second
  pre-activation) is saved for the backward. `stem_tokens` also runs the patch
  embedding inside the loop, on chunks of `_CHUNK` samples (in the forward one matmul
  per patch row over the chunk, `_embed_by_rows`, so the features are never patchified;
  in the backward one matmul per chunk for the features' gradient), so
  that the (G, H, W, C2) features, their patchified copy and the gradients of both are
  never materialised for the whole batch: on XLA:CPU every temporary buffer is fresh
  memory each step (page faults, ~0.5 ms per MB) besides the memory traffic. Under
  SPMD a loop over a sharded batch would gather the whole batch onto every device, so
  the loops are wrapped in `custom_partitioning`: each device loops over its own
  samples (shared weights replicated; the patch-embedding kernel's gradient is one
  matmul outside the loop, which XLA reduces over the batch shards).

GELU is the exact one, written with erf as PyTorch computes it (jax.nn.gelu's erfc
form is the same function to float rounding, with more element-wise work).

Measured on CPU (2 cores, AMD EPYC, 32 Rubin views of 128 x 128 px, 2 -> 32 -> 64
channels, stride-16 patch embedding to D = 256, gradients w.r.t. the weights; process
CPU seconds, the machine shared with other jobs): forward + backward 'loop' 2.08 s
(per-sample loop, then patchify and the embedding outside) -> 1.75 s (`stem_tokens`,
erf GELU), forward alone 0.67 -> 0.62 s; page faults 148k -> 71k per call. docs/performance.md.

``'auto'`` (the default) takes 'loop' on CPU, 'pallas' on CUDA GPUs and 'im2col'
elsewhere (TPU, ROCm: not measured). On an H200 the im2col column writes were most of
the ViT-B stems' time (docs/performance.md, session 5); 'pallas' removed them: ViT-B
bf16 at 256 pairs ran 2133 samples/s against im2col's 1661 (+28%, session 8). XLA's
cost analysis counts a loop body once, so FLOP counts of a program that uses 'loop'
are too low: count FLOPs on the 'im2col' form (`implementation('im2col')`), as the
benchmark harness does.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.interpreters import mlir
from jax.sharding import NamedSharding, PartitionSpec as P

from jaisp_jax.models import activations
from jaisp_jax.models import pallas_conv

IMPLEMENTATIONS = ('auto', 'loop', 'im2col', 'grouped', 'shift', 'pallas')
_DN = ('NHWC', 'HWIO', 'NHWC')
EMBEDDINGS = ('matmul', 'conv')
# What `implementation` and `embedding` select for functions traced now.
_selected = {'implementation': 'auto', 'embedding': 'matmul'}
# Samples per iteration of the token loop (`stem_tokens`): the chunk's patch-embedding
# matmul has chunk * h * w rows, and its shared (s*s*C2, D) kernel is packed once per
# call, so larger chunks run the matmul faster ((M, 16384) x (16384, 256) on the 2-core
# CPU: M = 128 at 145 GFLOP/s, 512 at 186). Train step at torch_ref (XLA convolutions,
# 16 interleaved steps each): chunk 2 / 4 / 8 / 16 = 2.24 / 2.13-2.15 / 2.05-2.08 /
# 2.09 s. With YNNPACK convolutions (before xla_options) 2, 4 and 8 measured alike.
_CHUNK = 8


@contextlib.contextmanager
def _select(key: str, name: str, choices: tuple[str, ...], what: str):
  """Sets `_selected[key]` to `name` (one of `choices`) for the block, then restores it."""
  if name not in choices:
    raise ValueError(f'unknown {what} {name!r}; expected one of {choices}')
  previous, _selected[key] = _selected[key], name
  try:
    yield
  finally:
    _selected[key] = previous


def implementation(name: str):
  """Selects the implementation for functions TRACED inside the block."""
  return _select('implementation', name, IMPLEMENTATIONS, 'per-sample conv implementation')


def embedding(name: str):
  """Selects how the XLA forms (all but 'loop') apply the stride-s patch
  embedding in functions TRACED inside the block: 'matmul' (patchify + matmul, the
  default) or 'conv' (a stride-s convolution)."""
  return _select('embedding', name, EMBEDDINGS, 'patch-embedding form')


def current_implementation() -> str:
  """The implementation selected for functions traced now (`implementation`)."""
  return _selected['implementation']


def _dispatch(loop_fn, xla_fn, *args):
  """`loop_fn(*args)` for 'loop'; `xla_fn(*args, conv=<that form's conv3x3>)` for the
  XLA forms; 'auto': the loop on CPU, 'pallas' on CUDA GPUs, im2col elsewhere."""
  impl = _selected['implementation']
  if impl == 'loop':
    return loop_fn(*args)
  if impl != 'auto':
    return xla_fn(*args, conv=_XLA_CONVS[impl])
  return jax.lax.platform_dependent(
      *args, cpu=loop_fn, cuda=functools.partial(xla_fn, conv=conv3x3_pallas),
      default=functools.partial(xla_fn, conv=conv3x3_im2col))


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
  return _dispatch(_loop_conv3x3, lambda x, kernel, conv: conv(x, kernel), x, kernel)


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
  return _dispatch(lambda *a: patchify(_loop_stem_features(*a), stride),
                   functools.partial(conv_stem_im2col, stride=stride),
                   x, mask, k1, b1, k2, b2)


def stem_tokens(x, mask, k1, b1, k2, b2, kernel, stride: int) -> jax.Array:
  """`conv_stem` followed by its stride-s patch embedding (bias not included).

  Args:
    x, mask, k1, b1, k2, b2, stride: as in `conv_stem`.
    kernel: (s*s*C2, D) patch-embedding matrix, shared by all samples.
  Returns:
    (G, H/s, W/s, D) = conv_stem(...) @ kernel.
  """
  return _dispatch(functools.partial(_loop_tokens, stride=stride),
                   functools.partial(stem_tokens_im2col, stride=stride),
                   x, mask, k1, b1, k2, b2, kernel)


def conv3x3_im2col(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` as im2col + one batched matmul."""
  g, hgt, wid, ci = x.shape
  co = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  cols = jnp.concatenate(
      [xp[:, dy:dy + hgt, dx:dx + wid] for dy in range(3) for dx in range(3)],
      axis=-1)  # (G, H, W, 9*Ci), (dy, dx, c) order = kernel's row-major order
  return jnp.einsum('ghwk,gkd->ghwd', cols, kernel.reshape(g, 9 * ci, co))


def conv3x3_grouped(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` as one grouped convolution (samples as groups): JAX's batching rule for
  a convolution with a batched kernel, which XLA:GPU hands to cuDNN."""
  return jax.vmap(_conv_one_raw)(x, kernel)


def conv3x3_shift(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` as the sum of 9 batched matmuls, one per tap, on shifted views of the
  padded input: no (G, H, W, 9 Ci) column buffer, but nine float32 partial outputs (on
  an H200 the ViT-B step was slower with it, 196 against 175 ms, at twice the memory;
  docs/performance.md). Inputs of at most 2 channels (the stems' first layer) take the
  im2col form, whose columns are then small and whose matmul has K = 9 Ci."""
  _, hgt, wid, ci = x.shape
  if ci <= 2:
    return conv3x3_im2col(x, kernel)
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = None
  for dy in range(3):
    for dx in range(3):
      tap = jnp.einsum('ghwc,gcd->ghwd', xp[:, dy:dy + hgt, dx:dx + wid], kernel[:, dy, dx],
                       preferred_element_type=jnp.float32)
      out = tap if out is None else out + tap
  return out.astype(jnp.result_type(x, kernel))


def _stem_features_xla(x, mask, k1, b1, k2, b2, conv=None) -> jax.Array:
  """(G, H, W, C2) stem features from `conv` (default `conv3x3_im2col`) and element-wise
  passes."""
  conv = conv or conv3x3_im2col
  # The barrier materialises h once: on an H200 XLA fused the first layer's bias + erf
  # GELU into the second layer's im2col column write and recomputed it for each of the
  # 9 taps (30.5 ms per step in the EMA target's forward, against 17.9 ms for the same
  # write from a stored h in the online forward; docs/performance.md, session 5).
  h = jax.lax.optimization_barrier(activations.gelu(conv(x, k1) + b1[:, None, None, :]))
  f = activations.gelu(conv(h, k2) + b2[:, None, None, :])
  return f * mask[..., None].astype(h.dtype)


def conv_stem_im2col(x, mask, k1, b1, k2, b2, stride: int, conv=None) -> jax.Array:
  """`conv_stem` from `conv3x3_im2col` (or `conv`) and element-wise passes."""
  return patchify(_stem_features_xla(x, mask, k1, b1, k2, b2, conv), stride)


def stem_tokens_im2col(x, mask, k1, b1, k2, b2, kernel, stride: int, conv=None) -> jax.Array:
  """`stem_tokens` from `_stem_features_xla` and the patch embedding, as `embedding`
  selects: patchify + one matmul ('matmul'), or one stride-s convolution ('conv', no
  patchified copy of the features; 3x slower on an H200, docs/performance.md)."""
  f = _stem_features_xla(x, mask, k1, b1, k2, b2, conv)
  if _selected['embedding'] == 'conv':
    c2, d = f.shape[-1], kernel.shape[-1]
    return jax.lax.conv_general_dilated(f, kernel.reshape(stride, stride, c2, d),
                                        (stride, stride), 'VALID', dimension_numbers=_DN)
  return jnp.einsum('ghwk,kd->ghwd', patchify(f, stride), kernel)


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


# Inputs of at most this many channels (the stems' first layer: 2) take `_conv_one_cols`
# in the loop. Eigen's convolution runs such a layer at ~16-30 GFLOP/s: one sample's
# 2 -> 32 layer 0.86 ms against 0.45 ms as im2col + one matmul (K = 9 Ci), and the
# train step at torch_ref (96 such calls per step) 2.134 -> 2.071 s and 2.240 ->
# 2.156 s (interleaved in one process, 24 and 16 steps each). With 8 input channels
# or more Eigen's convolution is the faster one (1.1 vs 1.5 ms at Ci = 8, 32 outputs).
_COLS_MAX_CI = 4


def _conv_one_cols(x, kernel):  # (H, W, Ci), (3, 3, Ci, Co) -> (H, W, Co)
  """`_conv_one_raw` as im2col + one matmul (`conv3x3_im2col` of a batch of one; XLA
  drops the unit batch axis): for inputs of very few channels, whose (H W, 9 Ci)
  columns are small."""
  return conv3x3_im2col(x[None], kernel[None])[0]


def _z1(x, k1, b1):
  conv = _conv_one_cols if x.shape[-1] <= _COLS_MAX_CI else _conv_one_raw
  return conv(x, k1) + b1[None, None, :]  # (H, W, C1)


def _stem_fwd_one(x, mask, k1, b1, k2, b2):
  """One sample's stem features (H, W, C2) and the residual the backward needs (z2).

  z1 = conv1(x) is not saved: the backward recomputes it (2 input channels, ~3% of
  the stem's FLOPs), which saves a (G, H, W, C1) buffer written and read per step.
  """
  z2 = _conv_one_raw(activations.gelu(_z1(x, k1, b1)), k2) + b2[None, None, :]  # (H, W, C2)
  return activations.gelu(z2) * mask[..., None].astype(z2.dtype), z2


def _stem_one(x, mask, k1, b1, k2, b2):
  return _stem_fwd_one(x, mask, k1, b1, k2, b2)[0]


def _stem_bwd_one(x, mask, k1, b1, k2, b2, z2, df):
  """Gradients of one sample's stem w.r.t. (x, mask, k1, b1, k2, b2), and its features."""
  del b2
  m = mask[..., None].astype(df.dtype)
  a2, d2 = activations.gelu_and_grad(z2)
  g2 = d2 * (df * m)  # d z2, (H, W, C2)
  dmask = jnp.sum(df * a2, axis=-1).astype(mask.dtype)
  h1, d1 = activations.gelu_and_grad(_z1(x, k1, b1))
  dh1, dk2 = _conv_one_bwd(h1, k2, g2)
  g1 = d1 * dh1  # d z1, (H, W, C1)
  dx, dk1 = _conv_one_bwd(x, k1, g1)
  grads = (dx, dmask, dk1, jnp.sum(g1, axis=(0, 1)), dk2, jnp.sum(g2, axis=(0, 1)))
  return grads, a2 * m


# -- loops over the samples, partitioned along the batch --------------------------------

def _ranks(types) -> list[int]:
  return [len(mlir.ir.RankedTensorType(t).shape) for t in types]


def _batch_rule(n_batched, mesh, operand_types, result_types):
  """Shardy rule: axis 0 of the first `n_batched` operands and of every result is one
  shared factor 'b'; every other axis (and every axis of the rest) is its own factor."""
  del mesh
  def side(prefix, ranks, batched):
    return ', '.join(' '.join((['b'] if i < batched else [f'{prefix}{i}_0'])
                              + [f'{prefix}{i}_{d}' for d in range(1, r)])
                     for i, r in enumerate(ranks))
  ranks = _ranks(result_types)
  return (f'{side("x", _ranks(operand_types), n_batched)} -> '
          f'{side("y", ranks, len(ranks))}')


def _batch_spec(sharding, ndim: int) -> P:
  """The spec that keeps only `sharding`'s split of axis 0 (the batch)."""
  spec = getattr(sharding, 'spec', None)
  first = spec[0] if spec is not None and len(spec) else None
  return P(first, *([None] * (ndim - 1)))


def _batch_parallel(fn, n_batched=None):
  """`fn` (a loop over axis 0) partitioned so that each device loops over its samples.

  The first `n_batched` arguments (default: all) are split along axis 0 like the first
  one; the others (shared weights) are replicated. Every result is split along axis 0.
  """
  wrapped = custom_partitioning(fn)

  def infer(mesh, arg_shapes, result_shape):
    first = arg_shapes[0].sharding
    return jax.tree.map(lambda r: NamedSharding(mesh, _batch_spec(first, len(r.shape))),
                        result_shape)

  def partition(mesh, arg_shapes, result_shape):
    first = arg_shapes[0].sharding
    sh = lambda a: NamedSharding(mesh, _batch_spec(first, len(a.shape)))
    n = len(arg_shapes) if n_batched is None else n_batched
    args = tuple(sh(a) if i < n else NamedSharding(mesh, P()) for i, a in enumerate(arg_shapes))
    return mesh, fn, jax.tree.map(sh, result_shape), args

  wrapped.def_partition(
      partition=partition, infer_sharding_from_operands=infer,
      sharding_rule=lambda mesh, ops, res: _batch_rule(
          len(ops) if n_batched is None else n_batched, mesh, ops, res))
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
_loop_stem_features = _per_sample(
    _stem_one, lambda *a: (lambda f, z2: (f, (z2,)))(*_stem_fwd_one(*a)),
    lambda *a: _stem_bwd_one(*a)[0])


# -- the stem and its patch embedding, a chunk of samples per iteration ------------------

def _chunked(a, c):  # (G, ...) -> (G/c, c, ...)
  return a.reshape(a.shape[0] // c, c, *a.shape[1:])


def _unchunked(a):  # (G/c, c, ...) -> (G, ...)
  return a.reshape(a.shape[0] * a.shape[1], *a.shape[2:])


def _chunk_size(g: int) -> int:
  return max(c for c in range(1, min(g, _CHUNK) + 1) if g % c == 0)


def _unpatchify(p, stride):  # (h, w, s*s*C) -> (h*s, w*s, C), the inverse of `patchify`
  h, w, k = p.shape
  c = k // (stride * stride)
  return p.reshape(h, w, stride, stride, c).transpose(0, 2, 1, 3, 4).reshape(
      h * stride, w * stride, c)


def _embed_by_rows(f, kernel, stride):
  """patchify(f) @ kernel without patchifying: (c, H, W, C2) -> (c, H/s, W/s, D).

  Within one row dy of a patch, its (dx, C2) pixels are contiguous in f, so the
  embedding is a sum over dy of s matmuls of those runs with the kernel's dy-th block.
  The patchify transpose it avoids was fused with the GELU and mask into a slow
  transposing loop on XLA:CPU: 8 samples' GELU + embedding 45.4 -> 36.4 ms.
  """
  c, hgt, wid, ch = f.shape
  h, w = hgt // stride, wid // stride
  rows = f.reshape(c, h, stride, w, stride * ch)
  k = kernel.reshape(stride, stride * ch, kernel.shape[-1])
  out = jnp.einsum('cijk,kd->cijd', rows[:, :, 0], k[0])
  for dy in range(1, stride):
    out = out + jnp.einsum('cijk,kd->cijd', rows[:, :, dy], k[dy])
  return out


def _stack_in_place(parts):
  """jnp.stack(parts) as in-place updates of one buffer.

  XLA:CPU fuses a stack (concatenate) with the element-wise producers of its operands
  (the GELU and mask of each sample) into one loop that picks the operand per element,
  unvectorised: 78 ms per forward for a chunk loop's features at torch_ref. Each
  update of a buffer is its own in-place fusion instead. Train step at torch_ref,
  interleaved in one process: 2.118 -> 2.038 s and 2.181 -> 2.112 s (forward and
  backward loops; the forward's alone measured neutral).
  """
  buf = jnp.zeros((len(parts),) + parts[0].shape, parts[0].dtype)
  for i, p in enumerate(parts):
    buf = jax.lax.dynamic_update_index_in_dim(buf, p, i, 0)
  return buf


def _tokens_loop(stride, with_residual, x, mask, k1, b1, k2, b2, kernel):
  """Tokens (G, h, w, D) [and z2 (G, H, W, C2)] of this device's samples."""
  c = _chunk_size(x.shape[0])

  def body(t):  # one chunk: (c, ...) arrays
    outs = [_stem_fwd_one(*(a[i] for a in t)) for i in range(c)]
    tokens = _embed_by_rows(_stack_in_place([f for f, _ in outs]), kernel, stride)
    return (tokens, _stack_in_place([z2 for _, z2 in outs])) if with_residual else tokens

  out = jax.lax.map(body, tuple(_chunked(a, c) for a in (x, mask, k1, b1, k2, b2)))
  return jax.tree.map(_unchunked, out)


def _tokens_bwd_loop(stride, x, mask, k1, b1, k2, b2, z2, ct, kernel):
  """Per-sample gradients and patchified features (G, h, w, s*s*C2) for the kernel's."""
  c = _chunk_size(x.shape[0])

  def body(t):
    *args, ct_c = t
    dpatches = jnp.einsum('chwd,kd->chwk', ct_c, kernel)  # (c, h, w, s*s*C2)
    outs = [_stem_bwd_one(*(a[i] for a in args), _unpatchify(dpatches[i], stride))
            for i in range(c)]
    grads = tuple(_stack_in_place([g[j] for g, _ in outs]) for j in range(6))
    return grads, _stack_in_place([patchify(f, stride) for _, f in outs])

  out = jax.lax.map(body, tuple(_chunked(a, c) for a in (x, mask, k1, b1, k2, b2, z2, ct)))
  return jax.tree.map(_unchunked, out)


@functools.cache
def _loop_tokens_fn(stride):
  primal = _batch_parallel(functools.partial(_tokens_loop, stride, False), n_batched=6)
  forward = _batch_parallel(functools.partial(_tokens_loop, stride, True), n_batched=6)
  backward = _batch_parallel(functools.partial(_tokens_bwd_loop, stride), n_batched=8)

  @jax.custom_vjp
  def tokens(*args):
    return primal(*args)

  def fwd(*args):
    out, z2 = forward(*args)
    return out, (args, z2)

  def bwd(saved, ct):
    (x, mask, k1, b1, k2, b2, kernel), z2 = saved
    grads, patches = backward(x, mask, k1, b1, k2, b2, z2, ct, kernel)
    # dkernel = patches^T ct summed over samples and tokens, computed as (ct^T patches)^T:
    # XLA:CPU runs the (D, N) x (N, K) form in its fast matmul library and the
    # transposed-operand form ((N, K)^T x (N, D)) in a ~2x slower generic dot. The
    # barriers keep XLA from folding the transposes back into the dot.
    d = ct.shape[-1]
    ct_t = jax.lax.optimization_barrier(ct.reshape(-1, d).T)  # (D, N)
    dkernel = jax.lax.optimization_barrier(ct_t @ patches.reshape(ct_t.shape[1], -1)).T
    return (*grads, dkernel.astype(kernel.dtype))

  tokens.defvjp(fwd, bwd)
  return tokens


def _loop_tokens(x, mask, k1, b1, k2, b2, kernel, stride):
  return _loop_tokens_fn(stride)(x, mask, k1, b1, k2, b2, kernel)


# -- Pallas (Triton) kernels on GPUs -------------------------------------------------------

_pallas_forward = _batch_parallel(pallas_conv.conv3x3)
_pallas_input_grad = _batch_parallel(pallas_conv.input_grad)
_pallas_kernel_grad = _batch_parallel(pallas_conv.kernel_grad)


@jax.custom_vjp
def _pallas_conv3x3(x, kernel):
  return _pallas_forward(x, kernel)


def _pallas_conv3x3_fwd(x, kernel):
  return _pallas_forward(x, kernel), (x, kernel)


def _pallas_conv3x3_bwd(saved, dz):
  x, kernel = saved
  # The kernels compute in x's dtype (pallas_conv casts the kernel and dz to it); the
  # input gradient comes out in dz's, so dz is cast first.
  dz = dz.astype(x.dtype)
  return _pallas_input_grad(kernel, dz), _pallas_kernel_grad(x, dz).astype(kernel.dtype)


_pallas_conv3x3.defvjp(_pallas_conv3x3_fwd, _pallas_conv3x3_bwd)


def conv3x3_pallas(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """`conv3x3` by the Pallas kernels of models/pallas_conv.py (no column buffer; forward,
  input gradient and kernel gradient each one kernel, batch-partitioned like the loops).
  Shapes the kernels do not take (the stems' first layer, Ci = 2) take im2col."""
  if not pallas_conv.supported(x.shape, kernel.shape[-1]):
    return conv3x3_im2col(x, kernel)
  return _pallas_conv3x3(x, kernel).astype(jnp.result_type(x, kernel))


_XLA_CONVS = {'im2col': conv3x3_im2col, 'grouped': conv3x3_grouped, 'shift': conv3x3_shift,
              'pallas': conv3x3_pallas}
