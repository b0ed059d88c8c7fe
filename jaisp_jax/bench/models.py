"""Parameter counts and compiled FLOPs per sample of every model variant (no timing).

Sizes are the seeds' defaults: embed 256, depth 6, 8 heads, 3.2" tokens (patch 16 on
Rubin's 0.2"/px, 32 on Euclid's 0.1"/px), per-token MLP predictor 256 -> 1024 -> 256;
clip: per-instrument ViTs of 6 layers, 6 heads, width 384, projection to 256. The
default crop is 25.6" (Rubin 128 x 128 px, Euclid 256 x 256 px: the PyTorch
reference's 128 x 128 input, 64 tokens).

FLOPs come from XLA's cost analysis of the compiled program, where the function is
the gradient of a scalar that touches every output (so the backward pass covers every
head); the target branch (EMA encoder, forward only) is counted separately for the
variants that have one. A pair variant's sample is one pair of views of the given
instrument combination; a chip variant's sample is one sky patch with all bands of
both instruments. (`step` counts the whole train step of a config instead.)
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import jaisp

PAIR_VARIANTS = ('jepa', 'two_view', 'detr_jepa')
CHIP_VARIANTS = ('clip', 'masked_band')


def seed_config(variant: str) -> ml_collections.FrozenConfigDict:
  c = jaisp.default_model_config()  # defaults are the seeds' sizes
  c.variant = variant
  if variant == 'two_view':
    c.predictor.kind = 'none'
  return ml_collections.FrozenConfigDict(c)


def flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops'])


def proxy_loss(out) -> jax.Array:
  """A scalar that depends on every floating output (sum of mean squares)."""
  return sum(jnp.mean(jnp.square(x)) for x in jax.tree.leaves(out)
             if jnp.issubdtype(x.dtype, jnp.floating))


def run(variants: list[str], combos: list[str], crop_arcsec: float = 25.6, batch: int = 2,
        log=print) -> dict[str, Any]:
  """Parameters and GFLOP per sample of each variant (module docstring)."""
  reg = bands.default_registry()
  log(f'jax {jax.__version__} on {jax.devices()[0].platform}; crop {crop_arcsec}"; '
      f'FLOPs per sample from {batch}-sample programs')
  out: dict[str, Any] = {}
  for variant in variants:
    cfg = seed_config(variant)
    model = jaisp.JAISP(cfg, reg)
    rng = jax.random.key(0)
    if variant in CHIP_VARIANTS:
      cases = [('chips', {'chips': batch_lib.synthetic_chips_batch(0, reg, batch, crop_arcsec)})]
    else:
      cases = [(combo, {'pairs': batch_lib.synthetic_pairs_batch(0, reg, {combo: batch},
                                                                 crop_arcsec)})
               for combo in combos]
    # The pair variants' parameters do not depend on the batch: any batch will do.
    full = {'pairs': batch_lib.synthetic_pairs_batch(0, reg, {'rubin-euclid': 1}, crop_arcsec),
            'chips': batch_lib.synthetic_chips_batch(0, reg, 1, crop_arcsec)}
    params = jax.eval_shape(model.init, rng, full)['params']
    parts = ', '.join(f'{k} {jaisp.count_params(v):,}' for k, v in params.items())
    log(f'\n[{variant}] parameters {jaisp.count_params(params):,} ({parts})')
    res: dict[str, Any] = {'parameters': jaisp.count_params(params)}
    variables = jax.jit(model.init)(rng, full)
    for name, b in cases:
      t0 = time.time()

      def grad_fn(v, b):
        return jax.grad(lambda v: proxy_loss(model.apply(v, b, rngs={'mask': rng})))(v)

      f_online = flops(grad_fn, variables, b) / batch
      line = f'  {name:14s} online fwd+bwd {f_online / 1e9:8.2f} GFLOP/sample'
      res[name] = {'online_gflop_per_sample': f_online / 1e9}
      if variant in PAIR_VARIANTS:
        f_target = flops(lambda v, p: model.apply(v, p, method=jaisp.JAISP.encode),
                         variables, b['pairs']) / batch
        res[name]['target_gflop_per_sample'] = f_target / 1e9
        line += (f'   target fwd {f_target / 1e9:7.2f}   step total '
                 f'{(f_online + f_target) / 1e9:7.2f} GFLOP/sample')
      log(f'{line}   ({time.time() - t0:.0f} s to compile)')
    out[variant] = res
  return out
