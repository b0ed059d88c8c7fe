"""Tune the launch parameters of the Pallas stem kernels (models/pallas_conv.py) on a GPU.

Times `conv3x3` (forward + input gradient: the same kernel) and `kernel_grad` at one
stem layer's shape for each setting of the module's launch constants, checks each
setting's values against a float32 im2col reference, prints a table and the fastest
setting, and saves them as JSON. With `--step ARGS...` it then times the train step
(`python -m jaisp_jax.bench step ARGS`) with the fastest setting and, after it, with the
module's defaults, in this process, so the two step figures come from one machine.

    python launch/tune_pallas.py [--groups 256 --size 256 --ci 32 --co 64] [--out F] \\
        [--step --config=configs/jepa.py:pod --steps 10 --warmup 3 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaisp_jax.models import pallas_conv, sample_conv

CONV = {'_TILE_PIXELS': (128, 256, 512), '_NUM_WARPS': (4, 8), '_NUM_STAGES': (2, 3)}
KGRAD = {'_KGRAD_TILE_PIXELS': (256, 512), '_SPLIT': (4, 16), '_KGRAD_CO_MAJOR': (False, True),
         '_KGRAD_NUM_WARPS': (4, 8)}


def _set(setting: dict):
  for k, v in setting.items():
    setattr(pallas_conv, k, v)


def _time(fn, *args, reps=5, rounds=3) -> float:
  jax.block_until_ready(fn(*args))
  out = []
  for _ in range(rounds):
    t = time.perf_counter()
    for _ in range(reps):
      r = fn(*args)
    jax.block_until_ready(r)
    out.append((time.perf_counter() - t) / reps * 1e3)
  return statistics.median(out)


def _rel(a, b) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def tune(groups, size, ci, co, log=print) -> dict:
  ks = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(ks[0], (groups, size, size, ci), jnp.bfloat16)
  k = (0.1 * jax.random.normal(ks[1], (groups, 3, 3, ci, co))).astype(jnp.bfloat16)
  dz = jax.random.normal(ks[2], (groups, size, size, co), jnp.bfloat16)
  n = min(groups, 8)
  f32 = lambda a: a[:n].astype(jnp.float32)
  ref_y = jax.jit(sample_conv.conv3x3_im2col)(f32(x), f32(k))
  # x and dz as arguments, not closed over: XLA would constant-fold them (GBs)
  ref_k = jax.jit(jax.grad(lambda kk, xx, dd: jnp.sum(sample_conv.conv3x3_im2col(xx, kk) * dd)))(
      f32(k), f32(x), f32(dz))
  defaults = {name: getattr(pallas_conv, name) for name in {**CONV, **KGRAD}}
  results = {'shape': [groups, size, size, ci, co], 'defaults': defaults, 'conv': [], 'kgrad': []}
  # part -> (its launch constants, the kernel, its second argument, the reference)
  parts = {'conv': (CONV, pallas_conv.conv3x3, k, ref_y),
           'kgrad': (KGRAD, pallas_conv.kernel_grad, dz, ref_k)}
  for part, (space, fn, arg, ref) in parts.items():
    for values in itertools.product(*space.values()):
      setting = dict(zip(space, values))
      _set({**defaults, **setting})
      try:
        # A fresh function, so it is traced with this setting; lowered once, for both
        # its fingerprint (settings that change the kernels change it: on a GPU all of
        # them, in interpret mode the tiles, split and layout) and the timed program.
        lowered = jax.jit(lambda a, b, fn=fn: fn(a, b)).lower(x, arg)
        program = hashlib.sha1(lowered.as_text().encode()).hexdigest()[:12]
        f = lowered.compile()
        out = f(x, arg)
        row = {**setting, 'ms': _time(f, x, arg), 'rel_err': _rel(out[:n], ref),
               'program': program}
      except Exception as e:  # noqa: BLE001  (a setting Triton refuses is a result too)
        row = {**setting, 'ms': None, 'error': f'{type(e).__name__}: {e}'[:300]}
      log(f'{part:5s} {setting} -> ' + (f"{row['ms']:.2f} ms, rel err {row['rel_err']:.1e}"
                                         if row['ms'] else row['error']))
      results[part].append(row)
  _set(defaults)
  best = {}
  for part, (space, *_) in parts.items():
    ok = [r for r in results[part] if r.get('ms') and r['rel_err'] < 2e-2]
    if ok:
      b = min(ok, key=lambda r: r['ms'])
      best.update({kk: b[kk] for kk in space})
      dflt = [r for r in ok if all(r[kk] == defaults[kk] for kk in space)]
      log(f'{part}: best {b["ms"]:.2f} ms ({ {kk: b[kk] for kk in space} })'
          + (f', defaults {dflt[0]["ms"]:.2f} ms' if dflt else ''))
  results['best'] = best
  return results


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--groups', type=int, default=256)
  p.add_argument('--size', type=int, default=256)
  p.add_argument('--ci', type=int, default=32)
  p.add_argument('--co', type=int, default=64)
  p.add_argument('--out', default=None)
  p.add_argument('--step', nargs=argparse.REMAINDER, default=None,
                 help='then time `bench step` with these arguments: best setting, then defaults')
  a = p.parse_args(argv)
  res = tune(a.groups, a.size, a.ci, a.co, log=lambda s: print(s, flush=True))
  if a.out:
    with open(a.out, 'w') as f:
      json.dump(res, f, indent=1)
  if a.step is not None:
    from jaisp_jax.bench import __main__ as bench  # pylint: disable=g-import-not-at-top
    for label, setting in (('best', res['best']), ('defaults', res['defaults'])):
      print(f'=== bench step with the {label} setting: {setting}', flush=True)
      _set({**res['defaults'], **setting})
      bench.main(['step'] + a.step)
  return 0


if __name__ == '__main__':
  sys.exit(main())
