"""Information-weighted token JEPA loss (seed 000) and the token-similarity metric.

For one direction A -> B (online prediction from view A, EMA target of view B)::

    L(A->B) = sum_{b,i} w_i (1 - cos(pred_A[b,i], sg(target_B[b,i]))) / sum_{b,i} w_i

summed over every token of the (global) batch, one ratio: a batch whose sources sit in a
few tiles is not re-weighted per tile. The loss is symmetrised:
``L = (L(A->B) + L(B->A)) / 2``. ``sum w = 0`` (all sky, or all masked) gives 0 and a
zero gradient, never NaN.

How the two views' weights combine (``weight_mode``)
----------------------------------------------------
A token's information weight w is high where its band shows a source and ~0 on sky.
When a source shows in only one band (an H-band dropout: bright in H, nothing in u),
the choices are:

* ``'min'`` / product: the dropout gets no weight in either direction, so the model
  never learns that a source can be absent in another band -- and colour (what
  the dropouts encode) is exactly the cross-band knowledge we want.
* ``'max'`` (the PyTorch reference): full weight in both directions. The direction
  H -> u is informative (from the H token, predict that u shows nothing here). The
  direction u -> H asks the predictor to output an H source's embedding from a u token
  of pure noise; since the sky-only tokens around it carry ~0 weight, the cheapest
  solution is to map *every* empty u token to "source" embeddings: a constant bias that
  teaches nothing, fed by as much loss weight as real sources.
* ``'context'`` (our default): direction A -> B is weighted by ``w_A``, the information
  in the view the prediction is made from. H -> u keeps the dropout at full weight (the
  model learns the absence), u -> H gives it ~0 (no hallucination demanded); a source
  seen in both bands counts in both directions; sky counts in neither. Each direction is
  normalised by its own weights.
* ``'mean'``: ``(w_A + w_B) / 2`` in both directions, a half-strength ``'max'``.

Whatever the mode, a token only counts where its *target* was observed: the optional
per-token coverage ``valid_b`` (fraction of unmasked pixels, (B, N)) multiplies the
weights of A -> B, so a source in A facing a masked hole in B does not ask the model to
predict the hole's garbage.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

WEIGHT_MODES = ('context', 'max', 'mean', 'min')


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / max(|x|, eps) along the last axis, in float32 (bf16 norms lose digits)."""
  x = x.astype(jnp.float32)
  sq = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def cosine_similarity(x: jax.Array, y: jax.Array, eps: float = 1e-6) -> jax.Array:
  """cos(x, y) along the last axis: (..., D), (..., D) -> (...); 0 for a zero vector."""
  return jnp.sum(l2_normalize(x, eps) * l2_normalize(y, eps), axis=-1)


def safe_ratio(num: jax.Array, den: jax.Array) -> jax.Array:
  """num / den, and 0 (with zero gradient) where den == 0."""
  ok = den > 0
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def weighted_cosine_loss(pred: jax.Array, target: jax.Array, weights: jax.Array
                         ) -> jax.Array:
  """sum w (1 - cos(pred, sg(target))) / sum w over all tokens; 0 when sum w == 0.

  Args:
    pred: (B, N, D) online predictions.
    target: (B, N, D) target embeddings; gradient is stopped here.
    weights: (B, N) non-negative token weights (gradient stopped too: they are a
      function of the data, not something the model may tune).
  """
  w = jax.lax.stop_gradient(weights).astype(jnp.float32)  # (B, N)
  cos = cosine_similarity(pred, jax.lax.stop_gradient(target))  # (B, N)
  return safe_ratio(jnp.sum(w * (1.0 - cos)), jnp.sum(w))


def direction_weights(w_a: jax.Array, w_b: jax.Array, mode: str = 'context'
                      ) -> tuple[jax.Array, jax.Array]:
  """Token weights of the directions A -> B and B -> A (see the module docstring)."""
  if mode == 'context':
    return w_a, w_b
  if mode == 'max':
    w = jnp.maximum(w_a, w_b)
  elif mode == 'mean':
    w = 0.5 * (w_a + w_b)
  elif mode == 'min':
    w = jnp.minimum(w_a, w_b)
  else:
    raise ValueError(f'weight_mode must be one of {WEIGHT_MODES}, got {mode!r}')
  return w, w


def jepa_loss(pred_a: jax.Array, pred_b: jax.Array, target_a: jax.Array,
              target_b: jax.Array, w_a: jax.Array, w_b: jax.Array, *,
              weight_mode: str = 'context', valid_a: Optional[jax.Array] = None,
              valid_b: Optional[jax.Array] = None) -> tuple[jax.Array, dict]:
  """Symmetrised information-weighted token JEPA loss.

  ``L = (L(A->B) + L(B->A)) / 2`` with ``L(A->B) = weighted_cosine_loss(pred_a,
  target_b, W_ab)``; ``W_ab``, ``W_ba`` from `direction_weights`, times the target's
  coverage (``valid_b`` for A -> B) when given.

  Args:
    pred_a, pred_b: (B, N, D) online predictions from views A and B.
    target_a, target_b: (B, N, D) EMA target embeddings of views A and B.
    w_a, w_b: (B, N) information weights of the views' tokens.
    weight_mode: one of WEIGHT_MODES.
    valid_a, valid_b: optional (B, N) fractions of observed pixels per token.

  Returns:
    (loss, metrics) with metrics ``jepa_ab``, ``jepa_ba``, ``token_similarity``
    (information-weighted cos of the pairs, both directions) and ``weight_sum``.
  """
  w_ab, w_ba = direction_weights(w_a, w_b, weight_mode)  # (B, N) each
  if valid_b is not None:
    w_ab = w_ab * valid_b
  if valid_a is not None:
    w_ba = w_ba * valid_a
  loss_ab = weighted_cosine_loss(pred_a, target_b, w_ab)
  loss_ba = weighted_cosine_loss(pred_b, target_a, w_ba)
  loss = 0.5 * (loss_ab + loss_ba)
  sim = 0.5 * (token_similarity(pred_a, target_b, w_ab)
               + token_similarity(pred_b, target_a, w_ba))
  metrics = dict(jepa_ab=loss_ab, jepa_ba=loss_ba, token_similarity=sim,
                 weight_sum=jax.lax.stop_gradient(jnp.sum(w_ab) + jnp.sum(w_ba)))
  return loss, metrics


def token_similarity(x: jax.Array, y: jax.Array,
                     weights: Optional[jax.Array] = None) -> jax.Array:
  """Mean cosine similarity of paired tokens (a diagnostic; no gradient).

  ``sum w cos(x_i, y_i) / sum w`` (plain mean when ``weights`` is None); 0 when the
  weights sum to 0. Seed 000: healthy runs sit at 0.3-0.8 and rise slowly; a jump to
  > 0.95 early is collapse.

  Args:
    x, y: (..., N, D) paired tokens.
    weights: optional (..., N) token weights.
  """
  cos = cosine_similarity(jax.lax.stop_gradient(x), jax.lax.stop_gradient(y))
  if weights is None:
    return jnp.mean(cos)
  w = jax.lax.stop_gradient(weights).astype(jnp.float32)
  return safe_ratio(jnp.sum(w * cos), jnp.sum(w))
