"""Embedding analysis (seed 004): retrieval, 2-D maps, correlations with truth, model comparison.

  retrieval        cross-instrument retrieval of held-out chips: each query (one band
                   of instrument A) must find the same chip among all N chips seen in a
                   band of instrument B, by global embedding (cosine) or by token-grid
                   matching (information-weighted mean cosine of the tokens at the same
                   sky positions). top-1 / top-5, chance 1/N and 5/N.
  reduce_2d        2-D map of embeddings: UMAP (umap-learn) when installed, else PCA.
  source_tokens    per-source embeddings: the token under each source position.
  spearman_table   |Spearman rho| of the top principal components of the embeddings
                   with physical properties (magnitude, colour, size, type, redshift).
  PixelBaseline    the classical, learning-free "representation" every figure is set
                   against: pixels in noise units resampled to the coarsest pixel scale,
                   tokens = the flattened token-sized patches, global = the (pooled)
                   flattened chip; retrieval with it is zero-lag cross-correlation.
  compare          similarity of several models' embeddings of the same chips. Two
                   independently trained encoders live in unrelated coordinates (any
                   rotation of one is as good), so their raw cosine means nothing;
                   we compare what is coordinate-free: linear CKA of the embeddings and,
                   per chip, the cosine between the chip's similarity profiles (its row
                   of the chip x chip cosine matrix) under the two models.
"""

from __future__ import annotations

import functools
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from jaisp_jax import bands as bands_lib
from jaisp_jax.evaluate import diagnostics


# -- the classical baseline --------------------------------------------------------


