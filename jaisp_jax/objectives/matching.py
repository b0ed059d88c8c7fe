"""Jittable linear assignment: `linear_sum_assignment(cost)` with scipy's contract.

The DETR-JEPA objective matches the object slots of two views inside the jitted train
step, so the assignment must be traced JAX (no host callback, no scipy at training
time), vmap-able over the batch, and exact: it returns an optimal assignment, the same
as ``scipy.optimize.linear_sum_assignment`` up to ties (equal total cost).

Algorithm: the shortest augmenting path method (Jonker-Volgenant / Crouse 2016, the
one scipy uses), started from a row-reduction partial assignment (JV's cheapest
initialisation: ``u_i = min_j C_ij``, each row takes its argmin column when no earlier
row claimed it; about 63 % of the rows of a random square matrix are matched before any
search). Dual feasibility ``C_ij - u_i - v_j >= 0`` with tight matched edges is kept
throughout, so the result is optimal.

Why not ``optax.assignment.hungarian_algorithm`` (installed, also exact)? Its outer
``scan`` over rows holds an inner ``while_loop`` per row; under ``vmap`` every row
waits for the slowest matrix of the batch (sum over rows of the batch maximum). Here
the whole solve is ONE ``while_loop`` over a per-matrix state machine (one Dijkstra
step or one augmentation step per iteration), so under ``vmap`` the iteration count is
the maximum over the batch of each matrix's own total, and the row-reduction start
removes most of the work. ``launch/bench_matching.py`` prints both against scipy.
optax's outputs are also not in scipy's order (square: rows permuted, columns sorted;
n < m: rows descending), which this module's contract fixes.

Sinkhorn (entropic OT) is deliberately not offered: the assignment is used under
``stop_gradient`` (we want the exact argmin, not a differentiable relaxation), and an
entropic plan is neither a permutation nor scipy's answer.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np

# Phases of the per-matrix state machine.
_SEARCH, _AUGMENT, _DONE = 0, 1, 2


def _sanitise(cost: jax.Array) -> jax.Array:
  """Float costs with non-finite entries replaced by a prohibitive finite value.

  scipy raises on NaN/-inf and treats +inf as forbidden; inside jit we cannot raise,
  and a NaN in the search could loop forever. A forbidden entry gets
  ``2 k max|finite| + 1`` (k = min(n, m)), larger than any all-finite assignment's
  total can make up for, so it is used only when no all-finite assignment exists.
  """
  dtype = jnp.result_type(cost.dtype, jnp.float32)
  cost = cost.astype(dtype)
  finite = jnp.isfinite(cost)
  big = jnp.max(jnp.where(finite, jnp.abs(cost), 0.0))
  # Huge costs are scaled by a power of two (exact) to max|finite| <= 2**64, so that
  # the fill and the duals cannot overflow; costs below 2**64 are left as they are.
  shift = jnp.maximum(jnp.frexp(big)[1] - 64, 0)
  scale = jnp.ldexp(jnp.ones((), dtype), -shift)
  cost, big = cost * scale, big * scale
  fill = 2.0 * min(cost.shape) * big + 1.0
  return jnp.where(finite, cost, fill).astype(dtype)


def _pick(values: jax.Array, index: jax.Array) -> jax.Array:
  """values[index] as a masked sum: a select fuses with its neighbours under vmap,
  where a gather would not."""
  hit = jnp.arange(values.shape[0], dtype=jnp.int32) == index
  # dtype: under jax_enable_x64 a sum of int32 would otherwise come out int64.
  return jnp.sum(jnp.where(hit, values, jnp.zeros_like(values)), dtype=values.dtype)


def _first(mask: jax.Array) -> jax.Array:
  """Index of the first True of a 1-D mask (its length if none): a plain min
  reduction, because XLA:CPU runs argmin/argmax (a variadic reduce) serially per
  batch element under vmap (measured ~46 us vs ~4 us for min on (64, 100))."""
  idx = jnp.arange(mask.shape[0], dtype=jnp.int32)
  return jnp.min(jnp.where(mask, idx, mask.shape[0]))


def _solve_wide(cost: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Optimal assignment of every row of an (n, m) cost with n <= m.

  Returns col4row (n,) int32 and the number of loop iterations (for benchmarks).

  Only the column duals v are stored: a matched row's dual is implied by its tight
  edge, ``u_i = C[i, col4row[i]] - v[col4row[i]]``, and the row being inserted takes
  the largest feasible value ``u = min_j (C_ij - v_j)``. This is Crouse's dual update
  (his row update keeps exactly these edges tight) without any gather of u.
  """
  n, m = cost.shape
  rows = jnp.arange(n, dtype=jnp.int32)  # int32 also under jax_enable_x64 (the loop's
  cols = jnp.arange(m, dtype=jnp.int32)  # carry keeps its indices int32)
  inf = jnp.array(jnp.inf, cost.dtype)

  # Row reduction (u = row minima, v = 0): each row takes its argmin column unless an
  # earlier row claimed it; those edges are tight, so the partial matching is optimal.
  best = jnp.argmin(cost, axis=1)  # (n,)
  claimant = jnp.full((m,), n, jnp.int32).at[best].min(rows.astype(jnp.int32))  # (m,)
  col4row = jnp.where(claimant[best] == rows, best, -1).astype(jnp.int32)  # (n,)
  row4col = jnp.where(claimant < n, claimant, -1).astype(jnp.int32)  # (m,)

  row_min = jnp.min(cost, axis=1)  # (n,)
  # Rows left free, in order, then n's: insertion k works on queue[k].
  n_free = jnp.sum(col4row < 0)
  queue = jnp.sort(jnp.where(col4row < 0, rows, n)).astype(jnp.int32)  # (n,)
  cur = queue[0]
  phase = jnp.where(n_free > 0, _SEARCH, _DONE).astype(jnp.int32)
  fresh = lambda: dict(  # noqa: E731  per-insertion search state
      min_val=jnp.zeros((), cost.dtype),
      spc=jnp.full((m,), jnp.inf, cost.dtype),  # shortest path cost to each column
      path=jnp.full((m,), -1, jnp.int32),  # predecessor row of each column
      sc=jnp.zeros((m,), bool),  # settled columns
      via=jnp.int32(-1))  # column through which row i was reached (-1: i is cur)
  state = dict(
      fresh(), v=jnp.zeros((m,), cost.dtype), col4row=col4row, row4col=row4col,
      cur=cur,  # row being inserted
      i=cur,  # row whose edges the next search step relaxes
      j=jnp.int32(0),  # column being flipped during augmentation
      k=jnp.int32(0),  # insertions done
      phase=phase, it=jnp.int32(0))
  # Each insertion takes at most m search and n augmentation steps: a hard cap makes
  # termination unconditional even if the costs were pathological.
  max_iters = n * (m + n + 2) + 1

  def cond(s):
    return (s['phase'] != _DONE) & (s['it'] < max_iters)

  def search_step(s):
    """One Dijkstra step from row s['i'] (Crouse 2016, Alg. 4)."""
    i, v = s['i'], s['v']
    c = cost[i]  # (m,)
    via = s['via']
    # v <= 0 throughout (it only decreases from 0), so the row minimum keeps the free
    # row's reduced costs >= 0.
    u_i = jnp.where(via < 0, _pick(row_min, i), _pick(c, via) - _pick(v, via))
    r = s['min_val'] + c - u_i - v  # (m,) path cost through row i
    better = ~s['sc'] & (r < s['spc'])
    path = jnp.where(better, i, s['path'])
    spc = jnp.where(better, r, s['spc'])
    key = jnp.where(s['sc'], inf, spc)
    lowest = jnp.min(key)
    # Among the cheapest columns prefer a free one: the search ends sooner (as scipy).
    # One integer min: free columns rank before matched ones, then by index.
    rank = jnp.where(key == lowest, cols + jnp.where(s['row4col'] < 0, 0, m), 2 * m)
    j = (jnp.min(rank) % m).astype(jnp.int32)
    sc = s['sc'] | (cols == j)
    owner = _pick(s['row4col'], j)
    found = owner < 0
    # Reaching a free column ends the search: lower v on the settled columns.
    v = jnp.where(found & sc, v - (lowest - spc), v)
    return dict(
        s, sc=sc, spc=spc, path=path, min_val=lowest, v=v, j=j,
        i=jnp.where(found, i, owner), via=j,
        phase=jnp.where(found, _AUGMENT, _SEARCH).astype(jnp.int32))

  def augment_step(s):
    """Flip one edge of the augmenting path, walking back from the free column."""
    j = s['j']
    i = _pick(s['path'], j)
    row4col = jnp.where(cols == j, i, s['row4col'])
    prev_col = _pick(s['col4row'], i)
    col4row = jnp.where(rows == i, j, s['col4row'])
    finished = i == s['cur']
    k = s['k'] + finished.astype(jnp.int32)
    nxt = _pick(queue, k)  # 0 past the end (then phase is _DONE)
    out = dict(s, row4col=row4col, col4row=col4row, j=prev_col)
    reset = dict(out, **fresh(), cur=nxt, i=nxt, k=k)
    out = jax.tree.map(lambda a, b: jnp.where(finished, a, b), reset, out)
    out['phase'] = jnp.where(
        finished, jnp.where(k < n_free, _SEARCH, _DONE), _AUGMENT
    ).astype(jnp.int32)
    return out

  def body(s):
    # Both branches are cheap vector ops; under vmap a lax.cond would become a select
    # of both anyway, so select explicitly.
    a, b = search_step(s), augment_step(s)
    out = jax.tree.map(lambda x, y: jnp.where(s['phase'] == _SEARCH, x, y), a, b)
    out['it'] = s['it'] + 1
    return out

  s = jax.lax.while_loop(cond, body, state)
  return s['col4row'], s['it']


