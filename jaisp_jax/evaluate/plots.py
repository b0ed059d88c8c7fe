"""PNG plots of the evaluation suite (matplotlib, Agg backend: no display needed).

Every function draws one figure, writes it to `path` and returns it as an
(H, W, 3) uint8 array, which the suite also sends to TensorBoard. Models are drawn
side by side (trained, at init, classical) with the same colour scale, so a panel is
always read against its baselines.
"""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position

_DPI = 90


def save(fig, path: str) -> np.ndarray:
  """Writes `fig` as PNG to `path` (atomically) and returns its RGB pixels."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  buf = io.BytesIO()
  fig.savefig(buf, format='png', dpi=_DPI, bbox_inches='tight')
  plt.close(fig)
  data = buf.getvalue()
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, path)
  buf.seek(0)
  rgba = plt.imread(buf, format='png')
  rgb = rgba[..., :3]
  return (rgb * 255).astype(np.uint8) if rgb.dtype != np.uint8 else rgb


def _panels(n: int, width: float = 4.0, height: float = 3.6):
  fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False)
  return fig, axes[0]


def _stretch(image: np.ndarray) -> np.ndarray:
  """asinh stretch of a noise-unit image, clipped to [-2, 50] sigma."""
  return np.arcsinh(np.clip(image, -2.0, 50.0) / 2.0)


def band_matrix(matrices: Mapping[str, np.ndarray], labels: Sequence[str], title: str,
                path: str, vmin: float | None = None, vmax: float | None = None,
                short_labels: bool = True) -> np.ndarray:
  """One heatmap per model of a band x band matrix (e.g. same-chip cosine).

  `short_labels` drops the instrument prefix of band names ('rubin_g' -> 'g').
  """
  fig, axes = _panels(len(matrices), 4.6, 4.2)
  values = np.concatenate([np.ravel(np.asarray(m, float)) for m in matrices.values()])
  values = values[np.isfinite(values)]
  lo = vmin if vmin is not None else (float(values.min()) if values.size else 0.0)
  hi = vmax if vmax is not None else (float(values.max()) if values.size else 1.0)
  short = [lab.split('_', 1)[-1] if short_labels else lab for lab in labels]
  for ax, (name, m) in zip(axes, matrices.items()):
    im = ax.imshow(np.asarray(m, float), vmin=lo, vmax=hi if hi > lo else lo + 1e-6,
                   cmap='viridis')
    ax.set_xticks(range(len(labels)), short, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), short, fontsize=7)
    ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  fig.suptitle(title, fontsize=10)
  return save(fig, path)


def infomap_overlay(images: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                    titles: Sequence[str], path: str) -> np.ndarray:
  """Images (top) and the information map over them (bottom, weight as red alpha)."""
  n = len(images)
  fig, axes = plt.subplots(2, n, figsize=(2.6 * n, 5.4), squeeze=False)
  for k in range(n):
    img = _stretch(np.asarray(images[k], float))
    for row in range(2):
      axes[row, k].imshow(img, cmap='gray', origin='lower')
      axes[row, k].set_xticks([])
      axes[row, k].set_yticks([])
    w = np.clip(np.asarray(weights[k], float), 0, 1)
    overlay = np.zeros(w.shape + (4,))
    overlay[..., 0] = 1.0
    overlay[..., 3] = 0.6 * w
    axes[1, k].imshow(overlay, origin='lower')
    axes[0, k].set_title(titles[k], fontsize=8)
  axes[1, 0].set_ylabel('information weight', fontsize=8)
  fig.suptitle('information map (red) over the image (asinh stretch)', fontsize=10)
  return save(fig, path)


def activation_vs_weight(data: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
                         path: str, max_points: int = 4000, seed: int = 0) -> np.ndarray:
  """Scatter of token activation against token information weight, one panel per model.

  `data[name] = (weights (T,), activations (T,), pearson r)`.
  """
  fig, axes = _panels(len(data))
  rng = np.random.default_rng(seed)
  for ax, (name, (w, norm, r)) in zip(axes, data.items()):
    w, norm = np.ravel(w), np.ravel(norm)
    idx = rng.permutation(w.size)[:max_points]
    ax.scatter(w[idx], norm[idx], s=3, alpha=0.4, color='tab:blue')
    ax.set_xlabel('token information weight')
    ax.set_ylabel('|token - mean token|')
    ax.set_title(f'{name}: Pearson r = {r:.2f}', fontsize=9)
  return save(fig, path)


def per_band_bars(per_band: Mapping[str, Mapping[str, Mapping[str, float]]],
                  bands: Sequence[str], keys: Sequence[str], path: str) -> np.ndarray:
  """Per-band collapse statistics (one panel per key, one bar group per band)."""
  fig, axes = _panels(len(keys), 5.2, 3.4)
  models = list(per_band)
  width = 0.8 / max(len(models), 1)
  x = np.arange(len(bands))
  for ax, key in zip(axes, keys):
    shown = []
    for m, name in enumerate(models):
      vals = [per_band[name].get(b, {}).get(key, np.nan) for b in bands]
      vals = [np.nan if v is None else float(v) for v in vals]
      shown += vals
      ax.bar(x + (m - (len(models) - 1) / 2) * width, vals, width, label=name)
    ax.set_xticks(x, [b.split('_', 1)[-1] for b in bands], fontsize=7)
    ax.set_title(key, fontsize=9)
    finite = np.asarray(shown)[np.isfinite(shown)]
    if key.startswith('var') and finite.size and np.all(finite > 0):
      ax.set_yscale('log')   # variances span decades; a dead band (0) keeps it linear
  axes[0].legend(fontsize=7)
  fig.suptitle('per-band collapse check (global embeddings)', fontsize=10)
  return save(fig, path)


def retrieval_bars(figures: Mapping[str, Mapping[str, Mapping[str, float]]], chance_top1: float,
                   chance_top5: float, title: str, path: str) -> np.ndarray:
  """Top-1 / top-5 retrieval per model and method, chance as dashed lines.

  `figures[model][method] = {'top1': f, 'top5': f}`.
  """
  fig, axes = _panels(2, 4.6, 3.4)
  models = list(figures)
  methods = sorted({m for f in figures.values() for m in f})
  width = 0.8 / max(len(models), 1)
  for ax, key, chance in zip(axes, ('top1', 'top5'), (chance_top1, chance_top5)):
    x = np.arange(len(methods))
    for m, name in enumerate(models):
      vals = [figures[name].get(meth, {}).get(key, np.nan) for meth in methods]
      ax.bar(x + (m - (len(models) - 1) / 2) * width, vals, width, label=name)
    ax.axhline(chance, ls='--', color='k', lw=1, label='chance')
    ax.set_xticks(x, methods)
    ax.set_ylim(0, 1.05)
    ax.set_title(key, fontsize=9)
  axes[0].legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  return save(fig, path)


def embedding_map(maps: Mapping[str, np.ndarray], colour: np.ndarray, colour_name: str,
                  title: str, path: str, categorical: bool = False) -> np.ndarray:
  """2-D maps (one panel per model) of the same points coloured by one property."""
  fig, axes = _panels(len(maps))
  c = np.asarray(colour, float)
  ok = np.isfinite(c)
  lo, hi = (np.percentile(c[ok], [2, 98]) if ok.any() else (0.0, 1.0))
  for ax, (name, xy) in zip(axes, maps.items()):
    xy = np.asarray(xy)
    ax.scatter(xy[~ok, 0], xy[~ok, 1], s=6, color='lightgrey')
    if categorical:
      for val in np.unique(c[ok]):
        sel = ok & (c == val)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=8, label=f'{colour_name}={val:g}')
      ax.legend(fontsize=7)
    else:
      sc = ax.scatter(xy[ok, 0], xy[ok, 1], c=c[ok], s=8, cmap='viridis', vmin=lo,
                      vmax=hi if hi > lo else lo + 1e-6)
      fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.04, label=colour_name)
    ax.set_title(name, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle(title, fontsize=10)
  return save(fig, path)


def spearman_heatmap(tables: Mapping[str, Mapping], path: str) -> np.ndarray:
  """|Spearman rho| of principal components (columns) with properties (rows), per model."""
  fig, axes = _panels(len(tables), 4.2, 3.2)
  for ax, (name, table) in zip(axes, tables.items()):
    props = list(table['rho'])
    m = np.array([table['rho'][p] for p in props], float).reshape(len(props), -1)
    ax.imshow(m, vmin=0, vmax=1, cmap='magma')
    for i in range(m.shape[0]):
      for j in range(m.shape[1]):
        if np.isfinite(m[i, j]):
          ax.text(j, i, f'{m[i, j]:.2f}', ha='center', va='center', fontsize=6,
                  color='w' if m[i, j] < 0.6 else 'k')
    ax.set_yticks(range(len(props)), props, fontsize=7)
    ax.set_xticks(range(m.shape[1]), [f'PC{j + 1}' for j in range(m.shape[1])], fontsize=7)
    ax.set_title(name, fontsize=9)
  fig.suptitle('|Spearman rho| of embedding principal components with properties', fontsize=10)
  return save(fig, path)


def model_comparison(result: Mapping, path: str) -> np.ndarray:
  """CKA and similarity-profile cosine between models (from embeddings.compare)."""
  names = result['models']
  return band_matrix({'linear CKA': np.asarray(result['cka']),
                      'similarity-profile cosine': np.asarray(result['profile_cosine'])},
                     names, 'model comparison on the same held-out chips', path,
                     vmin=0.0, vmax=1.0, short_labels=False)
