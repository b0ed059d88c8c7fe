"""JAISP variants end to end on a tiny config: shapes, dtypes, gradients, no retrace."""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import infomap
from jaisp_jax.models import jaisp

REG = bands.default_registry()
KEY = jax.random.key(0, impl='rbg')  # rbg: much faster to compile on CPU than threefry
QUOTAS = {'rubin-euclid': 2, 'rubin-rubin': 1, 'euclid-euclid': 1}
P = sum(QUOTAS.values())
CROP = 6.4  # arcsec: Rubin 32 px, Euclid 64 px; 1.6" tokens -> a 4x4 grid for both
N, D = 16, 32


def tiny_config(variant, **overrides):
  c = jaisp.default_model_config()
  c.variant = variant
  c.token_arcsec = 1.6
  c.stem.hidden, c.stem.channels = 4, 8
  c.trunk.embed_dim, c.trunk.depth, c.trunk.num_heads = D, 1, 2
  c.predictor.hidden = 64
  c.detr.num_queries, c.detr.depth, c.detr.num_heads = 5, 1, 2
  c.clip.embed_dim, c.clip.depth, c.clip.num_heads, c.clip.proj_dim = D, 1, 2, 16
  c.recon.channels = 4
  c.shift.hidden = 16
  for key, value in overrides.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return ml_collections.FrozenConfigDict(c)


def make_batch(seed):
  return {'pairs': batch_lib.synthetic_pairs_batch(seed, REG, QUOTAS, CROP),
          'chips': batch_lib.synthetic_chips_batch(seed, REG, 2, CROP)}


def build(variant, **overrides):
  model = jaisp.JAISP(tiny_config(variant, **overrides), REG)
  variables = jax.jit(model.init)(KEY, make_batch(0))
  return model, variables


def apply_fn(model):
  return jax.jit(lambda v, b: model.apply(v, b, rngs={'mask': jax.random.key(1)}))


def assert_side(side, with_pred=True):
  chex.assert_shape(side['tokens'], (P, N, D))
  chex.assert_shape(side['global'], (P, D))
  chex.assert_shape(side['token_weights'], (P, N))
  if with_pred:
    chex.assert_shape(side['pred'], (P, N, D))
  for x in jax.tree.leaves(side):
    assert x.dtype == jnp.float32 and bool(jnp.isfinite(x).all())


@pytest.fixture(scope='module')
def hybrid():
  """jepa + shift head + pixel decoder: every head of the default variant at once.

  Returns (model, variables, run): `run` is the jitted forward pass, shared by the
  tests and allowed ONE trace in total -- batches with other band ids reuse it.
  """
  model, variables = build('jepa', **{'shift.enabled': True, 'recon.enabled': True})

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(v, b):
    return model.apply(v, b, rngs={'mask': jax.random.key(1)})

  return model, variables, run


def test_jepa_outputs_follow_the_pair_layout(hybrid):
  _, variables, run = hybrid
  batch = make_batch(1)
  out = run(variables, batch)
  assert_side(out['a'])
  assert_side(out['b'])
  chex.assert_shape(out['shift_pred'], (P, 2))
  # Outputs are concatenated in pair_layout order; the weights of the first pair's
  # Euclid view (combo 'euclid-euclid' sorts first) are that view's information map.
  assert [c for c, _ in jaisp.pair_layout(batch['pairs'])] == sorted(QUOTAS)
  view = batch['pairs']['euclid-euclid']['b']
  _, tw = infomap.information_map(view['image'], view['rms'], view['mask'], 16)
  np.testing.assert_allclose(out['b']['token_weights'][:1], tw, rtol=1e-6)
  # The hybrid's reconstruction head: one hidden band per instrument.
  for inst, hw in (('rubin', 32), ('euclid', 64)):
    rec = out['recon'][inst]
    for k in ('pred', 'target', 'rms', 'mask', 'weights'):
      chex.assert_shape(rec[k], (2, hw, hw))
    assert all(REG.bands[int(i)].instrument == inst for i in rec['band'])


def test_target_branch_is_the_same_encoder_with_other_params(hybrid):
  model, variables, run = hybrid
  batch = make_batch(2)
  ema = jax.tree.map(lambda x: 0.9 * x, variables)
  encode = jax.jit(lambda v, p: model.apply(v, p, method=jaisp.JAISP.encode))
  target = encode(ema, batch['pairs'])
  online = encode(variables, batch['pairs'])
  assert_side(target['a'], with_pred=False)
  assert set(target['a']) == {'tokens', 'global', 'token_weights'}
  assert float(jnp.abs(target['a']['tokens'] - online['a']['tokens']).max()) > 1e-3
  pred = model.apply(variables, online['a']['tokens'], method=jaisp.JAISP.predict)
  np.testing.assert_allclose(pred, run(variables, batch)['a']['pred'], rtol=1e-4, atol=1e-5)


