"""Total loss per variant: finite, and gradients reach the online params only."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import jaisp
from jaisp_jax.objectives import losses
from jaisp_jax.objectives import vicreg

REG = bands.default_registry()
KEY = jax.random.key(0, impl='rbg')  # rbg: faster to compile on CPU than threefry
CROP = 6.4  # arcsec: Rubin 32 px, Euclid 64 px; 1.6" tokens -> 4 x 4 grid


def _config(variant, **model_overrides):
  m = jaisp.default_model_config()
  m.variant = variant
  m.token_arcsec = 1.6
  m.stem.kind = 'patch'
  m.trunk.embed_dim = 16
  m.trunk.depth = 1
  m.trunk.num_heads = 2
  m.predictor.hidden = 32
  m.detr.num_queries = 5
  m.detr.depth = 1
  m.detr.num_heads = 2
  m.clip.embed_dim = 16
  m.clip.depth = 1
  m.clip.num_heads = 2
  m.clip.proj_dim = 8
  m.shift.hidden = 8
  m.recon.channels = 4
  for k, v in model_overrides.items():
    m[k].update(v) if isinstance(v, dict) else setattr(m, k, v)
  return ml_collections.ConfigDict(dict(model=m, loss=losses.default_loss_config()))


def _batch(parts):
  b = {}
  if 'pairs' in parts:
    b['pairs'] = batch_lib.synthetic_pairs_batch(
        0, REG, {'rubin-euclid': 4}, CROP)
  if 'chips' in parts:
    b['chips'] = batch_lib.synthetic_chips_batch(1, REG, 3, CROP)
  return jax.tree.map(jnp.asarray, b)


# name: (config, batch parts, metrics the loss must report, total from the terms)
CASES = {
    'jepa': (_config('jepa'), ('pairs',),
             {'loss_jepa', 'loss_vicreg', 'token_similarity', 'effective_dim', 'var_min'},
             lambda m, c: c.jepa * m['loss_jepa'] + m['loss_vicreg']),
    'hybrid_jepa_shift_recon': (
        _config('jepa', shift=dict(enabled=True), recon=dict(enabled=True)),
        ('pairs', 'chips'), {'loss_jepa', 'loss_shift', 'loss_recon', 'shift_rmse_mas'},
        lambda m, c: (c.jepa * m['loss_jepa'] + m['loss_vicreg'] + c.shift * m['loss_shift']
                      + c.recon * m['loss_recon'])),
    'two_view': (_config('two_view'), ('pairs',), {'loss_jepa', 'loss_vicreg'},
                 lambda m, c: c.jepa * m['loss_jepa'] + m['loss_vicreg']),
    'detr_jepa': (_config('detr_jepa'), ('pairs',),
                  {'loss_slot', 'loss_objectness', 'matched_similarity', 'active_slots'},
                  lambda m, c: (c.slot * m['loss_slot'] + m['loss_vicreg']
                                + c.objectness * m['loss_objectness'])),
    'clip': (_config('clip'), ('chips',), {'loss_ntxent', 'retrieval_top1'},
             lambda m, c: c.ntxent * m['loss_ntxent']),
    'masked_band': (_config('masked_band'), ('chips',),
                    {'loss_recon', 'recon_chi2_rubin', 'recon_chi2_euclid'},
                    lambda m, c: c.recon * m['loss_recon']),
}
# The smoke preset's objective: no predictor, info-pooled global, VICReg over weighted
# tokens, VICReg invariance between the pair's globals.
CASES['jepa_tokens_inv'] = (
    _config('jepa', predictor=dict(kind='none'), global_pool='info'), ('pairs',),
    {'loss_jepa', 'loss_vicreg', 'loss_inv', 'global_similarity', 'effective_dim'},
    lambda m, c: c.jepa * m['loss_jepa'] + m['loss_vicreg'] + c.inv * m['loss_inv'])
CASES['jepa_tokens_inv'][0].loss.update(vicreg_on='tokens', inv=0.5)
# detr_jepa under the smoke preset (no predictor: the online slots are the predictions).
CASES['detr_jepa_no_predictor'] = (_config('detr_jepa', predictor=dict(kind='none')),
                                   *CASES['detr_jepa'][1:])
# Non-default term weights, so the composition check below sees them.
for _case in CASES.values():
  _case[0].loss.update(jepa=0.7, shift=0.3, recon=0.6, slot=1.3, objectness=0.2, ntxent=0.9)


@pytest.mark.parametrize('name', sorted(CASES))
def test_total_loss_gradient_reaches_online_params_and_never_the_target(name):
  config, parts, expected_metrics, compose = CASES[name]
  batch = _batch(parts)
  model = jaisp.JAISP(ml_collections.FrozenConfigDict(config.model), REG)
  params = jax.jit(lambda k: model.init({'params': k, 'mask': k}, batch))(KEY)['params']
  # A distinct EMA copy, so a leak of target gradients could not hide behind equality.
  ema = jax.tree.map(lambda x: 0.9 * x + 0.01, params)
  loss_fn = losses.make_loss_fn(model, config, REG)

  @jax.jit
  def grads(params, ema):
    return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, ema, batch, jax.random.key(1, impl='rbg'))

  (loss, metrics), (g_online, g_target) = grads(params, ema)
  assert np.isfinite(float(loss))
  assert expected_metrics <= set(metrics), sorted(metrics)
  np.testing.assert_allclose(loss, compose(metrics, config.loss), rtol=1e-5)
  assert all(np.all(np.isfinite(np.asarray(v))) for v in metrics.values()), metrics
  # Exactly zero into the target branch.
  for leaf in jax.tree.leaves(g_target):
    assert np.all(np.asarray(leaf) == 0)
  # Non-zero for the online parameters: every top-level module that the variant's
  # forward pass uses receives gradient.
  norms = {k: float(sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(v)))
           for k, v in g_online.items()}
  assert sum(norms.values()) > 0
  unused = {'band_queries'} if 'recon' not in name and name != 'masked_band' else set()
  dead = [k for k, n in norms.items() if n == 0 and k not in unused]
  assert not dead, (name, norms)


def test_two_view_without_ema_aligns_the_online_views():
  config = _config('two_view')
  config.loss.two_view_ema = False
  assert not losses.needs_target(config)
  pairs = jax.tree.map(jnp.asarray, batch_lib.synthetic_pairs_batch(
      0, REG, {'rubin-euclid': 4}, CROP))
  rng = np.random.default_rng(0)
  side = lambda: dict(  # noqa: E731
      tokens=jnp.asarray(rng.normal(size=(4, 16, 8)), jnp.float32),
      token_weights=jnp.asarray(rng.random((4, 16)), jnp.float32))
  a, b = side(), side()

  def f(ta, tb):
    out = {'a': dict(tokens=ta, token_weights=a['token_weights'], **{'global': ta.mean(1)}),
           'b': dict(tokens=tb, token_weights=b['token_weights'], **{'global': tb.mean(1)})}
    return losses.total_loss(out, None, {'pairs': pairs}, config)[0]

  ga, gb = jax.grad(f, argnums=(0, 1))(a['tokens'], b['tokens'])
  assert float(jnp.abs(ga).sum()) > 0 and float(jnp.abs(gb).sum()) > 0
  # Identical views: the alignment term vanishes, only VICReg remains.
  _, m = losses.total_loss(
      {'a': dict(tokens=a['tokens'], token_weights=a['token_weights'],
                 **{'global': a['tokens'].mean(1)}),
       'b': dict(tokens=a['tokens'], token_weights=b['token_weights'],
                 **{'global': a['tokens'].mean(1)})}, None, {'pairs': pairs}, config)
  np.testing.assert_allclose(m['loss_jepa'], 0.0, atol=1e-6)


def _token_outputs(seed, p=4, n=16, d=8):
  rng = np.random.default_rng(seed)
  side = lambda: dict(  # noqa: E731
      tokens=jnp.asarray(rng.normal(size=(p, n, d)), jnp.float32),
      token_weights=jnp.asarray(rng.random((p, n)), jnp.float32),
      **{'global': jnp.asarray(rng.normal(size=(p, d)), jnp.float32)})
  return {'a': side(), 'b': side()}


def test_vicreg_on_tokens_and_invariance_terms():
  config = _config('two_view')
  config.loss.two_view_ema = False
  pairs = jax.tree.map(jnp.asarray, batch_lib.synthetic_pairs_batch(
      0, REG, {'rubin-euclid': 4}, CROP))
  out = _token_outputs(1)
  _, m_glob = losses.total_loss(out, None, {'pairs': pairs}, config)
  config.loss.update(vicreg_on='tokens', inv=2.0)
  loss, m = losses.total_loss(out, None, {'pairs': pairs}, config)
  a, b = out['a'], out['b']
  z = jnp.concatenate([a['tokens'].reshape(-1, 8), b['tokens'].reshape(-1, 8)])
  w = jnp.concatenate([a['token_weights'].reshape(-1), b['token_weights'].reshape(-1)])
  want_v, _ = vicreg.weighted_vicreg_loss(z, w, 1.0, 0.04)
  np.testing.assert_allclose(m['loss_vicreg'], want_v, rtol=1e-5)
  assert abs(float(m['loss_vicreg']) - float(m_glob['loss_vicreg'])) > 1e-3
  np.testing.assert_allclose(m['loss_inv'], np.mean((np.asarray(a['global'])
                                                     - np.asarray(b['global'])) ** 2),
                             rtol=1e-5)
  np.testing.assert_allclose(loss, m['loss_jepa'] + m['loss_vicreg'] + 2.0 * m['loss_inv'],
                             rtol=1e-5)
  config.loss.vicreg_on = 'slots'
  with pytest.raises(ValueError, match='vicreg_on'):
    losses.total_loss(out, None, {'pairs': pairs}, config)
