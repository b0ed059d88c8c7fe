"""Per-sample stem convolutions: the CPU loop (custom VJP, batch-partitioned) and the
im2col form compute the same function and gradients as a plain per-sample lax.conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaisp_jax.models import sample_conv

G, H, W, CI, C1, C2, S = 4, 16, 16, 2, 3, 5, 8


def _inputs(seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  mask = jnp.asarray(r.random((G, H, W)) > 0.2, jnp.float32)
  return (f(G, H, W, CI), mask, 0.3 * f(G, 3, 3, CI, C1), f(G, C1), 0.3 * f(G, 3, 3, C1, C2),
          f(G, C2))


def _reference_conv(x, k):  # independent: vmap of one-sample lax.conv
  one = lambda xi, ki: jax.lax.conv_general_dilated(
      xi[None], ki, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision=jax.lax.Precision.HIGHEST)[0]
  return jax.vmap(one)(x, k)


def _reference_stem(x, mask, k1, b1, k2, b2):
  gelu = lambda z: jax.nn.gelu(z, approximate=False)
  h = gelu(_reference_conv(x, k1) + b1[:, None, None])
  f = gelu(_reference_conv(h, k2) + b2[:, None, None]) * mask[..., None]
  return sample_conv.patchify(f, S)


def _stem(impl):
  def f(*args):
    with sample_conv.implementation(impl):
      return sample_conv.conv_stem(*args, S)
  return f


@pytest.mark.parametrize('impl', ['loop', 'im2col', 'grouped', 'shift', 'auto'])
def test_conv3x3_matches_per_sample_lax_conv_values_and_gradients(impl):
  x, _, k, *_ = _inputs()
  with sample_conv.implementation(impl):
    ours = jax.jit(sample_conv.conv3x3)
    y = ours(x, k)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(sample_conv.conv3x3(a, b) * ct), (0, 1)))(x, k)
  want = _reference_conv(x, k)
  gw = jax.grad(lambda a, b: jnp.sum(_reference_conv(a, b) * ct), (0, 1))(x, k)
  np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4)
  for got, ref in zip(g, gw):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # Each sample really used its own kernel: swapping two kernels changes two outputs.
  k_swapped = k.at[0].set(k[1]).at[1].set(k[0])
  with sample_conv.implementation(impl):
    y2 = jax.jit(sample_conv.conv3x3)(x, k_swapped)
  assert float(jnp.abs(y2[0] - y[0]).max()) > 1e-2
  np.testing.assert_allclose(y2[2:], y[2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('impl', ['loop', 'im2col', 'grouped', 'shift'])
def test_conv_stem_matches_reference_values_and_all_gradients(impl):
  args = _inputs(2)
  out = jax.jit(_stem(impl))(*args)
  assert out.shape == (G, H // S, W // S, S * S * C2)
  np.testing.assert_allclose(out, _reference_stem(*args), rtol=1e-4, atol=1e-4)
  ct = jnp.asarray(np.random.default_rng(3).normal(size=out.shape), jnp.float32)
  loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * ct))
  got = jax.jit(jax.grad(loss(_stem(impl)), argnums=tuple(range(6))))(*args)
  want = jax.grad(loss(_reference_stem), argnums=tuple(range(6)))(*args)
  for name, a, b in zip(['x', 'mask', 'k1', 'b1', 'k2', 'b2'], got, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
    assert float(jnp.abs(b).max()) > 0, name  # the gradient is not trivially zero


def test_loop_stem_sharded_over_the_batch_matches_one_device():
  n = 4
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('data',))
  args = _inputs(4)
  sh = lambda a: jax.device_put(a, NamedSharding(mesh, P('data', *([None] * (a.ndim - 1)))))
  sharded = [sh(a) for a in args]
  ct = jnp.asarray(np.random.default_rng(5).normal(size=(G, H // S, W // S, S * S * C2)))
  f = lambda *a: jnp.sum(_stem('loop')(*a) * ct)
  val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 2)))(*sharded)
  val1, grads1 = jax.jit(jax.value_and_grad(f, argnums=(0, 2)))(*args)
  np.testing.assert_allclose(val, val1, rtol=1e-5)
  for a, b in zip(grads, grads1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # The output stays sharded along the batch (each device looped over its own samples).
  out = jax.jit(_stem('loop'))(*sharded)
  assert out.sharding.spec[0] == 'data'


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match='im2col'):
    with sample_conv.implementation('winograd'):
      pass
  with pytest.raises(ValueError, match='patch-embedding'):
    with sample_conv.embedding('fft'):
      pass


D = 6


def _tokens_inputs(g, seed, ci=CI):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  mask = jnp.asarray(r.random((g, H, W)) > 0.2, jnp.float32)
  return (f(g, H, W, ci), mask, 0.3 * f(g, 3, 3, ci, C1), f(g, C1), 0.3 * f(g, 3, 3, C1, C2),
          f(g, C2), 0.2 * f(S * S * C2, D))


def _reference_tokens(x, mask, k1, b1, k2, b2, kernel):
  return jnp.einsum('ghwk,kd->ghwd', _reference_stem(x, mask, k1, b1, k2, b2), kernel,
                    precision=jax.lax.Precision.HIGHEST)


def _tokens(impl, embed='matmul'):
  def f(*args):
    with sample_conv.implementation(impl), sample_conv.embedding(embed):
      return sample_conv.stem_tokens(*args, S)
  return f


# g = 5: the loop's chunks of samples fall back to one sample per chunk (5 is prime).
# 'conv': the XLA forms' patch embedding as a stride-S convolution. ci = 6: the loop's
# first layer as a native convolution (at most 4 input channels take im2col + matmul).
@pytest.mark.parametrize('impl,g,embed,ci', [
    ('loop', 4, 'matmul', CI), ('loop', 5, 'matmul', CI), ('loop', 4, 'matmul', 6),
    ('im2col', 4, 'matmul', CI), ('grouped', 4, 'matmul', CI), ('shift', 4, 'matmul', CI),
    ('im2col', 4, 'conv', CI)])
def test_stem_tokens_match_reference_values_and_all_gradients(impl, g, embed, ci):
  args = _tokens_inputs(g, 6, ci)
  out = jax.jit(_tokens(impl, embed))(*args)
  assert out.shape == (g, H // S, W // S, D)
  np.testing.assert_allclose(out, _reference_tokens(*args), rtol=1e-4, atol=1e-4)
  ct = jnp.asarray(np.random.default_rng(7).normal(size=out.shape), jnp.float32)
  loss = lambda fn: (lambda *a: jnp.sum(fn(*a) * ct))
  got = jax.jit(jax.grad(loss(_tokens(impl, embed)), argnums=tuple(range(7))))(*args)
  want = jax.grad(loss(_reference_tokens), argnums=tuple(range(7)))(*args)
  for name, a, b in zip(['x', 'mask', 'k1', 'b1', 'k2', 'b2', 'kernel'], got, want):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
    assert float(jnp.abs(b).max()) > 0, name


def test_loop_stem_tokens_sharded_over_the_batch_match_one_device():
  n = 4
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('data',))
  args = _tokens_inputs(2 * n, 8)  # two samples per device: one chunk each
  batch = lambda a: jax.device_put(a, NamedSharding(mesh, P('data', *([None] * (a.ndim - 1)))))
  sharded = [batch(a) for a in args[:6]] + [jax.device_put(args[6], NamedSharding(mesh, P()))]
  ct = jnp.asarray(np.random.default_rng(9).normal(size=(2 * n, H // S, W // S, D)), jnp.float32)
  f = lambda *a: jnp.sum(_tokens('loop')(*a) * ct)
  val, grads = jax.jit(jax.value_and_grad(f, argnums=(4, 6)))(*sharded)
  val1, grads1 = jax.jit(jax.value_and_grad(f, argnums=(4, 6)))(*args)
  np.testing.assert_allclose(val, val1, rtol=1e-5)
  for a, b in zip(grads, grads1):  # k2 (per sample) and the shared kernel (summed)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  out = jax.jit(_tokens('loop'))(*sharded)
  assert out.sharding.spec[0] == 'data'


def _pallas_inputs(g=2, hgt=8, wid=16, ci=16, co=32, dtype=jnp.float32, seed=11):
  r = np.random.default_rng(seed)
  x = jnp.asarray(r.normal(size=(g, hgt, wid, ci)), dtype)
  k = jnp.asarray(0.2 * r.normal(size=(g, 3, 3, ci, co)), dtype)
  return x, k


@pytest.mark.parametrize('shape', [(2, 8, 16, 16, 32), (3, 4, 512, 16, 16)])
def test_pallas_form_runs_its_kernels_and_matches_the_reference(shape):
  # Interpret mode on the CPU: the same kernels the GPU compiles with Triton. Shapes with
  # one tile of 8 x 16 px and two 256-px tiles per row (W = 512).
  x, k = _pallas_inputs(*shape)
  with sample_conv.implementation('pallas'):
    fn = jax.jit(sample_conv.conv3x3)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda a, b: sample_conv.conv3x3(a, b).sum(),
                                        (0, 1)))(x, k))
    y = fn(x, k)
    ct = jnp.asarray(np.random.default_rng(1).normal(size=y.shape), jnp.float32)
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(sample_conv.conv3x3(a, b) * ct), (0, 1)))(x, k)
  # forward, input gradient and kernel gradient are each a Pallas kernel
  assert jaxpr.count('pallas_call') >= 3
  assert 'sample_conv3x3_kernel_grad' in jaxpr
  np.testing.assert_allclose(y, _reference_conv(x, k), rtol=1e-4, atol=1e-4)
  gw = jax.grad(lambda a, b: jnp.sum(_reference_conv(a, b) * ct), (0, 1))(x, k)
  for name, got, ref in zip(('x', 'kernel'), g, gw):
    np.testing.assert_allclose(got, ref, rtol=2e-4, atol=2e-3, err_msg=name)
    assert float(jnp.abs(ref).max()) > 1.0, name


def test_pallas_form_in_bfloat16_stays_within_bfloat16_rounding():
  x, k = _pallas_inputs(dtype=jnp.bfloat16)
  with sample_conv.implementation('pallas'):
    y = jax.jit(sample_conv.conv3x3)(x, k)
  assert y.dtype == jnp.bfloat16
  want = _reference_conv(x.astype(jnp.float32), k.astype(jnp.float32))
  rel = float(jnp.linalg.norm(y.astype(jnp.float32) - want) / jnp.linalg.norm(want))
  assert rel < 1e-2


def test_pallas_form_falls_back_to_im2col_for_shapes_its_kernels_do_not_take():
  from jaisp_jax.models import pallas_conv
  assert pallas_conv.supported((4, 256, 256, 32), 64) and pallas_conv.supported((4, 128, 128, 32), 64)
  assert not pallas_conv.supported((4, 128, 128, 2), 32)   # the stems' first layer
  assert not pallas_conv.supported((4, 128, 96, 32), 64)   # 96 px: no power-of-two tile
  assert not pallas_conv.supported((4, 128, 128, 24), 64)  # 24 channels
  with pytest.raises(ValueError, match='unsupported'):
    pallas_conv.conv3x3(jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 3, 3, 2, 16)))
  x, _, k, *_ = _inputs()  # Ci = 2
  with sample_conv.implementation('pallas'):
    assert 'pallas_call' not in str(jax.make_jaxpr(sample_conv.conv3x3)(x, k))
    np.testing.assert_allclose(jax.jit(sample_conv.conv3x3)(x, k), _reference_conv(x, k),
                               rtol=1e-4, atol=1e-4)


def test_pallas_stem_tokens_match_the_im2col_form_values_and_gradients():
  # The whole stem + patch embedding with a 16-channel first layer, so that the second
  # layer runs the kernels (the first, 2 input channels, takes im2col).
  r = np.random.default_rng(5)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  c1, c2, d = 16, 16, 8
  args = (f(2, H, W, CI), jnp.asarray(r.random((2, H, W)) > 0.2, jnp.float32),
          0.3 * f(2, 3, 3, CI, c1), f(2, c1), 0.2 * f(2, 3, 3, c1, c2), f(2, c2),
          0.05 * f(S * S * c2, d))
  loss = lambda impl: (lambda *a: jnp.sum(jnp.sin(_tokens(impl)(*a))))
  got = jax.jit(jax.value_and_grad(loss('pallas'), argnums=tuple(range(7))))(*args)
  want = jax.jit(jax.value_and_grad(loss('im2col'), argnums=tuple(range(7))))(*args)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-4)
  for name, a, b in zip(['x', 'mask', 'k1', 'b1', 'k2', 'b2', 'kernel'], got[1], want[1]):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
    assert float(jnp.abs(b).max()) > 0, name


def test_pallas_conv_sharded_over_the_batch_matches_one_device():
  n = 4
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:n]), ('data',))
  x, k = _pallas_inputs(g=4)
  sh = lambda a: jax.device_put(a, NamedSharding(mesh, P('data', *([None] * (a.ndim - 1)))))
  ct = jnp.asarray(np.random.default_rng(6).normal(size=x.shape[:3] + (k.shape[-1],)),
                   jnp.float32)
  def f(a, b):
    with sample_conv.implementation('pallas'):
      return jnp.sum(sample_conv.conv3x3(a, b) * ct)
  val, grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(sh(x), sh(k))
  val1, grads1 = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(x, k)
  np.testing.assert_allclose(val, val1, rtol=1e-5)
  for a, b in zip(grads, grads1):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  with sample_conv.implementation('pallas'):
    out = jax.jit(sample_conv.conv3x3)(sh(x), sh(k))
  assert out.sharding.spec[0] == 'data'


def _lowered_text(impl, platform, x, k):
  def f(a, b):
    with sample_conv.implementation(impl):
      return jax.value_and_grad(
          lambda a, b: jnp.sum(sample_conv.conv3x3(a, b).astype(jnp.float32)), (0, 1))(a, b)
  return jax.jit(f).trace(x, k).lower(lowering_platforms=(platform,)).as_text()


def test_auto_form_lowers_to_triton_kernels_for_cuda_and_to_plain_xla_on_cpu():
  # The choice is made per lowering platform, so a CPU host can lower for CUDA: the
  # forward, input-gradient and kernel-gradient kernels become Triton custom calls there
  # (the GPU default, docs/performance.md session 8); on CPU no Triton call is emitted.
  x, k = _pallas_inputs(dtype=jnp.bfloat16)
  cuda = _lowered_text('auto', 'cuda', x, k)
  assert cuda.count('__gpu$xla.gpu.triton') >= 3
  assert 'sample_conv3x3_kernel_grad' in cuda
  assert '__gpu$xla.gpu.triton' not in _lowered_text('auto', 'cpu', x, k)
  assert '__gpu$xla.gpu.triton' not in _lowered_text('pallas', 'cpu', x, k)
  # explicitly chosen forms keep their choice on every platform: im2col has no kernels
  assert '__gpu$xla.gpu.triton' not in _lowered_text('im2col', 'cuda', x, k)


@pytest.mark.parametrize('co_major', [False, True])
def test_pallas_kernel_grad_layouts_and_row_splits_agree_with_the_reference(monkeypatch, co_major):
  # Both accumulation layouts of `kernel_grad` (launch/tune_pallas.py picks between them),
  # with a split of the rows that does not divide them evenly at first (16 -> 4 here).
  from jaisp_jax.models import pallas_conv
  monkeypatch.setattr(pallas_conv, '_KGRAD_CO_MAJOR', co_major)
  monkeypatch.setattr(pallas_conv, '_SPLIT', 16)
  x, k = _pallas_inputs(g=2, hgt=4, wid=64, ci=16, co=32)
  dz = jnp.asarray(np.random.default_rng(2).normal(size=(2, 4, 64, 32)), jnp.float32)
  got = jax.jit(pallas_conv.kernel_grad)(x, dz)
  want = jax.grad(lambda b: jnp.sum(_reference_conv(x, b) * dz))(k)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-3)
  assert float(jnp.abs(want).max()) > 1.0


def _primitives_outside_pallas_calls(jaxpr):
  """Names of the primitives of `jaxpr` and its sub-jaxprs (jit, cond branches of
  `platform_dependent`), not descending into the pallas_calls' kernels."""
  from jaisp_jax.bench import flops  # pylint: disable=import-outside-toplevel
  names = []
  def walk(j):
    for eqn in j.eqns:
      names.append(eqn.primitive.name)
      if eqn.primitive.name != 'pallas_call':
        for sub in flops.sub_jaxprs(eqn.params):
          walk(sub)
  walk(jaxpr.jaxpr)
  return names


