"""ViT trunk: position embeddings for any grid, attention, CLS, bf16, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaisp_jax.models import vit

KEY = jax.random.key(0, impl='rbg')


def test_sincos_embedding_any_grid():
  for h, w in ((4, 4), (3, 7)):
    pe = vit.sincos_2d(h, w, 32)
    assert pe.shape == (h * w, 32)
    # Every position is distinct, and the (0, 0) token is sin(0)=0, cos(0)=1.
    assert len({tuple(np.round(r, 6)) for r in pe}) == h * w
    np.testing.assert_allclose(pe[0], np.r_[np.zeros(8), np.ones(8), np.zeros(8), np.ones(8)])
  # Row-major order: token k is at (k // w, k % w); the y channels depend on the row only.
  pe = vit.sincos_2d(3, 7, 32)
  np.testing.assert_allclose(pe[7 + 2, :16], pe[7 + 5, :16])
  np.testing.assert_allclose(pe[2, 16:], pe[7 + 2, 16:])


@pytest.mark.parametrize('pos_embed', ['sincos', 'learned'])
def test_trunk_runs_on_two_grid_sizes_with_the_same_params(pos_embed):
  model = vit.ViT(depth=1, num_heads=2, pos_embed=pos_embed, learned_pos_grid=4)
  variables = jax.jit(model.init)(KEY, jnp.zeros((2, 4, 4, 16)))
  x = jax.random.normal(jax.random.key(1), (2, 6, 5, 16))
  apply = jax.jit(model.apply)
  out = apply(variables, x)
  assert out['tokens'].shape == (2, 30, 16) and out['global'].shape == (2, 16)
  np.testing.assert_allclose(out['global'], out['tokens'].mean(1), rtol=1e-5, atol=1e-6)
  out4 = apply(variables, x[:, :4, :4])
  assert out4['tokens'].shape == (2, 16, 16)
  # Position matters: the same content at two positions gets different tokens.
  flat = jnp.broadcast_to(x[:, :1, :1], x.shape)
  t = apply(variables, flat)['tokens']
  assert float(jnp.abs(t[:, 0] - t[:, -1]).max()) > 1e-3


def test_self_attention_matches_a_plain_softmax_implementation():
  model = vit.SelfAttention(num_heads=4)
  x = jax.random.normal(jax.random.key(2), (2, 9, 32))
  variables = model.init(KEY, x)
  p = variables['params']
  qkv = np.asarray(x) @ np.asarray(p['qkv']['kernel']) + np.asarray(p['qkv']['bias'])
  q, k, v = np.split(qkv.reshape(2, 9, 3, 4, 8), 3, axis=2)
  q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(8)
  attn = np.exp(logits - logits.max(-1, keepdims=True))
  attn /= attn.sum(-1, keepdims=True)
  y = np.einsum('bhqk,bkhd->bqhd', attn, v).reshape(2, 9, 32)
  want = y @ np.asarray(p['proj']['kernel']) + np.asarray(p['proj']['bias'])
  np.testing.assert_allclose(model.apply(variables, x), want, rtol=1e-4, atol=1e-5)


def test_cls_token_gives_the_global_embedding():
  model = vit.ViT(depth=1, num_heads=2, cls_token=True)
  x = jax.random.normal(jax.random.key(3), (3, 2, 2, 16))
  variables = jax.jit(model.init)(KEY, x)
  out = jax.jit(model.apply)(variables, x)
  assert variables['params']['cls'].shape == (1, 1, 16)
  assert out['tokens'].shape == (3, 4, 16) and out['global'].shape == (3, 16)
  assert float(jnp.abs(out['global'] - out['tokens'].mean(1)).max()) > 1e-3


def test_bfloat16_compute_keeps_float32_params_and_runs_matmuls_in_bfloat16():
  model = vit.ViT(depth=2, num_heads=2, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(4), (2, 4, 4, 16))
  variables = jax.jit(model.init)(KEY, x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  out = jax.jit(model.apply)(variables, x)
  assert out['tokens'].dtype == jnp.float32 and bool(jnp.isfinite(out['tokens']).all())
  jaxpr = str(jax.make_jaxpr(model.apply)(variables, x))
  assert 'dot_general' in jaxpr and 'preferred_element_type=bfloat16' in jaxpr
  # Close to the float32 result (bf16 has ~3 significant digits).
  ref = jax.jit(vit.ViT(depth=2, num_heads=2).apply)(variables, x)
  np.testing.assert_allclose(out['tokens'], ref['tokens'], atol=0.1)


def test_remat_gives_the_same_values_and_gradients():
  x = jax.random.normal(jax.random.key(5), (2, 2, 2, 16))
  plain = vit.ViT(depth=2, num_heads=2)
  remat = vit.ViT(depth=2, num_heads=2, remat=True)
  variables = jax.jit(plain.init)(KEY, x)
  loss = lambda m: jax.jit(jax.grad(lambda v: jnp.sum(m.apply(v, x)['tokens'] ** 2)))(variables)
  g1, g2 = loss(plain), loss(remat)
  assert jax.tree.structure(g1) == jax.tree.structure(g2)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert all(float(jnp.abs(a).max()) > 0 for a in jax.tree.leaves(g1))


def test_attention_auto_takes_xla_off_gpu_and_rejects_unknown_names():
  # 'auto' asks for cuDNN's fused kernel only on a GPU backend in bf16/f16 with a
  # head dim it supports; on this CPU backend every case resolves to XLA's.
  assert jax.default_backend() == 'cpu'
  for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
    assert vit.attention_implementation('auto', dtype, 64) == 'xla'
  assert vit.attention_implementation('cudnn', jnp.bfloat16, 64) == 'cudnn'
  with pytest.raises(ValueError, match='flash'):
    vit.attention_implementation('flash', jnp.bfloat16, 64)
  # The explicit XLA path computes the same softmax attention as 'auto' here.
  q, k, v = jax.random.normal(jax.random.key(3), (3, 2, 5, 2, 8))
  np.testing.assert_allclose(vit.attention(q, k, v, 'xla'), vit.attention(q, k, v),
                             rtol=1e-6, atol=1e-6)
  scores = jnp.einsum('bthd,bshd->bhts', q, k) / np.sqrt(8)
  ref = jnp.einsum('bhts,bshd->bthd', jax.nn.softmax(scores, axis=-1), v)
  np.testing.assert_allclose(vit.attention(q, k, v, 'xla'), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('t', [5, 65])
def test_padded_attention_is_the_same_function_values_and_gradients(t):
  # 'cudnn_padded' pads the sequences (65 -> 128) and masks the padded keys: checked
  # here with XLA's implementation of the same masked call (cuDNN needs a GPU).
  q, k, v, ct = jax.random.normal(jax.random.key(t), (4, 2, t, 3, 8))
  loss = lambda f: (lambda q, k, v: jnp.sum(f(q, k, v) * ct))
  padded = lambda q, k, v: vit.padded_attention(q, k, v, 'xla')
  out = padded(q, k, v)
  assert out.shape == q.shape
  np.testing.assert_allclose(out, vit.attention(q, k, v, 'xla'), rtol=1e-5, atol=1e-5)
  got = jax.grad(loss(padded), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(lambda *a: vit.attention(*a, 'xla')), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip('qkv', got, want):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
  assert vit.attention_implementation('cudnn_padded', jnp.bfloat16, 64) == 'cudnn_padded'


def test_trunk_gelu_tanh_is_the_approximation_and_unknown_forms_are_refused():
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
  exact = vit.ViT(depth=1, num_heads=4)
  tanh = vit.ViT(depth=1, num_heads=4, gelu='tanh')
  params = exact.init(jax.random.key(1), x)  # the GELU form adds no parameters
  assert jax.tree.structure(params) == jax.tree.structure(tanh.init(jax.random.key(1), x))
  a = exact.apply(params, x)['tokens']
  b = tanh.apply(params, x)['tokens']
  diff = float(jnp.max(jnp.abs(a - b)))
  assert 0 < diff < 1e-2  # a different function, within the approximation's error
  z = jnp.linspace(-5, 5, 101)
  from jaisp_jax.models import activations
  np.testing.assert_allclose(activations.gelu_form('tanh')(z),
                             jax.nn.gelu(z, approximate=True), rtol=1e-6)
  assert float(jnp.max(jnp.abs(activations.gelu_form('tanh')(z) - activations.gelu(z)))) < 1e-3
  with pytest.raises(ValueError, match='GELU form'):
    vit.ViT(depth=1, num_heads=4, gelu='relu').init(jax.random.key(1), x)
