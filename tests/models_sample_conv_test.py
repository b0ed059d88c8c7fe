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


def _tokens_inputs(g, seed):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)
  mask = jnp.asarray(r.random((g, H, W)) > 0.2, jnp.float32)
  return (f(g, H, W, CI), mask, 0.3 * f(g, 3, 3, CI, C1), f(g, C1), 0.3 * f(g, 3, 3, C1, C2),
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
# 'conv': the XLA forms' patch embedding as a stride-S convolution.
@pytest.mark.parametrize('impl,g,embed', [('loop', 4, 'matmul'), ('loop', 5, 'matmul'),
                                          ('im2col', 4, 'matmul'), ('grouped', 4, 'matmul'),
                                          ('shift', 4, 'matmul'), ('im2col', 4, 'conv')])
def test_stem_tokens_match_reference_values_and_all_gradients(impl, g, embed):
  args = _tokens_inputs(g, 6)
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
