"""Collapse diagnostics of a frozen representation (seed 000's "must watch" list).

All functions take host numpy arrays of embeddings already computed on held-out chips
and return plain floats / lists, so the suite can put them in report.json as they are.

  token_similarity   information-weighted cosine of the tokens at the same sky position
                     in two bands of the same chip (training's metric, on frozen target
                     tokens); the same on tokens of *different* chips gives the level a
                     collapsed encoder reaches too, so the gap between the two matters.
  var_loss, var_min  VICReg variance hinge mean_j relu(1 - std_j) and the smallest
                     per-dimension variance (seed: > 0.1 healthy, < 0.01 dead dims).
  effective_dim      participation ratio of the covariance eigenvalues (1 = collapse
                     to a line, D = isotropic); `rankme` the entropy-based rank.
  per_band           the same per band: one band collapsing to a constant is invisible
                     in statistics pooled over all bands.
  cross_band         (n_bands, n_bands) mean cosine of the global embeddings of the same
                     chip in band i and band j, and its contrast with different chips.
  activation_weight  correlation of the token norm with the information-map weight of
                     the token (seed: positive, tokens activate where sources are); also
                     of the norm of the token's deviation from the mean token, since a
                     final LayerNorm makes raw norms nearly constant.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats


def unit(x: np.ndarray) -> np.ndarray:
  """Rows of x scaled to unit L2 norm (zero rows stay ~0)."""
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N, M) cosine similarities of the rows of a (N, D) and b (M, D)."""
  return unit(a) @ unit(b).T


def token_similarity(tokens_a: np.ndarray, tokens_b: np.ndarray,
                     weights: np.ndarray | None = None) -> float:
  """sum w cos(a_i, b_i) / sum w over paired tokens (B, N, D); plain mean without w."""
  cos = np.sum(unit(tokens_a) * unit(tokens_b), axis=-1)  # (B, N)
  if weights is None:
    return float(np.mean(cos))
  w = np.asarray(weights, np.float64)
  total = np.sum(w)
  return float(np.sum(w * cos) / total) if total > 0 else 0.0


def variance_stats(z: np.ndarray, gamma: float = 1.0, eps: float = 1e-4) -> dict[str, float]:
  """VICReg variance hinge (`var_loss`), smallest and mean per-dimension variance."""
  z = np.asarray(z, np.float64)
  var = np.var(z, axis=0, ddof=1) if z.shape[0] > 1 else np.zeros(z.shape[1])  # (D,)
  return {'var_loss': float(np.mean(np.maximum(gamma - np.sqrt(var + eps), 0.0))),
          'var_min': float(np.min(var)), 'var_mean': float(np.mean(var))}


def effective_dim(z: np.ndarray) -> float:
  """Participation ratio (sum l)^2 / sum l^2 of the covariance eigenvalues.

  The definition of `objectives.vicreg.effective_dim` (the training metric), in numpy:
  evaluation sees many different (N, D) shapes and a jitted version would compile
  for each.
  """
  z = np.asarray(z, np.float64)
  zc = z - z.mean(axis=0, keepdims=True)
  cov = zc.T @ zc / max(z.shape[0] - 1, 1)  # (D, D)
  fro2 = np.sum(cov * cov)
  return float(np.trace(cov) ** 2 / fro2) if fro2 > 0 else 0.0


def rankme(z: np.ndarray, eps: float = 1e-7) -> float:
  """RankMe: exp of the entropy of the normalised singular values (`vicreg.rankme`)."""
  s = np.linalg.svd(np.asarray(z, np.float64), compute_uv=False)
  p = s / max(np.sum(s), 1e-30) + eps
  return float(np.exp(-np.sum(p * np.log(p))))


def collapse_stats(z: np.ndarray) -> dict[str, float]:
  """Variance, effective dimension and RankMe of (N, D) embeddings."""
  z = np.asarray(z, np.float32)
  out = variance_stats(z)
  out.update(effective_dim=effective_dim(z), rankme=rankme(z), embed_dim=int(z.shape[1]),
             n=int(z.shape[0]))
  return out


def per_band_collapse(global_by_band: Mapping[str, np.ndarray],
                      valid_by_band: Mapping[str, np.ndarray] | None = None,
                      rank_fraction: float = 0.1) -> dict[str, dict]:
  """Collapse statistics of each band's (N, D) global embeddings.

  A band is flagged `collapsed` when its RankMe is below `rank_fraction` of
  min(N, D) or its mean per-dimension variance is below 1e-6 (a constant output).
  """
  out = {}
  for band, z in global_by_band.items():
    if valid_by_band is not None:
      z = z[np.asarray(valid_by_band[band], bool)]
    if z.shape[0] < 2:
      continue
    s = collapse_stats(z)
    s['collapsed'] = bool(s['rankme'] < rank_fraction * min(z.shape) or s['var_mean'] < 1e-6)
    out[band] = s
  return out


