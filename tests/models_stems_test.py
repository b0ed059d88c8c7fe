"""Band stems: sky-aligned grids, per-band parameters gathered by id, no retracing."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import stems

REG = bands.default_registry()
KEY = jax.random.key(0, impl='rbg')  # rbg: much faster to compile on CPU than threefry


def _stems(**kw):
  args = dict(registry=REG, token_arcsec=1.6, hidden=4, channels=8, embed_dim=16)
  args.update(kw)
  return stems.BandStems(**args)


def _views(seed=0):
  pairs = batch_lib.synthetic_pairs_batch(seed, REG, {'rubin-euclid': 3}, crop_arcsec=6.4)
  return pairs['rubin-euclid']['a'], pairs['rubin-euclid']['b']


def _init(model, rubin, euclid):
  def init(key):
    v = model.init(key, 'rubin', rubin['image'], rubin['rms'], rubin['mask'], rubin['band'])
    v2 = model.init(key, 'euclid', euclid['image'], euclid['rms'], euclid['mask'], euclid['band'])
    return {'params': {**v['params'], **v2['params']}}
  return jax.jit(init)(KEY)


def test_rubin_and_euclid_views_of_the_same_sky_give_the_same_token_grid():
  rubin, euclid = _views()
  assert rubin['image'].shape == (3, 32, 32) and euclid['image'].shape == (3, 64, 64)
  model = _stems()
  variables = _init(model, rubin, euclid)
  tr = model.apply(variables, 'rubin', rubin['image'], rubin['rms'], rubin['mask'], rubin['band'])
  te = model.apply(variables, 'euclid', euclid['image'], euclid['rms'], euclid['mask'],
                   euclid['band'])
  # 1.6" tokens: Rubin stride 8 (0.2"/px), Euclid stride 16 (0.1"/px) -> 4x4 tokens both.
  assert tr.shape == te.shape == (3, 4, 4, 16)
  assert model.bind(variables).stride('rubin') == 8
  assert model.bind(variables).stride('euclid') == 16
  # Parameters are stacked per instrument with a leading band axis.
  p = variables['params']
  assert p['stem_rubin']['conv1_kernel'].shape == (6, 3, 3, 2, 4)
  assert p['stem_euclid']['conv2_kernel'].shape == (4, 3, 3, 4, 8)
  assert p['stem_euclid']['patch_embed']['kernel'].shape == (16 * 16 * 8, 16)


def test_reference_stem_has_the_reference_parameter_count_per_band():
  # PyTorch reference (shared/bench/torch_ref/README.md): 19,104 parameters per stem.
  model = stems.InstrumentStems(n_bands=6, stride=16, hidden=32, channels=64, embed_dim=8)
  x = jnp.zeros((1, 16, 16))
  shapes = jax.eval_shape(lambda: model.init(KEY, x, x, x, jnp.zeros(1, jnp.int32)))
  p = shapes['params']
  per_band = sum(int(np.prod(p[k].shape[1:])) for k in
                 ('conv1_kernel', 'conv1_bias', 'conv2_kernel', 'conv2_bias'))
  assert per_band == 19104


def _reference_stem(params, band, image, rms, mask, stride, softening):
  """Independent per-band stem with lax.conv on the band's own parameter slice."""
  x = jnp.stack([softening * jnp.arcsinh(image / softening), rms], -1) * mask[..., None]
  conv = lambda x, k, b: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')) + b[None, None, None, :]
  h = jax.nn.gelu(conv(x, params['conv1_kernel'][band], params['conv1_bias'][band]),
                  approximate=False)
  f = jax.nn.gelu(conv(h, params['conv2_kernel'][band], params['conv2_bias'][band]),
                  approximate=False) * mask[..., None]
  pe = params['patch_embed']
  k = pe['kernel'].reshape(stride, stride, f.shape[-1], -1)
  tokens = jax.lax.conv_general_dilated(f, k, (stride, stride), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return tokens + pe['bias'][None, None, None, :]


def test_each_sample_uses_its_own_bands_stem():
  rubin, euclid = _views(1)
  model = _stems()
  variables = _init(model, rubin, euclid)
  # Three different bands in one batch, with a masked corner in sample 2.
  band = np.array([REG.band_id('rubin_u'), REG.band_id('rubin_i'), REG.band_id('rubin_y')],
                  np.int32)
  mask = rubin['mask'].copy()
  mask[2, :5, :7] = 0
  image, rms = rubin['image'] * mask, rubin['rms'] * mask
  got = model.apply(variables, 'rubin', image, rms, mask, band)
  p = variables['params']['stem_rubin']
  for i, name in enumerate(['rubin_u', 'rubin_i', 'rubin_y']):
    want = _reference_stem(p, REG[name].index, image[i:i + 1], rms[i:i + 1], mask[i:i + 1], 8,
                           1.0)
    np.testing.assert_allclose(got[i:i + 1], want, rtol=1e-4, atol=1e-5)


def test_changing_band_ids_does_not_retrace_and_changes_the_output():
  rubin, euclid = _views(2)
  model = _stems()
  variables = _init(model, rubin, euclid)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(variables, image, rms, mask, band):
    return model.apply(variables, 'rubin', image, rms, mask, band)

  outs = []
  for names in (['rubin_u', 'rubin_g', 'rubin_r'], ['rubin_z', 'rubin_z', 'rubin_y'],
                ['rubin_u', 'rubin_u', 'rubin_u']):
    band = np.array([REG.band_id(n) for n in names], np.int32)
    outs.append(run(variables, rubin['image'], rubin['rms'], rubin['mask'], band))
  # Same pixels through another band's stem give other tokens.
  assert float(jnp.abs(outs[0][0] - outs[1][0]).max()) > 1e-3
  np.testing.assert_allclose(outs[0][0], outs[2][0], rtol=1e-6)


def test_masked_pixels_do_not_reach_the_tokens():
  rubin, euclid = _views(3)
  model = _stems(kind='conv')
  variables = _init(model, rubin, euclid)
  mask = rubin['mask'].copy()
  mask[:, 10:20, 3:9] = 0
  clean = model.apply(variables, 'rubin', rubin['image'] * mask, rubin['rms'] * mask, mask,
                      rubin['band'])
  garbage = rubin['image'].copy()
  garbage[:, 10:20, 3:9] = 1e4
  dirty = model.apply(variables, 'rubin', garbage, rubin['rms'] + 5 * (1 - mask), mask,
                      rubin['band'])
  np.testing.assert_allclose(clean, dirty, rtol=1e-5, atol=1e-5)


def test_patch_stem_and_bfloat16_compute_keep_float32_params():
  rubin, euclid = _views(4)
  model = _stems(kind='patch', dtype=jnp.bfloat16)
  variables = _init(model, rubin, euclid)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  assert variables['params']['stem_euclid']['patch_kernel'].shape == (4, 16 * 16 * 2, 16)
  te = model.apply(variables, 'euclid', euclid['image'], euclid['rms'], euclid['mask'],
                   euclid['band'])
  assert te.shape == (3, 4, 4, 16) and te.dtype == jnp.bfloat16
  assert bool(jnp.isfinite(te.astype(jnp.float32)).all())
