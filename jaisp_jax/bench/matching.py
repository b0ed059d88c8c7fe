"""Batched linear assignment: in-graph JAX (ours, optax) vs scipy on the host.

Solves a batch of random (size x size) cost matrices (uniform [0, 1), float32) and
reports, per method, the median and minimum wall time over `reps` warm calls (jitted
functions are compiled and run once first) and a check: every method's total cost
must equal scipy's. The in-graph methods are what the DETR-JEPA train step runs (no
host round trip); scipy is the host baseline a step could only reach through a
callback.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy
import scipy.optimize

from jaisp_jax.objectives import matching


def _times_ms(fn, reps: int) -> tuple[float, float]:
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


def run(batch: int = 64, size: int = 100, reps: int = 9, seed: int = 0,
        log=print) -> dict[str, Any]:
  """Times the methods (module docstring); returns {method: figures}."""
  rng = np.random.default_rng(seed)
  costs = rng.random((batch, size, size)).astype(np.float32)
  dev_costs = jax.device_put(costs)
  want = np.array([costs[b][scipy.optimize.linear_sum_assignment(costs[b])].sum()
                   for b in range(batch)])
  log(f'jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} '
      f'devices), optax {optax.__version__}, scipy {scipy.__version__}; batch of {batch} '
      f'cost matrices {size}x{size}, median of {reps} warm calls')
  out: dict[str, Any] = {'batch': batch, 'size': size, 'reps': reps}
  methods = {
      'jaisp linear_sum_assignment (jit, batched)': jax.jit(matching.linear_sum_assignment),
      'optax hungarian_algorithm (jit+vmap)': jax.jit(jax.vmap(_optax_sorted)),
  }
  for name, fn in methods.items():
    t0 = time.perf_counter()
    rows, cols = jax.block_until_ready(fn(dev_costs))
    first = time.perf_counter() - t0
    rows, cols = np.asarray(rows), np.asarray(cols)
    got = np.array([costs[b][rows[b], cols[b]].sum() for b in range(batch)])
    err = float(np.max(np.abs(got - want)))
    med, best = _times_ms(lambda: jax.block_until_ready(fn(dev_costs)), reps)
    out[name] = dict(median_ms=med, min_ms=best, compile_first_s=first, max_cost_error=err)
    log(f'{name:45s} median {med:8.1f} ms  min {best:8.1f} ms  (compile+first {first:5.1f} s, '
        f'max |cost - scipy| {err:.1e})')
  med, best = _times_ms(lambda: [scipy.optimize.linear_sum_assignment(c) for c in costs], reps)
  out['scipy linear_sum_assignment (host loop)'] = dict(median_ms=med, min_ms=best)
  log(f'{"scipy linear_sum_assignment (host loop)":45s} median {med:8.1f} ms  '
      f'min {best:8.1f} ms')
  its = np.asarray(jax.jit(matching.assignment_iterations)(dev_costs))
  out['solver_iterations_mean'] = float(its.mean())
  out['solver_iterations_max'] = int(its.max())
  log(f'jaisp solver loop iterations per matrix: mean {its.mean():.0f}, max {its.max()} '
      f'(the batch runs max)')
  return out
