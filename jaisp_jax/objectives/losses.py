"""The total loss of each model variant, and the train step's `loss_fn`.

`total_loss(outputs, targets, batch, config)` combines the online outputs of
`JAISP.__call__` and the EMA target outputs of `JAISP.encode` into one scalar and a
metrics dict. `make_loss_fn(model, config)` wraps model application around it with the
signature `train.step` expects: ``loss_fn(params, ema_params, batch, rng)``.

Per variant (weights are ``config.loss`` fields, `default_loss_config`)::

  jepa       jepa * JEPA(pred_a, pred_b | sg target tokens, info weights)      [jepa.py]
             + VICReg(online global of a) / 2 + VICReg(online global of b) / 2 [vicreg.py]
               (loss.vicreg_on 'global', the seeds) or VICReg(all online tokens,
               information-weighted) (loss.vicreg_on 'tokens')
             + inv * MSE(online global of a, online global of b)  (VICReg invariance)
             + shift * Shift(shift_pred, true shift)     if model.shift.enabled [shift.py]
             + recon * Recon(...)                        if model.recon.enabled (hybrid)
  two_view   as jepa; without a predictor the online tokens are the predictions,
             and without an EMA target (loss.two_view_ema False) the other view's
             online tokens (stop-gradient) are the targets
  detr_jepa  slot * matched-slot JEPA (sigmoid objectness weights)             [slots.py]
             + VICReg over all online slots (P * Q vectors)
             + objectness * BCE(objectness logits, attended information)
  clip       ntxent * symmetric NT-Xent between the instruments' embeddings   [ntxent.py]
             (mean over instrument pairs)
  masked_band  recon * masked-band Charbonnier loss, mean over instruments
                                                                       [reconstruction.py]

All pair outputs concatenate the batch's pair groups (P pairs in `pair_layout` order),
so every statistic (the JEPA weight sum, VICReg, NT-Xent negatives) is over the
global batch. The target branch is wrapped in ``stop_gradient``: the loss has an
exactly zero gradient with respect to the EMA parameters.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections

from jaisp_jax.models import jaisp as jaisp_model
from jaisp_jax.models import shift as shift_model
from jaisp_jax.objectives import jepa
from jaisp_jax.objectives import ntxent
from jaisp_jax.objectives import reconstruction
from jaisp_jax.objectives import shift as shift_obj
from jaisp_jax.objectives import slots
from jaisp_jax.objectives import vicreg


def default_loss_config() -> ml_collections.ConfigDict:
  """The `config.loss` sub-config; every field documented. Seed defaults."""
  c = ml_collections.ConfigDict()
  c.jepa = 1.0               # token JEPA weight (jepa, two_view)
  c.weight_mode = 'context'  # how the views' token weights combine (jepa.py docstring);
  #                            'max' reproduces the PyTorch reference
  c.var = 1.0                # VICReg variance hinge weight (seed 1.0)
  c.cov = 0.04               # VICReg covariance weight (seed 0.04)
  c.var_gamma = 1.0          # target std of the variance hinge
  c.var_eps = 1e-4           # eps inside sqrt(var + eps)
  c.vicreg_on = 'global'     # what VICReg var/cov regularise (jepa, two_view): 'global' = the
  #                            P online global embeddings of each side (the seeds); 'tokens' =
  #                            all 2PN online tokens, weighted by information (public JAISP code)
  c.inv = 0.0                # VICReg invariance: weight of the MSE between the online global
  #                            embeddings of the two views of each pair (0: the seeds)
  c.shift = 1.0              # sub-pixel shift regression weight (when model.shift.enabled)
  c.shift_scale_mas = 100.0  # mas per Huber unit
  c.recon = 1.0              # masked-band reconstruction weight (masked_band; hybrid jepa)
  c.recon_delta = 1.0        # Charbonnier transition, sigma
  c.recon_sky_weight = 0.1   # weight floor on sky pixels (reconstruction.py docstring)
  c.slot = 1.0               # matched-slot JEPA weight (detr_jepa)
  c.slot_weight_mode = 'context'  # how matched slots' objectness combine
  c.use_objectness = True    # weight matched slots by sigmoid(objectness); False: all 1
  c.objectness = 0.1         # objectness BCE weight (target: attended information)
  c.objectness_scale = 0.5   # token weight counted as "fully a source" (slots.py)
  c.active_threshold = 0.5   # objectness probability of an active slot (metric)
  c.ntxent = 1.0             # NT-Xent weight (clip)
  c.temperature = 0.1        # NT-Xent temperature
  c.intra_view_negatives = False  # SimCLR (True) or CLIP-style (False) negatives
  c.two_view_ema = True      # two_view: EMA target (True) or the other online view (False)
  return c


VICREG_ON = ('global', 'tokens')


def _token_coverage(view: dict, n_tokens: int) -> jax.Array:
  """Fraction of observed pixels under each token of a view: (G, H, W) -> (G, N)."""
  mask = jnp.asarray(view['mask'], jnp.float32)
  g, hgt, wid = mask.shape
  s = int(round((hgt * wid / n_tokens) ** 0.5))
  if (hgt // s) * (wid // s) != n_tokens:
    raise ValueError(f'cannot tile a {hgt}x{wid} view into {n_tokens} tokens')
  return mask.reshape(g, hgt // s, s, wid // s, s).mean(axis=(2, 4)).reshape(g, n_tokens)


def _pair_coverage(pairs: dict, side: str, n_tokens: int) -> jax.Array:
  """(P, N) coverage of one side of every pair, in `pair_layout` (sorted) order."""
  return jnp.concatenate([_token_coverage(pairs[c][side], n_tokens) for c in sorted(pairs)])


def _vicreg_pair(za: jax.Array, zb: jax.Array, cfg) -> tuple[jax.Array, dict]:
  """Mean of the VICReg terms of two (B, D) embedding sets."""
  kw = dict(var_weight=cfg.var, cov_weight=cfg.cov, gamma=cfg.var_gamma, eps=cfg.var_eps)
  la, ma = vicreg.vicreg_loss(za, **kw)
  lb, mb = vicreg.vicreg_loss(zb, **kw)
  return 0.5 * (la + lb), jax.tree.map(lambda x, y: 0.5 * (x + y), ma, mb)


def _token_terms(outputs: dict, targets: Optional[dict], batch: dict, cfg,
                 use_ema: bool) -> tuple[jax.Array, dict]:
  """Token JEPA + VICReg for jepa / two_view."""
  a, b = outputs['a'], outputs['b']
  pred_a, pred_b = a.get('pred', a['tokens']), b.get('pred', b['tokens'])
  if use_ema:
    tgt_a, tgt_b = targets['a']['tokens'], targets['b']['tokens']
  else:
    tgt_a, tgt_b = a['tokens'], b['tokens']  # stop-gradient inside the JEPA loss
  n = pred_a.shape[1]
  pairs = batch['pairs']
  loss_j, m_j = jepa.jepa_loss(
      pred_a, pred_b, tgt_a, tgt_b, a['token_weights'], b['token_weights'],
      weight_mode=cfg.weight_mode, valid_a=_pair_coverage(pairs, 'a', n),
      valid_b=_pair_coverage(pairs, 'b', n))
  if cfg.vicreg_on == 'global':
    loss_v, m_v = _vicreg_pair(a['global'], b['global'], cfg)
  elif cfg.vicreg_on == 'tokens':
    d = a['tokens'].shape[-1]
    z = jnp.concatenate([a['tokens'].reshape(-1, d), b['tokens'].reshape(-1, d)])  # (2PN, D)
    w = jnp.concatenate([a['token_weights'].reshape(-1), b['token_weights'].reshape(-1)])
    loss_v, m_v = vicreg.weighted_vicreg_loss(z, w, cfg.var, cfg.cov, cfg.var_gamma,
                                              cfg.var_eps)
  else:
    raise ValueError(f'loss.vicreg_on must be one of {VICREG_ON}, got {cfg.vicreg_on!r}')
  loss_i = vicreg.invariance_loss(a['global'], b['global'])
  metrics = {**m_j, **m_v, 'loss_jepa': loss_j, 'loss_vicreg': loss_v, 'loss_inv': loss_i,
             'global_similarity': jnp.mean(jepa.cosine_similarity(
                 jax.lax.stop_gradient(a['global']), jax.lax.stop_gradient(b['global'])))}
  return cfg.jepa * loss_j + loss_v + cfg.inv * loss_i, metrics


def _shift_term(outputs: dict, shift_true: jax.Array, cfg) -> tuple[jax.Array, dict]:
  # Alignment needs signal in both views: a token's information is the smaller of its
  # two weights, a pair's the sum over its tokens.
  w = jnp.sum(jnp.minimum(outputs['a']['token_weights'], outputs['b']['token_weights']),
              axis=-1)  # (P,)
  loss, m = shift_obj.shift_loss(outputs['shift_pred'], shift_true, w,
                                 scale_mas=cfg.shift_scale_mas)
  return loss, {**m, 'loss_shift': loss}


def _recon_term(recon: dict, cfg) -> tuple[jax.Array, dict]:
  losses, chi2 = [], []
  for inst in sorted(recon):
    r = recon[inst]
    loss, m = reconstruction.masked_band_loss(
        r['pred'], r['target'], r['rms'], r['mask'], r['weights'],
        delta=cfg.recon_delta, sky_weight=cfg.recon_sky_weight)
    losses.append(loss)
    chi2.append(m['recon_chi2'])
  loss = sum(losses) / len(losses)
  metrics = {f'recon_chi2_{inst}': c for inst, c in zip(sorted(recon), chi2)}
  return loss, {**metrics, 'loss_recon': loss}


def _slot_terms(outputs: dict, targets: dict, cfg) -> tuple[jax.Array, dict]:
  oa, ob = outputs['a']['objects'], outputs['b']['objects']
  ta, tb = targets['a']['objects'], targets['b']['objects']
  prob_a = jax.nn.sigmoid(oa['objectness']) if cfg.use_objectness else None
  prob_b = jax.nn.sigmoid(ob['objectness']) if cfg.use_objectness else None
  # Without a predictor (model.predictor.kind 'none') the online slots are the predictions.
  loss_s, m_s = slots.matched_slot_loss(
      oa.get('pred', oa['slots']), ob.get('pred', ob['slots']), ta['slots'], tb['slots'], prob_a, prob_b,
      weight_mode=cfg.slot_weight_mode, active_threshold=cfg.active_threshold)
  d = oa['slots'].shape[-1]
  loss_v, m_v = _vicreg_pair(oa['slots'].reshape(-1, d), ob['slots'].reshape(-1, d), cfg)
  loss_o = 0.0
  for side, o in (('a', oa), ('b', ob)):
    info = slots.slot_information(o['attn'], outputs[side]['token_weights'],
                                  cfg.objectness_scale)
    loss_o = loss_o + 0.5 * slots.objectness_loss(o['objectness'], info)
  total = cfg.slot * loss_s + loss_v + cfg.objectness * loss_o
  metrics = {**m_s, **m_v, 'loss_slot': loss_s, 'loss_vicreg': loss_v,
             'loss_objectness': loss_o}
  return total, metrics


def _clip_terms(outputs: dict, cfg) -> tuple[jax.Array, dict]:
  emb = outputs['clip']
  insts = sorted(emb)
  if len(insts) < 2:
    raise ValueError(f'clip needs chips of two instruments, got {insts}')
  losses, metrics = [], []
  for i, j in itertools.combinations(insts, 2):
    loss, m = ntxent.nt_xent(emb[i]['embedding'], emb[j]['embedding'], cfg.temperature,
                             intra_view_negatives=cfg.intra_view_negatives)
    losses.append(loss)
    metrics.append(m)
  k = len(losses)
  loss = sum(losses) / k
  metrics = jax.tree.map(lambda *x: sum(x) / k, *metrics)
  return loss, {**metrics, 'loss_ntxent': loss}


def total_loss(outputs: dict, targets: Optional[dict], batch: dict,
               config: ml_collections.ConfigDict, *,
               shift_true: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """Total loss and metrics of the configured variant (module docstring).

  Args:
    outputs: online outputs, ``model.apply({'params': params}, batch)``.
    targets: target outputs ``model.apply({'params': ema_params}, batch['pairs'],
      method=JAISP.encode)`` (stop-gradient is applied here); None for clip,
      masked_band, and two_view without EMA.
    batch: the batch (its pair masks give the target coverage of each token).
    config: the experiment config (uses ``config.model.variant`` and ``config.loss``).
    shift_true: (P, 2) applied shifts in mas, when the shift auxiliary is on.

  Returns:
    (loss, metrics): float32 scalars; ``loss_<term>`` for each unweighted term.
  """
  variant = config.model.variant
  cfg = config.loss
  if targets is not None:
    targets = jax.lax.stop_gradient(targets)
  if variant in ('jepa', 'two_view'):
    use_ema = variant == 'jepa' or cfg.two_view_ema
    loss, metrics = _token_terms(outputs, targets, batch, cfg, use_ema)
    if 'shift_pred' in outputs:
      if shift_true is None:
        raise ValueError('the model predicts a shift but no shift_true was given')
      l_s, m_s = _shift_term(outputs, shift_true, cfg)
      loss, metrics = loss + cfg.shift * l_s, {**metrics, **m_s}
    if 'recon' in outputs:
      l_r, m_r = _recon_term(outputs['recon'], cfg)
      loss, metrics = loss + cfg.recon * l_r, {**metrics, **m_r}
  elif variant == 'detr_jepa':
    loss, metrics = _slot_terms(outputs, targets, cfg)
  elif variant == 'clip':
    loss, metrics = _clip_terms(outputs, cfg)
    loss = cfg.ntxent * loss
  elif variant == 'masked_band':
    loss, metrics = _recon_term(outputs['recon'], cfg)
    loss = cfg.recon * loss
  else:
    raise ValueError(f'unknown variant {variant!r}')
  return loss, metrics


def needs_target(config: ml_collections.ConfigDict) -> bool:
  """Whether the variant's loss uses the EMA target branch."""
  v = config.model.variant
  return v in ('jepa', 'detr_jepa') or (v == 'two_view' and config.loss.two_view_ema)