class PixelBaseline:
  """Pixels as a representation (no learning), with `get_representation`'s contract.

  Each band's view is normalised as the model's input is (noise units, bad pixels
  zero), block-averaged to the coarsest instrument's pixel scale (and multiplied by
  the block side so sky noise stays ~1), then cut into the model's token grid: a
  token is the flattened S/N patch of its 3.2" cell, the global vector the flattened
  chip (block-averaged further until it has at most `max_global` entries). Weights
  are the model's parameter-free information map.
  """

  def __init__(self, registry: bands_lib.BandRegistry, token_arcsec: float,
               snr_threshold: float = 3.5, softness: float = 0.25, max_global: int = 4096):
    self.registry = registry
    self.token_arcsec = float(token_arcsec)
    self.snr_threshold, self.softness = float(snr_threshold), float(softness)
    self.max_global = int(max_global)
    self.coarse = max(registry.pixel_scale(i) for i in registry.instruments)

  @staticmethod
  def _block(x: np.ndarray, f: int) -> np.ndarray:
    b, h, w = x.shape
    return x[:, :h // f * f, :w // f * f].reshape(b, h // f, f, w // f, f).mean(axis=(2, 4))

  def get_representation(self, image, rms, band: str) -> dict[str, np.ndarray]:
    """{'tokens' (B, N, P), 'global' (B, G), 'weights' (B, 1, H, W), 'token_weights' (B, N)}."""
    inst = self.registry[band].instrument
    stride = self.registry.stride(band, self.token_arcsec)
    img, pw, tw = _pixel_inputs(np.asarray(image, np.float32)[:, 0],
                                np.asarray(rms, np.float32)[:, 0], stride,
                                self.snr_threshold, self.softness)
    f = int(round(self.coarse / self.registry.pixel_scale(inst)))
    x = self._block(np.asarray(img, np.float32), f) * f  # (B, h, w), sky noise ~1
    t = int(round(self.token_arcsec / self.coarse))
    b, h, w = x.shape
    gh, gw = h // t, w // t
    tokens = x[:, :gh * t, :gw * t].reshape(b, gh, t, gw, t).transpose(0, 1, 3, 2, 4)
    g = x
    while g.shape[1] * g.shape[2] > self.max_global and min(g.shape[1:]) >= 2:
      g = self._block(g, 2) * 2
    return {'tokens': tokens.reshape(b, gh * gw, t * t), 'global': g.reshape(b, -1),
            'weights': np.asarray(pw)[:, None], 'token_weights': np.asarray(tw)}


@functools.lru_cache(maxsize=None)
def _pixel_inputs_fn(stride: int, snr_threshold: float, softness: float):
  import jax  # pylint: disable=import-outside-toplevel
  from jaisp_jax.models import infomap  # pylint: disable=import-outside-toplevel
  from jaisp_jax import xla_options  # pylint: disable=import-outside-toplevel
  from jaisp_jax.models import jaisp  # pylint: disable=import-outside-toplevel

  def fn(image, rms):  # (B, H, W) each
    img, sig, mask = jaisp.normalise_view(image, rms)
    pw, tw = infomap.information_map(img, sig, mask, stride, snr_threshold, softness)
    return img, pw, tw
  return xla_options.jit(fn)


def _pixel_inputs(image, rms, stride, snr_threshold, softness):
  """(noise-unit image, pixel weights, token weights) exactly as the model computes them."""
  return _pixel_inputs_fn(int(stride), float(snr_threshold), float(softness))(image, rms)


# -- retrieval ---------------------------------------------------------------------


def top_k_from_scores(scores: np.ndarray, k: int) -> float:
  """Fraction of rows i whose diagonal score is among the k highest of row i.

  `scores` (N, N): query i vs gallery j, the correct partner on the diagonal. Ties
  count against the query (a constant score gives 0 unless N <= k), so a collapsed
  encoder cannot score by ties.
  """
  own = np.diag(scores)[:, None]
  rank = np.sum(scores >= own, axis=1) - 1   # gallery items at least as good, not itself
  return float(np.mean(rank < k))


def global_scores(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """(N, N) cosine similarity of (N, D) global embeddings."""
  return diagnostics.cosine_matrix(query, gallery)


def token_grid_scores(query_tokens: np.ndarray, gallery_tokens: np.ndarray,
                      query_weights: np.ndarray | None = None,
                      floor: float = 0.01) -> np.ndarray:
  """(N, N) information-weighted mean token cosine at matching sky positions.

  Args:
    query_tokens, gallery_tokens: (N, T, D) sky-aligned token grids.
    query_weights: (N, T) information weights of the query's tokens (None: uniform);
      `floor` is added so a chip of empty sky still compares all its tokens.
  """
  q = diagnostics.unit(query_tokens)
  g = diagnostics.unit(gallery_tokens)
  w = np.ones(q.shape[:2]) if query_weights is None else np.asarray(query_weights) + floor
  w = w / np.sum(w, axis=1, keepdims=True)  # (N, T)
  return np.einsum('itd,jtd,it->ij', q, g, w)


def retrieval_figures(scores: np.ndarray) -> dict[str, float]:
  n = scores.shape[0]
  return {'top1': top_k_from_scores(scores, 1), 'top5': top_k_from_scores(scores, 5),
          'chance_top1': 1.0 / n, 'chance_top5': min(5, n) / n, 'n': int(n)}


# -- 2-D maps ------------------------------------------------------------------------


def pca(x: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
  """(projections (N, k), explained variance ratios (k,)) of centred x (N, D)."""
  x = np.asarray(x, np.float64)
  xc = x - x.mean(axis=0, keepdims=True)
  _, s, vt = np.linalg.svd(xc, full_matrices=False)
  k = min(n_components, vt.shape[0])
  # Fix the sign of each component (largest |loading| positive) so runs agree.
  signs = np.sign(vt[np.arange(k), np.argmax(np.abs(vt[:k]), axis=1)])
  signs[signs == 0] = 1.0
  proj = xc @ (vt[:k].T * signs)
  total = np.sum(s ** 2)
  ratio = (s[:k] ** 2 / total) if total > 0 else np.zeros(k)
  return proj, ratio


def umap_available() -> bool:
  try:
    import umap  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    return True
  except ImportError:
    return False


def reduce_2d(x: np.ndarray, method: str = 'umap', seed: int = 0) -> tuple[np.ndarray, str]:
  """(N, 2) map of (N, D) embeddings and the method used ('umap' or 'pca').

  `method='umap'` falls back to PCA when umap-learn is missing or there are too few
  points for a neighbour graph (< 10). The first UMAP call in a process compiles
  numba kernels (~20-40 s on one CPU core); later calls take well under a second.
  """
  x = np.asarray(x, np.float32)
  if method not in ('umap', 'pca'):
    raise ValueError(f'unknown 2-D method {method!r}; use umap or pca')
  if method == 'umap' and x.shape[0] >= 10 and umap_available():
    import umap  # pylint: disable=import-outside-toplevel
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # "n_jobs overridden by random_state": intended
      reducer = umap.UMAP(n_components=2, n_neighbors=min(15, x.shape[0] - 1),
                          min_dist=0.1, metric='cosine', random_state=seed)
      return np.asarray(reducer.fit_transform(x), np.float32), 'umap'
  proj, _ = pca(x, 2)
  if proj.shape[1] < 2:
    proj = np.concatenate([proj, np.zeros((proj.shape[0], 2 - proj.shape[1]))], axis=1)
  return proj.astype(np.float32), 'pca'


# -- per-source embeddings -----------------------------------------------------------


def source_tokens(tokens: np.ndarray, grid: tuple[int, int], chip_index: np.ndarray,
                  x: np.ndarray, y: np.ndarray, token_px: float) -> np.ndarray:
  """(S, D) the token under each source.

  Args:
    tokens: (B, T, D) token grids of one band, T = grid[0] * grid[1], row-major.
    chip_index: (S,) chip of each source; x, y: (S,) its pixel position in that chip's
      image of the band's instrument (pixel centres at integers).
    token_px: token side in that instrument's pixels.
  """
  gh, gw = grid
  row = np.clip(np.floor((np.asarray(y) + 0.5) / token_px).astype(int), 0, gh - 1)
  col = np.clip(np.floor((np.asarray(x) + 0.5) / token_px).astype(int), 0, gw - 1)
  return np.asarray(tokens)[np.asarray(chip_index, int), row * gw + col]


# -- correlations with truth ---------------------------------------------------------


def _abs_rhos(proj: np.ndarray, v: np.ndarray) -> list[float]:
  rhos = []
  for c in range(proj.shape[1]):
    if v.size < 5 or np.ptp(v) == 0 or np.ptp(proj[:, c]) == 0:
      rhos.append(float('nan'))
    else:
      rhos.append(float(abs(stats.spearmanr(proj[:, c], v).statistic)))
  return rhos


def _max_finite(values) -> float:
  finite = [r for r in values if np.isfinite(r)]
  return max(finite) if finite else float('nan')


def spearman_table(z: np.ndarray, properties: Mapping[str, np.ndarray],
                   n_components: int = 5, seed: int = 0) -> dict:
  """|Spearman rho| of each of the top principal components of z with each property.

  Rows with a non-finite property value are left out for that property. Returns
  {'components': k, 'explained_variance': [k], 'rho': {prop: [k]}, 'best': {prop:
  max |rho|}, 'null': {prop: the same max with the property randomly permuted over
  the rows}, 'n': {prop: rows used}}. `null` is the level that chance reaches with k
  components and n rows (a best |rho| near it means nothing). rho is NaN where fewer
  than 5 rows remain or the property is constant.
  """
  proj, ratio = pca(z, n_components)
  k = proj.shape[1]
  rng = np.random.default_rng(seed)
  table = {'components': int(k), 'explained_variance': ratio.tolist(), 'rho': {},
           'best': {}, 'null': {}, 'n': {}}
  for name, values in properties.items():
    v = np.asarray(values, np.float64)
    ok = np.isfinite(v)
    rhos = _abs_rhos(proj[ok], v[ok])
    table['rho'][name] = rhos
    table['best'][name] = _max_finite(rhos)
    table['null'][name] = _max_finite(_abs_rhos(proj[ok], rng.permutation(v[ok])))
    table['n'][name] = int(ok.sum())
  return table


# -- model comparison ----------------------------------------------------------------


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
  """Linear CKA (Kornblith et al. 2019) of (N, Da) and (N, Db) embeddings of the same rows.

  1 when one is a rotation / isotropic scaling of the other, ~0 for unrelated ones.
  """
  a = np.asarray(a, np.float64) - np.mean(a, axis=0)
  b = np.asarray(b, np.float64) - np.mean(b, axis=0)
  cross = np.linalg.norm(a.T @ b) ** 2
  den = np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)
  return float(cross / den) if den > 0 else 0.0


def profile_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N,) per-chip cosine between its similarity profiles under two models.

  The profile of chip i under a model is row i of the (N, N) cosine matrix of that
  model's embeddings, the diagonal and the mean removed: which other chips the model
  finds similar. Coordinate-free, so it compares models of any dimension.
  """
  n = a.shape[0]
  off = ~np.eye(n, dtype=bool)
  pa = diagnostics.cosine_matrix(a, a)[off].reshape(n, n - 1)
  pb = diagnostics.cosine_matrix(b, b)[off].reshape(n, n - 1)
  pa = pa - pa.mean(axis=1, keepdims=True)
  pb = pb - pb.mean(axis=1, keepdims=True)
  return np.sum(diagnostics.unit(pa) * diagnostics.unit(pb), axis=1)


def compare(embeddings: Mapping[str, np.ndarray]) -> dict:
  """Pairwise comparison of several models' (N, D_m) embeddings of the same N chips.

  Returns {'models': names, 'cka': (M, M), 'profile_cosine': (M, M) mean over chips}.
  """
  names = list(embeddings)
  m = len(names)
  cka = np.eye(m)
  prof = np.eye(m)
  for i in range(m):
    for j in range(i + 1, m):
      cka[i, j] = cka[j, i] = linear_cka(embeddings[names[i]], embeddings[names[j]])
      prof[i, j] = prof[j, i] = float(np.mean(profile_cosine(embeddings[names[i]],
                                                             embeddings[names[j]])))
  return {'models': names, 'cka': cka.tolist(), 'profile_cosine': prof.tolist()}


def compare_representations(models: Mapping[str, object], image: np.ndarray, rms: np.ndarray,
                            band: str, batch_size: int = 64) -> dict:
  """`compare` of several `Representation`s (anything with get_representation) on one band.

  Args:
    models: {name: representation}; image, rms: (N, 1, H, W) chips of `band`.
  """
  emb = {}
  for name, rep in models.items():
    parts = [np.asarray(rep.get_representation(image[s:s + batch_size], rms[s:s + batch_size],
                                               band)['global'], np.float32)
             for s in range(0, image.shape[0], batch_size)]
    emb[name] = np.concatenate(parts)
  return compare(emb)


def property_columns(names: Sequence[str]) -> list[str]:
  """Properties in the order the report lists them (known ones first)."""
  order = ['mag', 'colour', 'size', 'is_star', 'redshift']
  return [n for n in order if n in names] + sorted(n for n in names if n not in order)
