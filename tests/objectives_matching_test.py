"""linear_sum_assignment: scipy's optimum and output contract, under jit and vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from jaisp_jax.objectives import matching

# (n, m) shapes: square, wide (n < m), tall (n > m), degenerate single row/column.
SHAPES = [(1, 6), (6, 1), (5, 5), (8, 8), (4, 9), (12, 12), (11, 7)]
PER_SHAPE = 75  # 525 matrices in all


def _random_costs(rng, n, m, count):
  """A third continuous, a third small integers (many ties), a third repeated values."""
  k = count // 3
  cont = rng.normal(size=(k, n, m)) * rng.uniform(0.1, 100.0, size=(k, 1, 1))
  ints = rng.integers(-3, 4, size=(k, n, m)).astype(np.float64)
  rep = rng.choice([0.0, 0.25, 1.0], size=(count - 2 * k, n, m))
  return np.concatenate([cont, ints, rep]).astype(np.float32)


def _check_contract(cost, rows, cols):
  n, m = cost.shape
  k = min(n, m)
  assert rows.shape == cols.shape == (k,)
  assert np.all(np.diff(rows) > 0), rows  # sorted, distinct
  assert len(set(cols.tolist())) == k  # distinct columns
  assert rows.min() >= 0 and rows.max() < n and cols.min() >= 0 and cols.max() < m
  if n <= m:
    np.testing.assert_array_equal(rows, np.arange(n))


@pytest.mark.parametrize('n,m', SHAPES)
def test_vmapped_jit_matches_scipy_optimal_cost(n, m):
  rng = np.random.default_rng(1000 * n + m)
  costs = _random_costs(rng, n, m, PER_SHAPE)  # (K, n, m)
  solve = jax.jit(jax.vmap(matching.linear_sum_assignment))
  rows, cols = map(np.asarray, solve(jnp.asarray(costs)))
  assert rows.dtype == np.int32 and cols.dtype == np.int32
  for c, r, cc in zip(costs, rows, cols):
    _check_contract(c, r, cc)
    sr, sc = scipy.optimize.linear_sum_assignment(c.astype(np.float64))
    want = c.astype(np.float64)[sr, sc].sum()
    got = c.astype(np.float64)[r, cc].sum()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * np.abs(c).max())


def test_integer_costs_unbatched_jit_exact():
  rng = np.random.default_rng(7)
  solve = jax.jit(matching.linear_sum_assignment)
  for _ in range(20):
    c = rng.integers(0, 50, size=(10, 13)).astype(np.int32)
    for cost in (c, c.T):
      r, cc = map(np.asarray, solve(jnp.asarray(cost)))
      _check_contract(cost, r, cc)
      sr, sc = scipy.optimize.linear_sum_assignment(cost)
      assert cost[r, cc].sum() == cost[sr, sc].sum()


def test_leading_batch_axes_equal_vmap_and_unique_optimum_equals_scipy_pairs():
  # Continuous random costs have a unique optimum: the pairs themselves must agree.
  rng = np.random.default_rng(3)
  costs = rng.random((2, 3, 6, 9)).astype(np.float32)
  rows, cols = map(np.asarray, jax.jit(matching.linear_sum_assignment)(costs))
  assert rows.shape == cols.shape == (2, 3, 6)
  single = jax.jit(matching.linear_sum_assignment)
  for idx in np.ndindex(2, 3):
    sr, sc = scipy.optimize.linear_sum_assignment(costs[idx])
    np.testing.assert_array_equal(rows[idx], sr)
    np.testing.assert_array_equal(cols[idx], sc)
    r1, c1 = map(np.asarray, single(costs[idx]))
    np.testing.assert_array_equal(c1, cols[idx])


def test_maximize_and_forbidden_entries():
  rng = np.random.default_rng(4)
  c = rng.random((6, 8)).astype(np.float32)
  solve_max = jax.jit(lambda x: matching.linear_sum_assignment(x, maximize=True))
  r, cc = map(np.asarray, solve_max(c))
  sr, sc = scipy.optimize.linear_sum_assignment(c, maximize=True)
  np.testing.assert_allclose(c[r, cc].sum(), c[sr, sc].sum(), rtol=1e-6)
  # +inf marks a forbidden pair (scipy's convention); a feasible optimum avoids them.
  c = rng.random((7, 7)).astype(np.float32)
  c[rng.random((7, 7)) < 0.4] = np.inf
  np.fill_diagonal(c, 5.0)  # keeps the problem feasible
  r, cc = map(np.asarray, jax.jit(matching.linear_sum_assignment)(c))
  sr, sc = scipy.optimize.linear_sum_assignment(c)
  assert np.all(np.isfinite(c[r, cc]))
  np.testing.assert_allclose(c[r, cc].sum(), c[sr, sc].sum(), rtol=1e-6)


def test_non_finite_costs_terminate_with_a_valid_assignment():
  c = np.full((1, 1), np.inf, np.float32)
  r, cc = map(np.asarray, jax.jit(matching.linear_sum_assignment)(c))
  _check_contract(c, r, cc)
  c = np.full((5, 5), np.nan, np.float32)
  c[0, 0] = 1.0
  r, cc = map(np.asarray, jax.jit(matching.linear_sum_assignment)(c))
  _check_contract(c, r, cc)


def test_no_host_callback_and_traced_once_for_many_batches():
  calls = chex.assert_max_traces(n=1)(matching.linear_sum_assignment)
  fn = jax.jit(calls)
  rng = np.random.default_rng(5)
  for _ in range(3):
    jax.block_until_ready(fn(jnp.asarray(rng.random((4, 5, 5)), jnp.float32)))
  jaxpr = str(jax.make_jaxpr(matching.linear_sum_assignment)(jnp.ones((2, 4, 4))))
  assert 'callback' not in jaxpr


def test_permutation_matrix():
  rows = jnp.array([0, 1, 2])
  cols = jnp.array([2, 0, 3])
  p = np.asarray(matching.permutation_matrix(rows, cols, 3, 4))
  want = np.zeros((3, 4))
  want[[0, 1, 2], [2, 0, 3]] = 1
  np.testing.assert_array_equal(p, want)


def test_x64_mode_solves_float64_exactly_and_float32_mode_warns_for_float64():
  # Costs 1e6 + small offsets: distinct in float64, rounded together in float32.
  rng = np.random.default_rng(3)
  cost = 1e6 + rng.random((12, 12)) * 1e-2
  sr, sc = scipy.optimize.linear_sum_assignment(cost)
  with jax.enable_x64(True):
    r, c = matching.linear_sum_assignment(cost)
    ri, ci = matching.linear_sum_assignment(rng.integers(0, 5, (6, 9)).astype(np.int32))
  assert np.asarray(r).dtype == np.int32 and np.asarray(ri).dtype == np.int32
  assert cost[np.asarray(r), np.asarray(c)].sum() == pytest.approx(cost[sr, sc].sum(), abs=1e-9)
  np.testing.assert_array_equal(np.asarray(c), sc)  # a unique optimum: scipy's pairs
  assert len(np.asarray(ci)) == 6
  with pytest.warns(UserWarning, match='float64 costs are solved in float32'):
    matching.linear_sum_assignment(cost)


@pytest.mark.parametrize('maximize', [False, True])
def test_eager_refuses_what_scipy_refuses_and_accepts_feasible_forbidden_pairs(maximize):
  forbid = -np.inf if maximize else np.inf
  bad = np.inf if maximize else -np.inf  # scipy's invalid infinity for this direction
  rng = np.random.default_rng(8)
  refused = {
      'NaN': np.where(np.eye(4, 5, 1) > 0, np.nan, rng.random((4, 5))),
      'invalid inf': np.where(np.eye(4, 5) > 0, bad, rng.random((4, 5))),
      'forbidden row': np.vstack([np.full((1, 5), forbid), rng.random((3, 5))]),
      'forbidden column (tall)': np.hstack([np.full((3, 1), forbid), np.ones((3, 1))]),
      'all forbidden 1x1': np.full((1, 1), forbid),
      'two rows need one column': np.array([[1.0, forbid, forbid], [2.0, forbid, forbid]]),
  }
  for name, cost in refused.items():
    cost = cost.astype(np.float32)
    with pytest.raises(ValueError):  # scipy refuses it ...
      scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
    with pytest.raises(ValueError, match='invalid numeric entries|infeasible'):  # ... and so do we
      matching.linear_sum_assignment(cost, maximize=maximize)
  # Forbidden pairs with a feasible all-finite assignment: scipy's optimum, no error.
  cost = rng.random((6, 6)).astype(np.float32)
  cost[rng.random((6, 6)) < 0.4] = forbid
  np.fill_diagonal(cost, 0.5)
  r, c = map(np.asarray, matching.linear_sum_assignment(cost, maximize=maximize))
  sr, sc = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
  assert np.all(np.isfinite(cost[r, c]))
  np.testing.assert_allclose(cost[r, c].sum(), cost[sr, sc].sum(), rtol=1e-6)


def test_eager_infeasible_batch_names_the_matrix_and_traced_returns_a_detectable_answer():
  costs = np.random.default_rng(9).random((3, 4, 4)).astype(np.float32)
  costs[2, :, 1:] = np.inf  # matrix 2: four rows, one allowed column
  with pytest.raises(ValueError, match=r'infeasible \(matrix \(2,\) of the batch\)'):
    matching.linear_sum_assignment(costs)
  # Under jit it cannot raise: a valid assignment, flagged by its non-finite cost.
  r, c = map(np.asarray, jax.jit(matching.linear_sum_assignment)(costs))
  for b in range(3):
    _check_contract(costs[b], r[b], c[b])
  finite = [bool(np.isfinite(costs[b][r[b], c[b]]).all()) for b in range(3)]
  assert finite == [True, True, False]


@pytest.mark.parametrize('cost', [
    np.array([[3_000_000_000, 0, 5], [0, 3_000_000_000, 7], [1, 2, 3]], np.int64),
    np.array([[-128, 2], [3, 4]], np.int8),
    np.array([[0, 255], [255, 254]], np.uint8),
    np.array([[True, False, False], [False, True, True]]),
])
@pytest.mark.parametrize('maximize', [False, True])
def test_integer_and_bool_costs_never_wrap(cost, maximize):
  # int64 beyond int32 (JAX would wrap it to int32), -int8(-128) and -uint8 (wrap when
  # negated for maximize), -bool (undefined): scipy's optimum, eagerly and under jit.
  sr, sc = scipy.optimize.linear_sum_assignment(cost, maximize=maximize)
  want = cost.astype(np.float64)[sr, sc].sum()
  r, c = map(np.asarray, matching.linear_sum_assignment(cost, maximize=maximize))
  assert cost.astype(np.float64)[r, c].sum() == want
  if cost.dtype != np.int64:  # jnp.asarray itself wraps int64 without jax_enable_x64
    solve = jax.jit(lambda x: matching.linear_sum_assignment(x, maximize=maximize))
    r, c = map(np.asarray, solve(jnp.asarray(cost)))
    assert cost.astype(np.float64)[r, c].sum() == want


def test_costs_near_float32_max_with_forbidden_pairs_stay_optimal():
  # The forbidden fill (2 k max|cost| + 1) overflowed to inf here: suboptimal answers,
  # even ones that used a forbidden pair.
  rng = np.random.default_rng(10)
  solve = jax.jit(matching.linear_sum_assignment)
  checked = 0
  for n, m in [(4, 4), (6, 6), (3, 5), (5, 3)] * 10:
    cost = (rng.uniform(-1, 1, (n, m)) * 3e38).astype(np.float32)
    cost[rng.random(cost.shape) < 0.3] = np.inf
    try:
      sr, sc = scipy.optimize.linear_sum_assignment(cost)
    except ValueError:  # infeasible
      continue
    r, c = map(np.asarray, solve(cost))
    c64 = cost.astype(np.float64)
    assert np.all(np.isfinite(cost[r, c]))
    np.testing.assert_allclose(c64[r, c].sum(), c64[sr, sc].sum(), rtol=1e-5)
    checked += 1
  assert checked >= 30


def test_non_numeric_costs_are_a_type_error_and_eager_calls_compile_once():
  for bad in (np.array([[1 + 1j, 2], [3, 4]]), np.array([['a', 'b'], ['c', 'd']])):
    with pytest.raises(TypeError, match='cost must hold real numbers'):
      matching.linear_sum_assignment(bad)
  rng = np.random.default_rng(11)
  matching.linear_sum_assignment(rng.random((7, 3)).astype(np.float32))
  size = matching._solve._cache_size()
  for _ in range(3):  # eager calls reuse the compiled solver (they used to recompile)
    matching.linear_sum_assignment(rng.random((7, 3)).astype(np.float32))
  assert matching._solve._cache_size() == size
