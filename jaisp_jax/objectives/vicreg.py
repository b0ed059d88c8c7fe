"""VICReg variance and covariance terms, and collapse diagnostics (effective dim, RankMe).

All statistics are over the GLOBAL batch: called inside ``jax.jit`` with the batch
sharded over the mesh's data axis, ``jnp.mean(z, axis=0)`` and ``z.T @ z`` are global
reductions (XLA inserts the all-reduce), so the terms equal the single-device values.
Do not call these inside ``shard_map`` on a per-device slice.

With ``z`` (B, D) embeddings (Bardes et al. 2022, eqs. 1-4; unbiased (B - 1)
normalisation as the paper's code and the PyTorch reference)::

    var_j   = sum_b (z_bj - mean_j)^2 / (B - 1)
    v(z)    = mean_j relu(gamma - sqrt(var_j + eps))                  (variance hinge)
    C       = (z - mean)^T (z - mean) / (B - 1)                        (D, D)
    c(z)    = sum_{i != j} C_ij^2 / D                                  (covariance)
    loss    = var_weight * v(z) + cov_weight * c(z)          (seed: 1.0, 0.04)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _centered(z: jax.Array) -> jax.Array:
  z = z.astype(jnp.float32)
  return z - jnp.mean(z, axis=0, keepdims=True)  # (B, D)


def _covariance(zc: jax.Array) -> jax.Array:
  """(D, D) unbiased covariance of centred (B, D) embeddings."""
  b = zc.shape[0]
  return jnp.einsum('bi,bj->ij', zc, zc,
                    precision=jax.lax.Precision.HIGHEST) / max(b - 1, 1)


def variance_loss(z: jax.Array, gamma: float = 1.0, eps: float = 1e-4) -> jax.Array:
  """mean_j relu(gamma - sqrt(var_j(z) + eps)) for (B, D) embeddings."""
  zc = _centered(z)
  var = jnp.sum(jnp.square(zc), axis=0) / max(z.shape[0] - 1, 1)  # (D,)
  return jnp.mean(jax.nn.relu(gamma - jnp.sqrt(var + eps)))


def covariance_loss(z: jax.Array) -> jax.Array:
  """sum of squared off-diagonal covariances / D for (B, D) embeddings."""
  cov = _covariance(_centered(z))  # (D, D)
  off = cov - jnp.diag(jnp.diag(cov))
  return jnp.sum(jnp.square(off)) / z.shape[-1]


def vicreg_loss(z: jax.Array, var_weight: float = 1.0, cov_weight: float = 0.04,
                gamma: float = 1.0, eps: float = 1e-4) -> tuple[jax.Array, dict]:
  """``var_weight * v(z) + cov_weight * c(z)`` and diagnostics, for (B, D) embeddings.

  Returns:
    (loss, metrics): ``var_loss``, ``cov_loss``, ``var_min`` (the smallest per-dimension
    variance; seed 000: > 0.1 healthy, < 0.01 some dimensions dead) and
    ``effective_dim`` (see `effective_dim`), the last two without gradient.
  """
  zc = _centered(z)
  b, d = z.shape
  cov = _covariance(zc)  # (D, D)
  var = jnp.diag(cov)  # (D,)
  v = jnp.mean(jax.nn.relu(gamma - jnp.sqrt(var + eps)))
  off = cov - jnp.diag(var)
  c = jnp.sum(jnp.square(off)) / d
  loss = var_weight * v + cov_weight * c
  sg_cov = jax.lax.stop_gradient(cov)
  metrics = dict(var_loss=v, cov_loss=c, var_min=jnp.min(jnp.diag(sg_cov)),
                 effective_dim=_participation_ratio(sg_cov))
  return loss, metrics


def weighted_vicreg_loss(z: jax.Array, weights: jax.Array, var_weight: float = 1.0,
                         cov_weight: float = 0.04, gamma: float = 1.0, eps: float = 1e-4
                         ) -> tuple[jax.Array, dict]:
  """`vicreg_loss` of weighted samples: (M, D) embeddings with (M,) weights >= 0.

  Mean and covariance are weighted, with the unbiased (reliability-weights)
  normalisation ``sum w - sum w^2 / sum w`` (= M - 1 for unit weights, where the
  result equals `vicreg_loss`). For VICReg over information-weighted tokens: sky
  tokens (w ~ 0) neither count as variance nor need any. Weights carry no gradient.
  """
  z = z.astype(jnp.float32)
  w = jax.lax.stop_gradient(weights).astype(jnp.float32)  # (M,)
  sw = jnp.maximum(jnp.sum(w), 1e-12)
  mean = jnp.einsum('m,md->d', w, z) / sw  # (D,)
  zc = z - mean[None, :]
  norm = jnp.maximum(sw - jnp.sum(jnp.square(w)) / sw, 1e-6)
  cov = jnp.einsum('m,mi,mj->ij', w, zc, zc, precision=jax.lax.Precision.HIGHEST) / norm
  var = jnp.diag(cov)
  d = z.shape[-1]
  v = jnp.mean(jax.nn.relu(gamma - jnp.sqrt(var + eps)))
  c = jnp.sum(jnp.square(cov - jnp.diag(var))) / d
  sg_cov = jax.lax.stop_gradient(cov)
  metrics = dict(var_loss=v, cov_loss=c, var_min=jnp.min(jnp.diag(sg_cov)),
                 effective_dim=_participation_ratio(sg_cov))
  return var_weight * v + cov_weight * c, metrics


def invariance_loss(za: jax.Array, zb: jax.Array) -> jax.Array:
  """VICReg invariance term: mean squared difference of paired (B, D) embeddings.

  ``mean_{b,j} (za_bj - zb_bj)^2`` (the paper's code, ``F.mse_loss``); with its
  weight 1 next to var 1 / cov 0.04 it has the paper's 25 : 25 : 1 proportions.
  """
  return jnp.mean(jnp.square(za.astype(jnp.float32) - zb.astype(jnp.float32)))


def _participation_ratio(cov: jax.Array) -> jax.Array:
  tr = jnp.trace(cov)
  fro2 = jnp.sum(jnp.square(cov))
  return jnp.where(fro2 > 0, tr * tr / jnp.where(fro2 > 0, fro2, 1.0), 0.0)


def effective_dim(z: jax.Array) -> jax.Array:
  """Participation ratio of the covariance eigenvalues of (B, D) embeddings.

  ``(sum_k l_k)^2 / sum_k l_k^2`` with ``l_k`` the eigenvalues of the covariance C.
  Computed without an eigendecomposition: ``sum l = tr C`` and ``sum l^2 = ||C||_F^2``
  (C is symmetric). It is D for an isotropic embedding, 1 when one direction holds all
  the variance (collapse to a line), and k for k equal directions. 0 for constant z.
  """
  return _participation_ratio(jax.lax.stop_gradient(_covariance(_centered(z))))


def rankme(z: jax.Array, eps: float = 1e-7) -> jax.Array:
  """RankMe (Garrido et al. 2023): entropy effective rank of (B, D) embeddings.

  ``exp(-sum_k p_k log p_k)`` with ``p_k = s_k / sum s + eps`` and ``s_k`` the singular
  values of z (not centred, as in the paper). Between 1 (rank one) and min(B, D).
  A direct SVD (z is gathered under sharding: a diagnostic, run on a few thousand rows
  at most): square roots of the Gram eigenvalues would turn float32 round-off into
  spurious singular values of ~3e-4 s_max and inflate the rank.
  """
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  s = jnp.linalg.svd(z, compute_uv=False)  # (min(B, D),)
  p = s / jnp.maximum(jnp.sum(s), 1e-30) + eps
  return jnp.exp(-jnp.sum(p * jnp.log(p)))
