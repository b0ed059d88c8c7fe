"""DETR-JEPA objective (seed 002): JEPA on object slots matched across the two views.

The DETR decoder turns each view into Q object slots. Slot order is arbitrary, so slots
are paired by an optimal assignment on cosine cost, then the JEPA loss runs on the
pairs. For one direction A -> B, per sample::

    C_qk   = 1 - cos(pred_A[q], target_B[k])                  (Q, Q), stop-gradient
    sigma  = linear_sum_assignment(C)                         exact, in-graph
    L(A->B) = sum_{b,q} w_bq (1 - cos(pred_A[b,q], sg(target_B[b,sigma(q)])))
              / sum_{b,q} w_bq

symmetrised, ``L = (L(A->B) + L(B->A)) / 2``. The assignment is a discrete argmin: no
gradient flows through it (as in DETR), only through the matched cosines.

Slot weights ``w`` come from the decoder's objectness (probabilities, no gradient: a
learnable weight in its own loss would be driven to 0). They combine like the token
weights of `jepa` (``weight_mode``, default ``'context'``: A -> B weighted by the
objectness of A's slot), so the empty slots, most of the Q in a sparse field, do not
dominate the way sky tokens would, while an object of A matched to an empty slot of B
(a dropout) still teaches absence. Without objectness every slot weighs 1 (the seed).

Objectness itself is self-supervised with `objectness_loss`: its target is the
information a slot attends to, ``sum_n attn[q, n] w_n`` (``w_n`` the token information
weights), so a slot is "active" when it looks at sources.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaisp_jax.objectives import jepa
from jaisp_jax.objectives import matching


def match_slots(pred: jax.Array, target: jax.Array) -> jax.Array:
  """For each slot of ``pred`` the index of its matched ``target`` slot.

  Args:
    pred: (B, Q, D) and target: (B, Q, D) slot embeddings.

  Returns:
    (B, Q) int32 ``sigma``: pred slot q is matched to target slot ``sigma[b, q]``; the
    assignment minimises ``sum_q 1 - cos(pred_q, target_sigma(q))`` per sample.
  """
  p = jepa.l2_normalize(jax.lax.stop_gradient(pred))  # (B, Q, D)
  t = jepa.l2_normalize(jax.lax.stop_gradient(target))  # (B, Q, D)
  cost = 1.0 - jnp.einsum('bqd,bkd->bqk', p, t)  # (B, Q, Q)
  _, cols = matching.linear_sum_assignment(cost)  # rows are arange(Q): square
  return cols


def _gather_slots(x: jax.Array, idx: jax.Array) -> jax.Array:
  """x[b, idx[b, q]] for (B, Q, ...) x and (B, Q) idx."""
  idx = idx.reshape(idx.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=1)


def matched_slot_loss(pred_a: jax.Array, pred_b: jax.Array, target_a: jax.Array,
                      target_b: jax.Array, objectness_a: Optional[jax.Array] = None,
                      objectness_b: Optional[jax.Array] = None, *,
                      weight_mode: str = 'context', active_threshold: float = 0.5
                      ) -> tuple[jax.Array, dict]:
  """Symmetrised JEPA loss on Hungarian-matched object slots.

  Args:
    pred_a, pred_b: (B, Q, D) online slot predictions of views A and B.
    target_a, target_b: (B, Q, D) EMA target slots (gradient stopped).
    objectness_a, objectness_b: optional (B, Q) slot probabilities in [0, 1].
    weight_mode: how the two slots' objectness combine (`jepa.WEIGHT_MODES`).
    active_threshold: objectness above which a slot counts as active.

  Returns:
    (loss, metrics): ``slot_jepa_ab``, ``slot_jepa_ba``, ``matched_similarity`` (mean
    cos of matched pairs, unweighted, both directions), ``matched_similarity_weighted``
    and, with objectness, ``active_slots`` (mean active slots per view) and
    ``objectness_mean``.
  """
  if pred_a.shape != pred_b.shape or target_a.shape != target_b.shape:
    raise ValueError(f'slot shapes differ: {pred_a.shape}, {pred_b.shape}, '
                     f'{target_a.shape}, {target_b.shape}')
  bsz, q = pred_a.shape[:2]
  # Both directions in one batched assignment: (2B, Q, Q).
  sigma = match_slots(jnp.concatenate([pred_a, pred_b]),
                      jnp.concatenate([target_b, target_a]))  # (2B, Q)
  sig_ab, sig_ba = sigma[:bsz], sigma[bsz:]
  tgt_ab = _gather_slots(target_b, sig_ab)  # (B, Q, D) target of B matched to A's slots
  tgt_ba = _gather_slots(target_a, sig_ba)

  if objectness_a is None or objectness_b is None:
    w_ab = w_ba = jnp.ones((bsz, q), jnp.float32)
  else:
    o_a = jax.lax.stop_gradient(objectness_a).astype(jnp.float32)  # (B, Q)
    o_b = jax.lax.stop_gradient(objectness_b).astype(jnp.float32)
    # Weights of the matched partner, re-indexed to the predicting view's slots.
    w_ab, _ = jepa.direction_weights(o_a, _gather_slots(o_b, sig_ab), weight_mode)
    w_ba, _ = jepa.direction_weights(o_b, _gather_slots(o_a, sig_ba), weight_mode)

  loss_ab = jepa.weighted_cosine_loss(pred_a, tgt_ab, w_ab)
  loss_ba = jepa.weighted_cosine_loss(pred_b, tgt_ba, w_ba)
  loss = 0.5 * (loss_ab + loss_ba)
  metrics = dict(
      slot_jepa_ab=loss_ab, slot_jepa_ba=loss_ba,
      matched_similarity=0.5 * (jepa.token_similarity(pred_a, tgt_ab)
                                + jepa.token_similarity(pred_b, tgt_ba)),
      matched_similarity_weighted=0.5 * (jepa.token_similarity(pred_a, tgt_ab, w_ab)
                                         + jepa.token_similarity(pred_b, tgt_ba, w_ba)))
  if objectness_a is not None and objectness_b is not None:
    o = jax.lax.stop_gradient(jnp.stack([objectness_a, objectness_b]))  # (2, B, Q)
    metrics['active_slots'] = jnp.mean(jnp.sum(o > active_threshold, axis=-1))
    metrics['objectness_mean'] = jnp.mean(o.astype(jnp.float32))
  return loss, metrics


def slot_information(attn: jax.Array, token_weights: jax.Array,
                     scale: float = 0.5) -> jax.Array:
  """Information a slot attends to: clip(sum_n attn[q, n] w_n / scale, 0, 1).

  Args:
    attn: (B, Q, N) slot-to-token attention (rows sum to 1; e.g. the last cross-
      attention layer averaged over heads).
    token_weights: (B, N) token information weights.
    scale: token weight that counts as "fully a source" (the information map gives
      ~0.5 for a token centred on a source and ~0.01 for sky).

  Returns:
    (B, Q) objectness targets in [0, 1], without gradient.
  """
  info = jnp.einsum('bqn,bn->bq', attn.astype(jnp.float32),
                    token_weights.astype(jnp.float32))
  return jax.lax.stop_gradient(jnp.clip(info / scale, 0.0, 1.0))


def objectness_loss(logits: jax.Array, target: jax.Array) -> jax.Array:
  """Mean binary cross-entropy of (B, Q) objectness logits against soft targets."""
  target = jax.lax.stop_gradient(target).astype(jnp.float32)
  logits = logits.astype(jnp.float32)
  return jnp.mean(jax.nn.softplus(logits) - target * logits)