def test_pallas_kernels_read_the_unpadded_input_without_a_padding_pass():
  # The kernels read the unpadded input and zero the out-of-image taps themselves: no
  # pad op before the forward, input-gradient or kernel-gradient call, neither in the
  # program lowered for CUDA (Triton) nor around the interpreted calls.
  x, k = _pallas_inputs(dtype=jnp.bfloat16)
  cuda = _lowered_text('pallas', 'cuda', x, k)
  assert cuda.count('__gpu$xla.gpu.triton') >= 3
  assert 'stablehlo.pad' not in cuda
  from jaisp_jax.models import pallas_conv
  dz = jnp.zeros(x.shape[:3] + (k.shape[-1],), x.dtype)
  for fn, args in ((pallas_conv.conv3x3, (x, k)), (pallas_conv.input_grad, (k, dz)),
                   (pallas_conv.kernel_grad, (x, dz))):
    names = _primitives_outside_pallas_calls(jax.make_jaxpr(fn)(*args))
    assert 'pallas_call' in names and 'pad' not in names, (fn.__name__, names)


@pytest.mark.parametrize('shape', [(2, 32, 32, 16, 16), (2, 8, 512, 16, 32)])
@pytest.mark.parametrize('pad_free', [True, False])  # False: the padded form kept for A/B
def test_pallas_form_at_the_image_borders_matches_im2col(shape, pad_free, monkeypatch):
  from jaisp_jax.models import pallas_conv  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(pallas_conv, '_PAD_FREE', pad_free)
  # Inputs and output gradients nonzero only on the border rows and columns, so every
  # value depends on the taps that fall outside the image. Tiles: 4 of 8 full rows
  # (32 x 32), 8 x 2 of one row of 256 px (8 x 512): tiles at the top, bottom, left and
  # right of the image.
  g, hgt, wid, ci, co = shape
  x, k = _pallas_inputs(*shape)
  r = np.random.default_rng(12)
  border = np.zeros((1, hgt, wid, 1), np.float32)
  border[:, [0, -1], :] = border[:, :, [0, -1]] = 1
  x = x * border
  ct = jnp.asarray(r.normal(size=(g, hgt, wid, co)) * border, jnp.float32)
  ct = ct.at[1].set(jnp.asarray(r.normal(size=(hgt, wid, co)), jnp.float32))  # dense dz
  loss = lambda conv: (lambda a, b: jnp.sum(conv(a, b) * ct))
  def pallas_form(a, b):
    with sample_conv.implementation('pallas'):
      return sample_conv.conv3x3(a, b)
  assert str(jax.make_jaxpr(jax.grad(loss(pallas_form), (0, 1)))(x, k)).count(
      'pallas_call') >= 3
  y = jax.jit(pallas_form)(x, k)
  g_got = jax.jit(jax.grad(loss(pallas_form), (0, 1)))(x, k)
  want = jax.jit(sample_conv.conv3x3_im2col)(x, k)
  g_want = jax.jit(jax.grad(loss(sample_conv.conv3x3_im2col), (0, 1)))(x, k)
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
  for name, got, ref in zip(('x', 'kernel'), g_got, g_want):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4, err_msg=name)
    assert float(jnp.abs(ref).max()) > 1.0, name
  assert float(jnp.abs(want[:, 1:-1, 1:-1]).max()) > 0  # the taps reach inside, too