def cross_band_similarity(global_by_band: Mapping[str, np.ndarray], bands: Sequence[str],
                          valid_by_band: Mapping[str, np.ndarray] | None = None
                          ) -> dict[str, list]:
  """Same-chip cosine of global embeddings between every pair of bands.

  Returns {'bands', 'matrix' (n, n): mean over chips c of cos(z_i[c], z_j[c]),
  'contrast' (n, n): matrix minus the mean cosine of z_i[c] with z_j[c'] for c != c'}.
  An entry is NaN when fewer than two chips have both bands. A collapsed encoder has
  a matrix of ones and a contrast of zero; a useful one a clearly positive contrast.
  """
  n = len(bands)
  matrix = np.full((n, n), np.nan)
  contrast = np.full((n, n), np.nan)
  for i, bi in enumerate(bands):
    for j, bj in enumerate(bands):
      ok = np.ones(global_by_band[bi].shape[0], bool)
      if valid_by_band is not None:
        ok = np.asarray(valid_by_band[bi], bool) & np.asarray(valid_by_band[bj], bool)
      m = int(ok.sum())
      if m < 2:
        continue
      sim = cosine_matrix(global_by_band[bi][ok], global_by_band[bj][ok])  # (m, m)
      same = np.mean(np.diag(sim))
      other = (np.sum(sim) - np.trace(sim)) / (m * (m - 1))
      matrix[i, j], contrast[i, j] = same, same - other
  return {'bands': list(bands), 'matrix': matrix.tolist(), 'contrast': contrast.tolist()}


def token_activation(tokens: np.ndarray, centred: bool = True) -> np.ndarray:
  """(B, N) token activation: L2 norm of each token, or of its deviation from the mean token.

  Trunks end in a LayerNorm, so raw token norms are nearly constant (~sqrt(D)) whatever
  the input; the deviation from the mean token (mostly sky) is what can light up on
  sources.
  """
  t = np.asarray(tokens, np.float64)
  if centred:
    t = t - t.reshape(-1, t.shape[-1]).mean(axis=0)
  return np.linalg.norm(t, axis=-1)


def _constant(x: np.ndarray) -> bool:
  # Round-off on a constant (e.g. LayerNorm'ed norms) must not yield a correlation.
  return bool(np.std(x) <= 1e-9 * max(float(np.mean(np.abs(x))), 1e-30))


def _correlations(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
  if a.size < 3 or _constant(a) or _constant(b):
    return 0.0, 0.0
  return float(np.corrcoef(a, b)[0, 1]), float(stats.spearmanr(a, b).statistic)


def activation_weight_correlation(tokens: np.ndarray, token_weights: np.ndarray
                                  ) -> dict[str, float]:
  """Correlation of token activation with token information weight.

  Args:
    tokens: (B, N, D) tokens; token_weights: (B, N) information weights in [0, 1].
  Returns:
    {'pearson', 'spearman'}: of the raw token L2 norm (seed 000's diagnostic);
    {'pearson_centred', 'spearman_centred'}: of the norm of the token minus the mean
    token (see `token_activation`); 'n_tokens'.
  """
  w = np.asarray(token_weights, np.float64).ravel()
  p, s = _correlations(token_activation(tokens, centred=False).ravel(), w)
  pc, sc = _correlations(token_activation(tokens, centred=True).ravel(), w)
  return {'pearson': p, 'spearman': s, 'pearson_centred': pc, 'spearman_centred': sc,
          'n_tokens': int(w.size)}


def token_similarity_pair(tokens_a: np.ndarray, tokens_b: np.ndarray, weights_a: np.ndarray,
                          weights_b: np.ndarray, seed: int = 0) -> dict[str, float]:
  """Token similarity of the same chips in two bands, and of mismatched chips.

  Tokens (B, N, D) of the same sky in band a and band b (sky-aligned grids); weights
  (B, N) their information weights; each token pair is weighted by the larger of the
  two weights (a source seen in either band). `shuffled` pairs chip c of band a with
  chip perm(c) of band b at the same positions: what any position-only or collapsed
  encoder also gets.
  """
  w = np.maximum(weights_a, weights_b)  # (B, N)
  b = tokens_a.shape[0]
  perm = np.roll(np.arange(b), 1 + np.random.default_rng(seed).integers(max(b - 1, 1)))
  return {'token_similarity': token_similarity(tokens_a, tokens_b, w),
          'token_similarity_unweighted': token_similarity(tokens_a, tokens_b),
          'token_similarity_shuffled': token_similarity(tokens_a, tokens_b[perm],
                                                        np.maximum(weights_a, weights_b[perm]))}
