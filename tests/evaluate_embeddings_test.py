"""Retrieval, 2-D maps, correlations with properties, model comparison, pixel baseline."""

import sys

import numpy as np
import pytest

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.evaluate import embeddings


def test_retrieval_identical_is_perfect_and_shuffled_is_chance():
  rng = np.random.default_rng(0)
  n = 200
  z = rng.normal(size=(n, 32))
  same = embeddings.retrieval_figures(embeddings.global_scores(z, z))
  assert same['top1'] == 1.0 and same['top5'] == 1.0
  assert same['chance_top1'] == pytest.approx(1 / n)
  shuffled = embeddings.retrieval_figures(embeddings.global_scores(z, z[rng.permutation(n)]))
  assert shuffled['top1'] < 5 / n          # expected 1/N for a derangement-like order
  assert shuffled['top5'] < 15 / n
  # Constant embeddings tie everywhere: ties count against the query.
  const = embeddings.retrieval_figures(embeddings.global_scores(np.ones((n, 4)),
                                                                np.ones((n, 4))))
  assert const['top1'] == 0.0


def test_top_k_by_hand():
  scores = np.array([[0.9, 0.1, 0.95],   # own 0.9 is second -> top1 no, top2 yes
                     [0.0, 0.5, 0.2],    # own first
                     [0.3, 0.2, 0.1]])   # own last
  assert embeddings.top_k_from_scores(scores, 1) == pytest.approx(1 / 3)
  assert embeddings.top_k_from_scores(scores, 2) == pytest.approx(2 / 3)
  assert embeddings.top_k_from_scores(scores, 3) == pytest.approx(1.0)


def test_token_grid_scores():
  rng = np.random.default_rng(1)
  t = rng.normal(size=(30, 9, 8))
  s = embeddings.token_grid_scores(t, t, rng.uniform(size=(30, 9)))
  np.testing.assert_allclose(np.diag(s), 1.0)
  assert embeddings.top_k_from_scores(s, 1) == 1.0
  # Tokens permuted in position no longer match: the grid position matters.
  moved = t[:, rng.permutation(9)]
  s2 = embeddings.token_grid_scores(t, moved)
  assert np.mean(np.diag(s2)) < 0.5


def test_pca_and_reduce_2d_fallback(monkeypatch):
  rng = np.random.default_rng(2)
  x = rng.normal(size=(50, 6)) * np.array([10, 3, 1, 1, 1, 1])
  proj, ratio = embeddings.pca(x, 2)
  assert proj.shape == (50, 2) and ratio[0] > ratio[1] > 0
  xy, method = embeddings.reduce_2d(x, 'pca')
  assert method == 'pca' and xy.shape == (50, 2)
  monkeypatch.setitem(sys.modules, 'umap', None)    # umap-learn not installed
  xy, method = embeddings.reduce_2d(x, 'umap')
  assert method == 'pca' and xy.shape == (50, 2)
  with pytest.raises(ValueError):
    embeddings.reduce_2d(x, 'tsne')


def test_spearman_table_finds_the_encoded_property():
  rng = np.random.default_rng(3)
  n = 300
  mag = rng.uniform(18, 25, size=n)
  noise = rng.normal(size=n)
  # Embedding: mag along a random direction (dominant variance), plus small noise.
  direction = rng.normal(size=16)
  z = np.outer(mag - mag.mean(), direction) + 0.1 * rng.normal(size=(n, 16))
  props = {'mag': mag, 'unrelated': noise, 'with_nan': np.where(np.arange(n) < 5, np.nan, mag)}
  t = embeddings.spearman_table(z, props, n_components=3)
  assert t['best']['mag'] > 0.99
  assert t['best']['unrelated'] < 0.25
  assert t['null']['mag'] < 0.25          # shuffled property: chance level
  assert t['n']['with_nan'] == n - 5 and t['best']['with_nan'] > 0.99
  assert len(t['rho']['mag']) == 3


def test_cka_and_profile_cosine_are_rotation_invariant():
  rng = np.random.default_rng(4)
  a = rng.normal(size=(100, 12))
  rot = np.linalg.qr(rng.normal(size=(12, 12)))[0]
  assert embeddings.linear_cka(a, 3.0 * a @ rot) == pytest.approx(1.0)
  assert embeddings.linear_cka(a, rng.normal(size=(100, 20))) < 0.3
  np.testing.assert_allclose(embeddings.profile_cosine(a, a @ rot), 1.0, atol=1e-9)
  out = embeddings.compare({'x': a, 'y': a @ rot, 'z': rng.normal(size=(100, 5))})
  assert out['models'] == ['x', 'y', 'z']
  assert out['cka'][0][1] == pytest.approx(1.0) and out['cka'][0][2] < 0.3


def test_source_tokens_index():
  tokens = np.arange(2 * 6 * 1).reshape(2, 6, 1).astype(float)   # 2 chips, 2 x 3 grid
  # token 16 px: pixel (x=40, y=20) -> row 1, col 2 -> index 5
  z = embeddings.source_tokens(tokens, (2, 3), np.array([1, 0]), np.array([40.0, 0.0]),
                               np.array([20.0, 0.0]), 16)
  np.testing.assert_array_equal(z[:, 0], [6 + 5, 0])


def test_pixel_baseline_contract_and_same_sky_similarity():
  reg = bands_lib.default_registry()
  chips = batch_lib.synthetic_chips_batch(0, reg, 4, 12.8)        # same sources in all bands
  base = embeddings.PixelBaseline(reg, 3.2)
  r = base.get_representation(chips['rubin']['image'][:, 2:3], chips['rubin']['rms'][:, 2:3],
                              'rubin_r')
  e = base.get_representation(chips['euclid']['image'][:, :1], chips['euclid']['rms'][:, :1],
                              'euclid_vis')
  assert r['tokens'].shape == e['tokens'].shape == (4, 16, 256)
  assert r['global'].shape == e['global'].shape == (4, 64 * 64)
  assert r['weights'].shape == (4, 1, 64, 64) and e['weights'].shape == (4, 1, 128, 128)
  s = embeddings.global_scores(r['global'], e['global'])
  assert embeddings.top_k_from_scores(s, 1) == 1.0      # same sky: cross-correlation finds it
  assert np.all(np.diag(s) > 0.5)
