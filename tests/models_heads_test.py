"""Heads: predictors, DETR decoder, pixel decoder, sub-pixel shift."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import scipy.ndimage

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import decoder, detr, predictor, shift

KEY = jax.random.key(0, impl='rbg')
REG = bands.default_registry()


def test_mlp_predictor_has_the_reference_size_and_transformer_predictor_mixes_tokens():
  cfg = ml_collections.ConfigDict(dict(kind='mlp', hidden=1024, dim=16, depth=1, num_heads=2))
  mlp = predictor.make_predictor(cfg, jnp.float32)
  shapes = jax.eval_shape(mlp.init, KEY, jnp.zeros((1, 4, 256)))
  # PyTorch reference: predictor D -> 1024 -> D at D = 256 has 525,568 parameters.
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 525568

  cfg.kind = 'transformer'
  tp = predictor.make_predictor(cfg, jnp.float32)
  x = jax.random.normal(jax.random.key(1), (2, 6, 32))
  variables = jax.jit(tp.init)(KEY, x)
  apply = jax.jit(tp.apply)
  y = apply(variables, x)
  assert y.shape == (2, 6, 32) and y.dtype == jnp.float32
  # Changing token 5 changes the prediction of token 0 (the MLP could not).
  y2 = apply(variables, x.at[:, 5].add(1.0))
  assert float(jnp.abs(y2[:, 0] - y[:, 0]).max()) > 1e-4
  cfg.kind = 'none'
  assert predictor.make_predictor(cfg, jnp.float32) is None


def test_detr_decoder_outputs_and_attention_maps():
  model = detr.DetrDecoder(num_queries=7, depth=2, num_heads=2)
  tokens = jax.random.normal(jax.random.key(2), (3, 12, 16))
  variables = jax.jit(model.init)(KEY, tokens)
  apply = jax.jit(model.apply)
  out = apply(variables, tokens)
  assert out['slots'].shape == (3, 7, 16)
  assert out['attn'].shape == (3, 7, 12)
  assert out['objectness'].shape == (3, 7)
  np.testing.assert_allclose(out['attn'].sum(-1), 1.0, rtol=1e-5)
  # Slots differ from each other (queries are not tied).
  assert float(jnp.abs(out['slots'][:, 0] - out['slots'][:, 1]).max()) > 1e-3
  # Cross-attention treats tokens as a set: permuting them permutes the maps only.
  perm = np.random.default_rng(0).permutation(12)
  outp = apply(variables, tokens[:, perm])
  np.testing.assert_allclose(outp['slots'], out['slots'], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(outp['attn'], out['attn'][:, :, perm], rtol=1e-4, atol=1e-6)


def test_pixel_decoder_returns_the_target_bands_native_resolution():
  for stride in (8, 16):  # Rubin and Euclid at 1.6" tokens
    model = decoder.PixelDecoder(stride=stride, channels=4)
    tokens = jax.random.normal(jax.random.key(3), (2, 3, 4, 16))
    skip = jax.random.normal(jax.random.key(4), (2, 3 * stride, 4 * stride, 8))
    variables = jax.jit(model.init)(KEY, tokens, skip)
    out = jax.jit(model.apply)(variables, tokens, skip)
    assert out.shape == (2, 3 * stride, 4 * stride) and out.dtype == jnp.float32
  # unpatchify inverts the stems' patchify.
  from jaisp_jax.models import stems
  x = jax.random.normal(jax.random.key(5), (2, 16, 24, 3))
  np.testing.assert_array_equal(decoder.unpatchify(stems.patchify(x, 8), 8, 3), x)


def test_fourier_shift_matches_scipy_and_integer_rolls():
  rng = np.random.default_rng(0)
  img = rng.normal(size=(2, 32, 48)).astype(np.float32)
  d = np.array([[0.3, -1.7], [2.0, 1.0]], np.float32)  # (dx, dy) px
  got = np.asarray(shift.fourier_shift(jnp.asarray(img), jnp.asarray(d)))
  for i in range(2):
    want = np.fft.ifft2(scipy.ndimage.fourier_shift(np.fft.fft2(img[i]), (d[i, 1], d[i, 0]))).real
    np.testing.assert_allclose(got[i], want, atol=2e-4)
  np.testing.assert_allclose(got[1], np.roll(img[1], (1, 2), axis=(0, 1)), atol=2e-4)


def test_fourier_shift_moves_a_well_sampled_source_exactly():
  yy, xx = np.mgrid[0:64, 0:64]
  g = lambda x0, y0: np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * 2.5 ** 2))
  d = np.array([[0.37, -0.21]], np.float32)
  got = shift.fourier_shift(jnp.asarray(g(30.0, 33.0)[None], jnp.float32), jnp.asarray(d))
  np.testing.assert_allclose(got[0], g(30.37, 32.79), atol=1e-5)


def test_shift_pairs_shifts_view_b_by_the_returned_amount():
  pairs = batch_lib.synthetic_pairs_batch(0, REG, {'rubin-euclid': 3, 'rubin-rubin': 2},
                                          crop_arcsec=12.8)
  out, mas = jax.jit(lambda p, k: shift.shift_pairs(p, k, REG, max_mas=250.0))(
      pairs, jax.random.key(1))
  assert mas.shape == (5, 2) and float(jnp.abs(mas).max()) <= 250.0
  assert float(jnp.abs(mas).max()) > 50.0
  np.testing.assert_array_equal(out['rubin-euclid']['a']['image'],
                                pairs['rubin-euclid']['a']['image'])
  # Centroid of the (bright) sources moves by the shift; pairs are in sorted combo order.
  for k, (combo, i, scale) in enumerate([('rubin-euclid', 0, 0.1), ('rubin-euclid', 1, 0.1),
                                         ('rubin-euclid', 2, 0.1), ('rubin-rubin', 0, 0.2),
                                         ('rubin-rubin', 1, 0.2)]):
    before = pairs[combo]['b']['image'][i]
    after = np.asarray(out[combo]['b']['image'][i])
    w = np.clip(before - 5, 0, None)
    w2 = np.clip(after - 5, 0, None)
    yy, xx = np.mgrid[0:before.shape[0], 0:before.shape[1]]
    moved = np.array([(w2 * xx).sum() / w2.sum() - (w * xx).sum() / w.sum(),
                      (w2 * yy).sum() / w2.sum() - (w * yy).sum() / w.sum()])
    np.testing.assert_allclose(moved * scale * 1000, mas[k], atol=25.0)
  np.testing.assert_array_equal(out['rubin-rubin']['b']['mask'], 1.0)


def test_shift_head_predicts_per_pair():
  model = shift.ShiftHead(hidden=8, scale_mas=250.0)
  ta = jax.random.normal(jax.random.key(6), (5, 9, 16))
  tb = jax.random.normal(jax.random.key(7), (5, 9, 16))
  variables = jax.jit(model.init)(KEY, ta, tb)
  out = jax.jit(model.apply)(variables, ta, tb)
  assert out.shape == (5, 2) and out.dtype == jnp.float32
  g = jax.jit(jax.grad(lambda v: jnp.sum(model.apply(v, ta, tb) ** 2)))(variables)
  assert all(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g))
