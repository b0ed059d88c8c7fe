"""Time batched linear assignment: in-graph JAX (ours, optax) vs scipy on the host.

    python launch/bench_matching.py [--batch 64] [--size 100] [--reps 9] [--seed 0]

Solves a batch of random (size x size) cost matrices (uniform [0, 1), float32) and
prints, per method, the median wall time over ``reps`` warm calls (jitted functions are
compiled and run once before timing) and its checks: every method's total cost must
equal scipy's. The in-graph methods are what the DETR-JEPA train step runs; scipy is
the host baseline (which a train step could only reach through a host callback).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize

from jaisp_jax.objectives import matching


def _median_ms(fn, reps: int) -> tuple[float, float]:
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times), 1e3 * min(times)


def _optax_sorted(cost):
  """optax's answer in scipy's order (it returns rows unsorted; see matching.py)."""
  rows, cols = optax.assignment.hungarian_algorithm(cost)
  order = jnp.argsort(rows)
  return rows[order], cols[order]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--size', type=int, default=100)
  parser.add_argument('--reps', type=int, default=9)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()

  rng = np.random.default_rng(args.seed)
  costs = rng.random((args.batch, args.size, args.size)).astype(np.float32)
  dev_costs = jax.device_put(costs)
  want = np.array([costs[b][scipy.optimize.linear_sum_assignment(costs[b])].sum()
                   for b in range(args.batch)])

  print(f'jax {jax.__version__} on {jax.devices()[0].platform} '
        f'({jax.device_count()} devices), optax {optax.__version__}, '
        f'scipy {scipy.__version__}')
  print(f'batch of {args.batch} cost matrices {args.size}x{args.size}, '
        f'median of {args.reps} warm calls')

  methods = {
      'jaisp linear_sum_assignment (jit, batched)': jax.jit(
          matching.linear_sum_assignment),
      'optax hungarian_algorithm (jit+vmap)': jax.jit(jax.vmap(_optax_sorted)),
  }
  for name, fn in methods.items():
    t0 = time.perf_counter()
    rows, cols = jax.block_until_ready(fn(dev_costs))
    first = time.perf_counter() - t0
    rows, cols = np.asarray(rows), np.asarray(cols)
    got = np.array([costs[b][rows[b], cols[b]].sum() for b in range(args.batch)])
    err = np.max(np.abs(got - want))
    med, best = _median_ms(lambda: jax.block_until_ready(fn(dev_costs)), args.reps)
    print(f'{name:45s} median {med:8.1f} ms  min {best:8.1f} ms  '
          f'(compile+first {first:5.1f} s, max |cost - scipy| {err:.1e})')

  med, best = _median_ms(
      lambda: [scipy.optimize.linear_sum_assignment(c) for c in costs], args.reps)
  print(f'{"scipy linear_sum_assignment (host loop)":45s} median {med:8.1f} ms  '
        f'min {best:8.1f} ms')
  its = np.asarray(jax.jit(matching.assignment_iterations)(dev_costs))
  print(f'jaisp solver loop iterations per matrix: mean {its.mean():.0f}, '
        f'max {its.max()} (the batch runs max)')


if __name__ == '__main__':
  main()