def _assign(cost: jax.Array, maximize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Single (n, m) matrix -> (row_ind, col_ind, iterations)."""
  n, m = cost.shape
  k = min(n, m)
  if k == 0:
    empty = jnp.zeros((0,), jnp.int32)
    return empty, empty, jnp.int32(0)
  # Float before negating: -uint8, -int8(-128) would wrap and -bool is not defined.
  cost = cost.astype(jnp.result_type(cost.dtype, jnp.float32))
  cost = _sanitise(-cost if maximize else cost)
  if n <= m:
    col4row, it = _solve_wide(cost)
    return jnp.arange(n, dtype=jnp.int32), col4row, it
  # Tall: solve the transpose (every column gets a row), then list rows in order.
  row4col, it = _solve_wide(cost.T)  # (m,)
  order = jnp.argsort(row4col).astype(jnp.int32)
  return row4col[order], order, it


def linear_sum_assignment(cost: jax.Array, maximize: bool = False
                          ) -> tuple[jax.Array, jax.Array]:
  """Optimal linear assignment, jittable and batched; scipy's contract.

  Solves ``min_X sum_ij C_ij X_ij`` over 0/1 matrices X with at most one 1 per row and
  per column and ``min(n, m)`` ones in total (``max`` if ``maximize``).

  Args:
    cost: (..., n, m) costs; leading axes are a batch (solved independently, as
      ``jax.vmap`` would). Solved in float32, or in float64 under ``jax_enable_x64``
      (without it JAX holds a float64 array as float32, so costs that differ only
      below float32's ~1e-7 relative precision can give a costlier assignment than
      scipy's: a float64 NumPy input then warns). Integer costs: exact below 2**24.
      Costs below float32's smallest normal (~1.2e-38) are flushed to zero by XLA
      (rescale such costs first).
      Non-finite entries, as in scipy: +inf (-inf if ``maximize``) marks a forbidden
      pair; called on concrete arrays it raises ValueError, as scipy does, on NaN or
      -inf (+inf if ``maximize``) entries and when every assignment needs a forbidden
      pair ('cost matrix is infeasible'). Traced (under jit / vmap) it cannot raise:
      every non-finite entry is then treated as forbidden (see `_sanitise`) and an
      infeasible matrix still gets a valid assignment that uses some; detect it with
      ``~jnp.isfinite(cost[..., row_ind, col_ind]).all(-1)``. Complex or non-numeric
      costs raise TypeError.
    maximize: maximise the total instead.

  Returns:
    (row_ind, col_ind), each (..., min(n, m)) int32: row ``row_ind[k]`` is assigned
    column ``col_ind[k]``; ``row_ind`` is sorted ascending (``arange(n)`` when
    n <= m), as in scipy. The optimal cost is ``cost[..., row_ind, col_ind].sum(-1)``.
    With ties the pairs may differ from scipy's; the total cost does not.
  """
  if getattr(cost, 'dtype', None) == np.float64 and not jax.config.jax_enable_x64:
    warnings.warn('linear_sum_assignment: float64 costs are solved in float32 (enable '
                  'jax_enable_x64 for float64); near-equal costs may then be matched '
                  'suboptimally', stacklevel=2)
  host = None if isinstance(cost, jax.core.Tracer) else np.asarray(cost)
  dtype = np.dtype(cost.dtype if host is None else host.dtype)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)
          or dtype == np.bool_):
    raise TypeError(f'linear_sum_assignment: cost must hold real numbers (float, int or '
                    f'bool), got dtype {dtype}')
  if np.ndim(cost) < 2:
    raise ValueError(f'cost must be (..., n, m), got shape {np.shape(cost)}')
  floating = host is not None and jnp.issubdtype(dtype, jnp.floating)
  if floating:
    invalid = np.isnan(host) | (host == (np.inf if maximize else -np.inf))
    if invalid.any():
      where = tuple(int(i) for i in np.argwhere(invalid)[0])
      raise ValueError(f'linear_sum_assignment: cost matrix contains invalid numeric entries '
                       f'(NaN or {"+" if maximize else "-"}inf), e.g. at index {where}; '
                       f'{"-" if maximize else "+"}inf marks a forbidden pair')
  if host is not None and not floating:
    cost = host.astype(np.float64)  # JAX would wrap int64 beyond int32's range
  row_ind, col_ind = _solve(jnp.asarray(cost), maximize)
  if floating and not np.isfinite(host).all():
    rows, cols = np.asarray(row_ind), np.asarray(col_ind)
    picked = np.take_along_axis(np.take_along_axis(host, rows[..., None], -2),
                                cols[..., None], -1)[..., 0]  # (..., k)
    infeasible = ~np.isfinite(picked).all(-1)
    if infeasible.any():
      which = (f' (matrix {tuple(int(i) for i in np.argwhere(infeasible)[0])} of the batch)'
               if infeasible.ndim else '')
      raise ValueError(f'linear_sum_assignment: cost matrix is infeasible{which}: every '
                       f'assignment of {min(host.shape[-2:])} pairs uses a forbidden (inf) '
                       f'entry')
  return row_ind, col_ind


@functools.partial(jax.jit, static_argnames=('maximize',))
def _solve(cost: jax.Array, maximize: bool) -> tuple[jax.Array, jax.Array]:
  # jit here so that eager calls hit a compile cache (the while_loop's body closes over
  # per-call values, so un-jitted calls recompiled it every time); inlined under jit.
  fn = lambda c: _assign(c, maximize)[:2]  # noqa: E731
  for _ in range(cost.ndim - 2):
    fn = jax.vmap(fn)
  return fn(cost)


def assignment_iterations(cost: jax.Array) -> jax.Array:
  """Loop iterations the solver takes per matrix of (..., n, m) `cost` (benchmarks)."""
  fn = lambda c: _assign(c, False)[2]  # noqa: E731
  for _ in range(cost.ndim - 2):
    fn = jax.vmap(fn)
  return fn(jnp.asarray(cost))


def permutation_matrix(row_ind: jax.Array, col_ind: jax.Array, n: int, m: int
                       ) -> jax.Array:
  """(..., n, m) float 0/1 matrix with ones at the assigned (row, col) pairs."""
  rows = jax.nn.one_hot(row_ind, n, dtype=jnp.float32)  # (..., k, n)
  cols = jax.nn.one_hot(col_ind, m, dtype=jnp.float32)  # (..., k, m)
  return jnp.einsum('...kn,...km->...nm', rows, cols)
