"""Parameter counts and FLOPs per sample of every model variant (no timing).

    python launch/bench_models.py                       # seed default sizes, ~5-10 min on 2 CPUs
    python launch/bench_models.py --variants jepa --combos rubin-rubin

Sizes are the seeds' defaults: embed 256, depth 6, 8 heads, 3.2" tokens (patch 16 on
Rubin's 0.2"/px, 32 on Euclid's 0.1"/px), per-token MLP predictor 256 -> 1024 -> 256;
clip: per-instrument ViTs of 6 layers, 6 heads, width 384, projection to 256. The
crop is 25.6" (Rubin 128 x 128 px, Euclid 256 x 256 px: the PyTorch reference's
default 128 x 128 input, 64 tokens).

FLOPs come from XLA's cost analysis of the compiled program
(``jax.jit(f).lower(...).compile().cost_analysis()['flops']``) where f is the
gradient of a scalar that touches every output (so the backward pass covers every
head); the target branch (EMA encoder, forward only) is counted separately for the
variants that have one. A pair variant's sample is one pair of views of the given
instrument combination; a chip variant's sample is one sky patch with all bands of
both instruments.
"""

from __future__ import annotations

import argparse
import sys
import time

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


def count(tree) -> int:
  return jaisp.count_params(tree)


def flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax returned one dict per device
    cost = cost[0]
  return float(cost['flops'])


def proxy_loss(out) -> jax.Array:
  """A scalar that depends on every floating output (sum of mean squares)."""
  return sum(jnp.mean(jnp.square(x)) for x in jax.tree.leaves(out)
             if jnp.issubdtype(x.dtype, jnp.floating))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--variants', default=','.join(PAIR_VARIANTS + CHIP_VARIANTS))
  parser.add_argument('--combos', default='rubin-rubin,rubin-euclid,euclid-euclid')
  parser.add_argument('--crop-arcsec', type=float, default=25.6)
  parser.add_argument('--batch', type=int, default=2, help='samples per compiled program')
  args = parser.parse_args(argv)
  reg = bands.default_registry()
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; crop {args.crop_arcsec}"; '
        f'FLOPs per sample from {args.batch}-sample programs', flush=True)
  for variant in args.variants.split(','):
    cfg = seed_config(variant)
    model = jaisp.JAISP(cfg, reg)
    rng = jax.random.key(0)
    if variant in CHIP_VARIANTS:
      cases = [('chips', {'chips': batch_lib.synthetic_chips_batch(0, reg, args.batch,
                                                                   args.crop_arcsec)})]
    else:
      cases = [(combo, {'pairs': batch_lib.synthetic_pairs_batch(
          0, reg, {combo: args.batch}, args.crop_arcsec)}) for combo in args.combos.split(',')]
    # Parameters from the abstract init (no compute); the pair variants' parameters do
    # not depend on the batch, so any case's batch will do.
    full = {'pairs': batch_lib.synthetic_pairs_batch(0, reg, {'rubin-euclid': 1},
                                                     args.crop_arcsec),
            'chips': batch_lib.synthetic_chips_batch(0, reg, 1, args.crop_arcsec)}
    shapes = jax.eval_shape(model.init, rng, full)
    params = shapes['params']
    parts = ', '.join(f'{k} {count(v):,}' for k, v in params.items())
    print(f'\n[{variant}] parameters {count(params):,} ({parts})', flush=True)
    variables = jax.jit(model.init)(rng, full)
    for name, batch in cases:
      t0 = time.time()

      def step(v, b):
        return jax.grad(lambda v: proxy_loss(model.apply(v, b, rngs={'mask': rng})))(v)

      f_online = flops(step, variables, batch) / args.batch
      line = f'  {name:14s} online fwd+bwd {f_online / 1e9:8.2f} GFLOP/sample'
      if variant in PAIR_VARIANTS:
        f_target = flops(lambda v, p: model.apply(v, p, method=jaisp.JAISP.encode),
                         variables, batch['pairs']) / args.batch
        line += (f'   target fwd {f_target / 1e9:7.2f}   step total '
                 f'{(f_online + f_target) / 1e9:7.2f} GFLOP/sample')
      print(f'{line}   ({time.time() - t0:.0f} s to compile)', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
