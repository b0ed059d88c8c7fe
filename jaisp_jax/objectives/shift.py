"""Sub-pixel shift auxiliary loss for the `jepa` variant (issue 4, "Sub-pixel position").

One view is shifted by a known random sub-pixel amount ``t = (dx, dy)`` in
milliarcseconds; a small head predicts ``p`` from the pair of token grids. The loss is a
robust regression in mas, weighted by how much there is to align::

    e_k = |p_k - t_k| / scale              (scale: mas per loss unit, default 100 mas)
    h   = Huber(e, 1) = e^2/2 if e <= 1 else e - 1/2        summed over (dx, dy)
    L   = sum_k omega_k h_k / sum_k omega_k

``omega`` is the information available for alignment: a tile of empty sky holds no
positional signal, and asking for its shift only teaches the head to output the prior
mean. Predictions may be per sample ((B, 2), omega (B,): e.g. the sum of the pair's
token weights) or per token ((B, N, 2), omega (B, N): the token weights). Huber keeps
the rare mis-predicted blend from dominating; ``scale`` puts typical shifts (tens to
hundreds of mas) at O(1) loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaisp_jax.objectives import jepa


def huber(x: jax.Array, delta: float = 1.0) -> jax.Array:
  """x^2 / 2 for |x| <= delta, delta (|x| - delta / 2) beyond."""
  ax = jnp.abs(x)
  return jnp.where(ax <= delta, 0.5 * jnp.square(x), delta * (ax - 0.5 * delta))


def shift_loss(pred_mas: jax.Array, true_mas: jax.Array, weights: jax.Array, *,
               scale_mas: float = 100.0) -> tuple[jax.Array, dict]:
  """Information-weighted Huber regression of a sub-pixel shift, in mas.

  Args:
    pred_mas: (..., 2) predicted (dx, dy) in mas.
    true_mas: (..., 2) applied (dx, dy) in mas (no gradient).
    weights: (...) non-negative information weights (no gradient).
    scale_mas: mas per unit of the Huber argument.

  Returns:
    (loss, metrics): ``shift_rmse_mas`` (weighted RMS of the 2-D error, mas) and
    ``shift_mae_mas`` (weighted mean |error| per axis, mas). 0 if the weights sum to 0.
  """
  err = pred_mas.astype(jnp.float32) - jax.lax.stop_gradient(true_mas).astype(
      jnp.float32)  # (..., 2)
  w = jax.lax.stop_gradient(weights).astype(jnp.float32)  # (...)
  h = jnp.sum(huber(err / scale_mas), axis=-1)  # (...)
  wsum = jnp.sum(w)
  loss = jepa.safe_ratio(jnp.sum(w * h), wsum)
  e = jax.lax.stop_gradient(err)
  metrics = dict(
      shift_rmse_mas=jnp.sqrt(jepa.safe_ratio(jnp.sum(w * jnp.sum(e * e, -1)), wsum)),
      shift_mae_mas=jepa.safe_ratio(jnp.sum(w * jnp.mean(jnp.abs(e), -1)), wsum))
  return loss, metrics