def test_gradients_reach_every_online_param_and_none_reach_the_target(hybrid):
  model, variables, _ = hybrid
  batch = make_batch(3)
  ema = jax.tree.map(lambda x: 0.9 * x, variables)

  def loss(params, ema_params):
    out = model.apply(params, batch, rngs={'mask': jax.random.key(1)})
    tgt = jax.lax.stop_gradient(model.apply(ema_params, batch['pairs'],
                                            method=jaisp.JAISP.encode))
    value = jnp.sum(out['a']['pred'] * tgt['b']['tokens'])
    value += jnp.sum(out['b']['pred'] * tgt['a']['tokens'])
    value += jnp.sum(out['shift_pred'] ** 2) * 1e-3
    value += sum(jnp.sum(r['pred'] ** 2) for r in out['recon'].values())
    return value

  g_online, g_target = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, ema)
  flat = jax.tree_util.tree_flatten_with_path(g_online)[0]
  dead = [jax.tree_util.keystr(k) for k, g in flat if not float(jnp.abs(g).max()) > 0]
  assert not dead, dead
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_target))
  # Gathered stems: the chips hold every band, so every band's stem row gets gradient.
  k = g_online['params']['stems']['stem_rubin']['conv1_kernel']
  assert all(float(jnp.abs(k[REG[n].index]).max()) > 0
             for n in REG.names if REG[n].instrument == 'rubin')


def test_changing_the_band_mix_does_not_recompile(hybrid):
  _, variables, run = hybrid  # traced at most once over all tests of this module
  b1, b2 = make_batch(4), make_batch(5)
  same_pixels = jax.tree.map(lambda x: x, b1)
  bands2 = b2['pairs']['rubin-euclid']['a']['band']
  same_pixels['pairs']['rubin-euclid']['a']['band'] = bands2
  assert (bands2 != b1['pairs']['rubin-euclid']['a']['band']).any()
  o1 = run(variables, b1)
  o2 = run(variables, same_pixels)
  run(variables, b2)
  # Same pixels through other bands' stems: other tokens.
  assert float(jnp.abs(o1['a']['tokens'] - o2['a']['tokens']).max()) > 1e-4


@pytest.mark.parametrize('variant', ['two_view', 'detr_jepa'])
def test_pair_variants(variant):
  model, variables = build(variant)
  out = apply_fn(model)(variables, make_batch(6))
  if variant == 'two_view':
    # One trunk per instrument into the shared space.
    assert {'trunks_rubin', 'trunks_euclid'} <= set(variables['params'])
    assert_side(out['a'])
    assert_side(out['b'])
  else:
    assert_side(out['a'], with_pred=False)
    obj = out['a']['objects']
    chex.assert_shape([obj['slots'], obj['pred']], (P, 5, D))
    chex.assert_shape(obj['attn'], (P, 5, N))
    chex.assert_shape(obj['objectness'], (P, 5))
    np.testing.assert_allclose(obj['attn'].sum(-1), 1.0, rtol=1e-5)
  assert 'shift_pred' not in out and 'recon' not in out


def test_clip_variant_embeds_both_instruments_chips():
  model, variables = build('clip')
  out = apply_fn(model)(variables, make_batch(7))['clip']
  for inst in ('rubin', 'euclid'):
    chex.assert_shape(out[inst]['tokens'], (2, N, D))
    chex.assert_shape(out[inst]['global'], (2, D))
    chex.assert_shape(out[inst]['embedding'], (2, 16))
  # Per-instrument encoders take all bands as channels: 2 (image, rms) per band.
  p = variables['params']
  assert p['chip_encoders_rubin']['patch_embed']['kernel'].shape == (8 * 8 * 12, D)
  assert p['chip_encoders_euclid']['patch_embed']['kernel'].shape == (16 * 16 * 8, D)