def make_loss_fn(model: Any, config: ml_collections.ConfigDict, registry: Any
                 ) -> Callable[..., tuple[jax.Array, dict]]:
  """``loss_fn(params, ema_params, batch, rng) -> (loss, metrics)`` for `train.step`.

  Applies the shift augmentation (when ``config.model.shift.enabled``) once, so the
  online and target branches see the same shifted pairs; runs the online model with
  ``params`` and, if the variant needs it, the target encoder with ``ema_params``
  (under stop-gradient); then `total_loss`.
  """
  use_target = needs_target(config)
  shift_on = config.model.variant == 'jepa' and config.model.shift.enabled

  def loss_fn(params, ema_params, batch, rng):
    shift_rng, mask_rng = jax.random.split(rng)
    shift_true = None
    if shift_on:
      pairs, shift_true = shift_model.shift_pairs(batch['pairs'], shift_rng, registry,
                                                  config.model.shift.max_mas)
      batch = {**batch, 'pairs': pairs}
    outputs = model.apply({'params': params}, batch, rngs={'mask': mask_rng})
    targets = None
    if use_target:
      targets = model.apply({'params': ema_params}, batch['pairs'],
                            method=jaisp_model.JAISP.encode)
    return total_loss(outputs, targets, batch, config, shift_true=shift_true)

  return loss_fn
