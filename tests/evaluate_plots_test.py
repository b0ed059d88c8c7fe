"""Every plot is written as a PNG that decodes, has the returned pixels and is not blank."""

import os

import matplotlib.pyplot as plt
import numpy as np
import pytest

from jaisp_jax.evaluate import embeddings
from jaisp_jax.evaluate import plots

BANDS = ['rubin_u', 'rubin_g', 'euclid_vis']


def _check_png(path, returned):
  assert os.path.getsize(path) > 1000
  decoded = plt.imread(path)
  assert decoded.ndim == 3 and decoded.shape[:2] == returned.shape[:2]
  assert returned.dtype == np.uint8 and returned.shape[-1] == 3
  # Not blank: many distinct colours and not a single flat value.
  assert returned.std() > 10
  assert len(np.unique(returned.reshape(-1, 3), axis=0)) > 50


def _cases(tmp):
  rng = np.random.default_rng(0)
  m = {n: rng.uniform(size=(3, 3)) for n in ('trained', 'init', 'classical')}
  per_band = {n: {b: {'effective_dim': 3.0 + i, 'rankme': 5.0, 'var_mean': 0.1 * i}
                  for i, b in enumerate(BANDS)} for n in ('trained', 'init')}
  table = embeddings.spearman_table(rng.normal(size=(40, 6)),
                                    {'mag': rng.normal(size=40), 'size': rng.normal(size=40)}, 3)
  img = rng.normal(size=(32, 32))
  img[10:14, 10:14] += 30
  return {
      'band_matrix': lambda p: plots.band_matrix(m, BANDS, 'title', p),
      'infomap_overlay': lambda p: plots.infomap_overlay(
          [img, img], [(img > 5).astype(float), np.zeros_like(img)], ['a', 'b'], p),
      'activation_vs_weight': lambda p: plots.activation_vs_weight(
          {'trained': (rng.uniform(size=300), rng.normal(size=300), 0.5)}, p),
      'per_band_bars': lambda p: plots.per_band_bars(per_band, BANDS,
                                                     ('effective_dim', 'var_mean'), p),
      'retrieval_bars': lambda p: plots.retrieval_bars(
          {'trained': {'global': {'top1': 0.8, 'top5': 0.9}, 'tokens': {'top1': 0.5, 'top5': 1}},
           'init': {'global': {'top1': 0.1, 'top5': 0.2}, 'tokens': {'top1': 0.1, 'top5': 0.3}}},
          0.05, 0.25, 'retrieval', p),
      'embedding_map': lambda p: plots.embedding_map(
          {'trained': rng.normal(size=(60, 2)), 'init': rng.normal(size=(60, 2))},
          np.where(np.arange(60) < 3, np.nan, rng.uniform(size=60)), 'mag', 'map', p),
      'embedding_map_categorical': lambda p: plots.embedding_map(
          {'trained': rng.normal(size=(60, 2))}, (np.arange(60) % 2).astype(float), 'is_star',
          'map', p, categorical=True),
      'spearman_heatmap': lambda p: plots.spearman_heatmap({'trained': table, 'init': table}, p),
      'model_comparison': lambda p: plots.model_comparison(
          embeddings.compare({'a': rng.normal(size=(20, 4)), 'b': rng.normal(size=(20, 3))}), p),
  }


@pytest.mark.parametrize('name', list(_cases('.')))
def test_plot_written_and_not_blank(tmp_path, name):
  path = str(tmp_path / 'sub' / f'{name}.png')
  returned = _cases(tmp_path)[name](path)
  _check_png(path, returned)
  assert not os.path.exists(path + '.tmp')