def test_masked_band_reconstructs_the_hidden_band():
  model, variables = build('masked_band')
  batch = make_batch(8)
  hidden = {'rubin': jnp.array([2, 5]), 'euclid': jnp.array([0, 3])}
  run = jax.jit(lambda v, b, h: model.apply(v, b, h))
  out = run(variables, batch, hidden)['recon']
  chips = batch['chips']
  for inst, hw in (('rubin', 32), ('euclid', 64)):
    rec = out[inst]
    chex.assert_shape(rec['pred'], (2, hw, hw))
    names = [REG.instrument_bands(inst)[int(i)].name for i in hidden[inst]]
    assert [REG.names[int(b)] for b in rec['band']] == names
    for i in range(2):
      np.testing.assert_array_equal(rec['target'][i], chips[inst]['image'][i, hidden[inst][i]])
    assert float(rec['weights'].max()) > 0.9 and float(rec['weights'].min()) >= 0.0
  # The hidden bands' pixels do not reach the prediction; a visible band's do.
  poked = jax.tree.map(np.array, batch)
  for inst in ('rubin', 'euclid'):
    for i in range(2):
      poked['chips'][inst]['image'][i, hidden[inst][i]] += 100.0
  out2 = run(variables, poked, hidden)['recon']
  for inst in ('rubin', 'euclid'):
    np.testing.assert_allclose(out2[inst]['pred'], out[inst]['pred'], atol=1e-5)
  poked['chips']['euclid']['image'][0, 1] += 100.0  # visible for sample 0 only
  out3 = run(variables, poked, hidden)['recon']
  assert float(jnp.abs(out3['rubin']['pred'][0] - out['rubin']['pred'][0]).max()) > 1e-3
  np.testing.assert_allclose(out3['rubin']['pred'][1], out['rubin']['pred'][1], atol=1e-5)


def test_bfloat16_compute_path_keeps_float32_params():
  model, variables = build('jepa', dtype='bfloat16')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  out = apply_fn(model)(variables, make_batch(9))
  assert_side(out['a'])
  assert_side(out['b'])


def test_get_representation_rubin_and_euclid_of_the_same_sky():
  cfg = tiny_config('detr_jepa')
  model = jaisp.JAISP(cfg, REG)
  variables = jax.jit(model.init)(KEY, make_batch(0))
  pairs = batch_lib.synthetic_pairs_batch(10, REG, {'rubin-euclid': 3}, CROP)['rubin-euclid']
  ra = jaisp.get_representation(variables, 3.0 * pairs['a']['image'][:, None],
                                3.0 * pairs['a']['rms'][:, None], 'rubin_g', cfg, REG)
  eu = jaisp.get_representation(variables, pairs['b']['image'][:, None],
                                pairs['b']['rms'][:, None], 'euclid_vis', cfg, REG)
  for rep, hw in ((ra, 32), (eu, 64)):
    chex.assert_shape(rep['tokens'], (3, N, D))
    chex.assert_shape(rep['global'], (3, D))
    chex.assert_shape(rep['weights'], (3, 1, hw, hw))
    chex.assert_shape(rep['objects']['slots'], (3, 5, D))
  # Inputs are normalised to noise units: a flux-unit change is invisible.
  ra1 = jaisp.get_representation(variables, pairs['a']['image'][:, None],
                                 pairs['a']['rms'][:, None], 'rubin_g', cfg, REG)
  np.testing.assert_allclose(ra1['tokens'], ra['tokens'], rtol=1e-4, atol=1e-5)
  # The information map marks the same sources in both instruments.
  assert float(jnp.corrcoef(ra['token_weights'].ravel(), eu['token_weights'].ravel())[0, 1]) > 0.7


def test_info_pooled_global_is_the_information_weighted_token_mean():
  cfg = tiny_config('jepa', global_pool='info', global_pool_floor=0.01)
  model = jaisp.JAISP(cfg, REG)
  variables = jax.jit(model.init)(KEY, make_batch(0))
  view = jax.tree.map(np.array, batch_lib.synthetic_pairs_batch(
      11, REG, {'rubin-euclid': 3}, CROP)['rubin-euclid']['b'])
  view['mask'][0, :16, :16] = 0.0  # one token of sample 0 fully masked
  view['image'][0, :16, :16] = view['rms'][0, :16, :16] = 0.0
  view['band'][:] = REG.band_id('euclid_vis')
  enc = jax.jit(lambda v, x: model.apply(v, x, 'euclid', method=jaisp.JAISP.encode_view))
  out = enc(variables, view)
  w = np.asarray(out['token_weights'], np.float64)  # (3, N)
  cov = view['mask'].reshape(3, 4, 16, 4, 16).mean(axis=(2, 4)).reshape(3, N)
  assert w[0, 0] == 0.0 and cov[0, 0] == 0.0
  u = w + 0.01 * cov
  want = np.einsum('bn,bnd->bd', u, np.asarray(out['tokens'], np.float64)) / u.sum(1)[:, None]
  np.testing.assert_allclose(out['global'], want, rtol=1e-5, atol=1e-6)
  # Sources dominate: the global is not the plain token mean.
  assert float(np.abs(want - np.asarray(out['tokens']).mean(1)).max()) > 1e-2
  # The inference API pools the same way.
  rep = jaisp.get_representation(variables, view['image'][:, None], view['rms'][:, None],
                                 'euclid_vis', cfg, REG, normalise=False)
  np.testing.assert_allclose(rep['global'], want, rtol=1e-4, atol=1e-5)


def test_unknown_global_pool_is_refused():
  with pytest.raises(ValueError, match='global_pool'):
    build('jepa', global_pool='max')
