"""Symmetric NT-Xent (InfoNCE) over the global batch (seed 003, the `clip` variant).

With ``a``, ``b`` (B, D) embeddings of the same B sky patches in two instruments,
``s_ij = cos(a_i, b_j) / T``::

    L(a->b) = -1/B sum_i log( exp(s_ii) / sum_j exp(s_ij) )
    L = (L(a->b) + L(b->a)) / 2

(CLIP's form: the B - 1 other patches of the other instrument are the negatives). With
``intra_view_negatives=True`` it is SimCLR's NT-Xent: each anchor also has the B - 1
other patches of its *own* view as negatives (2B - 2 in total).

Negatives are global: under ``jax.jit`` with the batch sharded, ``a @ b.T`` is the full
(B, B) similarity matrix (XLA gathers the other shards), not a per-device block.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaisp_jax.objectives import jepa


def nt_xent(a: jax.Array, b: jax.Array, temperature: float = 0.1,
            intra_view_negatives: bool = False) -> tuple[jax.Array, dict]:
  """Symmetric NT-Xent loss of paired (B, D) embeddings ``a``, ``b``.

  Returns:
    (loss, metrics): ``retrieval_top1`` (fraction of patches whose nearest neighbour
    in the other view, by cosine, is their own pair; both directions averaged),
    ``pos_similarity`` and ``neg_similarity`` (mean cos of pairs / of non-pairs).
  """
  na = jepa.l2_normalize(a)  # (B, D)
  nb = jepa.l2_normalize(b)  # (B, D)
  bsz = a.shape[0]
  eye = jnp.eye(bsz, dtype=bool)
  hp = jax.lax.Precision.HIGHEST
  sim_ab = jnp.einsum('id,jd->ij', na, nb, precision=hp)  # (B, B)
  logits_ab = sim_ab / temperature
  pos = jnp.diag(logits_ab)  # (B,)
  if intra_view_negatives:
    # Own-view similarities, self excluded: -inf contributes exp(.) = 0.
    own_a = jnp.where(eye, -jnp.inf,
                      jnp.einsum('id,jd->ij', na, na, precision=hp) / temperature)
    own_b = jnp.where(eye, -jnp.inf,
                      jnp.einsum('id,jd->ij', nb, nb, precision=hp) / temperature)
    lse_a = jax.nn.logsumexp(jnp.concatenate([logits_ab, own_a], axis=1), axis=1)
    lse_b = jax.nn.logsumexp(jnp.concatenate([logits_ab.T, own_b], axis=1), axis=1)
  else:
    lse_a = jax.nn.logsumexp(logits_ab, axis=1)  # (B,)
    lse_b = jax.nn.logsumexp(logits_ab, axis=0)  # (B,)
  loss = 0.5 * (jnp.mean(lse_a - pos) + jnp.mean(lse_b - pos))

  sim = jax.lax.stop_gradient(sim_ab)
  idx = jnp.arange(bsz)
  top1 = 0.5 * (jnp.mean(jnp.argmax(sim, axis=1) == idx)
                + jnp.mean(jnp.argmax(sim, axis=0) == idx))
  n_neg = max(bsz * (bsz - 1), 1)
  metrics = dict(
      retrieval_top1=top1.astype(jnp.float32),
      pos_similarity=jnp.mean(jnp.diag(sim)),
      neg_similarity=jnp.sum(jnp.where(eye, 0.0, sim)) / n_neg)
  return loss, metrics
