"""Held-out evaluation of the train loop: which chips it uses, what a collapsed encoder scores."""

import copy

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaisp_jax import bands
from jaisp_jax.data import pipeline
from jaisp_jax.train import online_eval

REG = bands.default_registry()
# The loop passes its batch sharding (collect_chips does not need it).
SHARDING = NamedSharding(Mesh(np.array(jax.devices()[:1]), ('data',)), P('data'))


def test_retrieval_top_k_counts_ties_against_the_query():
  rng = np.random.default_rng(0)
  # A collapsed encoder: every embedding equal. Ties must not count as hits.
  same = np.ones((8, 4))
  assert online_eval.retrieval_top_k(same, same, 1) == 0.0
  assert online_eval.retrieval_top_k(same, same, 5) == 0.0
  # A perfect encoder (the gallery is the query, plus a little noise).
  q = rng.normal(size=(8, 4))
  assert online_eval.retrieval_top_k(q, q + 1e-3 * rng.normal(size=q.shape), 1) == 1.0
  # Gallery row 0 duplicated into row 1: query 1 ties with row 0 and loses top-1,
  # keeps top-2; query 0 ties with row 1 likewise.
  g = q.copy()
  g[1] = g[0]
  q2 = g.copy()
  assert online_eval.retrieval_top_k(q2, g, 1) == 6 / 8
  assert online_eval.retrieval_top_k(q2, g, 2) == 1.0


def _config(max_chips, **simulate):
  data = pipeline.default_data_config()
  data.simulate.update(size=64, **simulate)
  data.crop_arcsec = 6.4  # Rubin 32 px, Euclid 64 px
  return ml_collections.ConfigDict({'data': data, 'eval': {
      'max_chips': max_chips, 'query_band': 'rubin_r', 'gallery_band': 'euclid_vis'}})


def _stats_embed(image, rms, band):
  """A fixed, non-learned embedding (B, 4) of any band: pixel statistics."""
  del rms, band
  x = image.reshape(len(image), -1)
  return np.stack([x.mean(1), x.std(1), np.abs(x).max(1), (x > 0).mean(1)], axis=1)


def _distinct_chips(chips):
  flat = chips['rubin']['image'].reshape(len(chips['rubin']['image']), -1)
  return len(np.unique(flat, axis=0))


# 4 tiles of 64 px cut into 32 px chips: 16 chips, 4 of them (one tile) held out.
MANY = dict(n_tiles=4, chip_px=32, val_fraction=0.2)


def test_each_held_out_chip_is_used_once_and_chance_is_one_over_their_number():
  c = _config(16, **MANY)
  n = len(pipeline.open_source(c.data, 'validation', REG))
  assert 2 <= n < 16
  chips = online_eval.collect_chips(c, REG, SHARDING)
  # min(N, max_chips) chips, all distinct (the old pass filled a 16-chip batch with
  # crops of these n chips and reported 16 chips, chance 1/16).
  assert chips['rubin']['image'].shape[0] == chips['euclid']['image'].shape[0] == n
  assert _distinct_chips(chips) == n
  res = online_eval.evaluate(_stats_embed, chips, c, REG)
  assert res['n_chips'] == n and res['chance_top1'] == pytest.approx(1 / n)
  assert 0.0 <= res['retrieval_top1'] <= 1.0
  # Same config, same chips; a smaller max_chips takes the first of them.
  jax.tree.map(np.testing.assert_array_equal, chips, online_eval.collect_chips(c, REG, SHARDING))
  c.eval.max_chips = n - 1
  first = online_eval.collect_chips(c, REG, SHARDING)
  assert _distinct_chips(first) == n - 1
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b[:n - 1]), first, chips)
  assert online_eval.evaluate(_stats_embed, first, c, REG)['chance_top1'] == pytest.approx(
      1 / (n - 1))


def test_a_single_held_out_chip_is_one_chip_and_retrieval_is_nan(capsys):
  # The smoke configs' simulated validation split can be one chip (one tile).
  c = _config(16, n_tiles=2, chip_px=64, val_fraction=0.5)
  assert len(pipeline.open_source(c.data, 'validation', REG)) == 1
  chips = online_eval.collect_chips(c, REG, SHARDING)
  assert chips['rubin']['image'].shape[0] == 1
  assert 'retrieval needs at least 2' in capsys.readouterr().err
  res = online_eval.evaluate(_stats_embed, chips, c, REG)
  assert res['n_chips'] == 1 and res['chance_top1'] == 1.0
  assert np.isnan(res['retrieval_top1']) and np.isnan(res['retrieval_top5'])
  assert np.isfinite(res['rankme'])


def test_collapse_warning_is_relative_to_the_rank_the_chips_allow():
  base = {'embed_dim': 64.0, 'n_chips': 128.0}
  assert online_eval.collapse_warning({**base, 'rankme': 5.0}, 0.1) is not None  # < 6.4
  assert online_eval.collapse_warning({**base, 'rankme': 7.0}, 0.1) is None
  # One chip: 2 embeddings, RankMe at most 2, which says nothing about collapse...
  assert online_eval.collapse_warning({**base, 'n_chips': 1.0, 'rankme': 2.0}, 0.1) is None
  # ... unless even those 2 are one direction.
  assert '2N' in online_eval.collapse_warning({**base, 'n_chips': 1.0, 'rankme': 1.0}, 0.6)


def test_chips_whose_query_or_gallery_band_is_masked_are_left_out(capsys):
  c = _config(16, **MANY)
  records = pipeline.simulated_source(c.data, 'validation', REG)
  n = len(records)
  full = online_eval.collect_chips(c, REG, SHARDING)
  assert full['rubin']['image'].shape[0] == n
  assert 'left out' not in capsys.readouterr().err
  # Chip 0: Euclid VIS (the gallery band) flagged invalid; chip 1: Rubin r (the query
  # band) with 3/4 of its pixels masked (rms 0), still flagged valid; chip 2: another
  # band (Euclid Y) masked, which does not matter for r -> VIS retrieval.
  damaged = copy.deepcopy(records)
  vis, r, y = REG['euclid_vis'], REG['rubin_r'], REG['euclid_y']
  damaged[0]['instruments']['euclid']['band_valid'][vis.index] = False
  rms = damaged[1]['instruments']['rubin']['rms']
  rms[r.index, : 3 * rms.shape[1] // 4] = 0.0
  damaged[2]['instruments']['euclid']['band_valid'][y.index] = False
  chips = online_eval.collect_chips(c, REG, SHARDING, source=damaged)
  assert 'note: held-out evaluation: 2 chip(s)' in capsys.readouterr().err
  # The chips kept are chips 2.. of the undamaged split, in order (chip 2 with its Y flag).
  same = lambda a, b, k: [np.testing.assert_array_equal(a[i][f], b[i][f][k])
                          for i in ('rubin', 'euclid') for f in ('image', 'rms')]
  same(chips, full, slice(2, None))
  assert not chips['euclid']['band_valid'][0, y.index]
  res = online_eval.evaluate(_stats_embed, chips, c, REG)
  assert res['n_chips'] == n - 2 and res['chance_top1'] == pytest.approx(1 / (n - 2))
  # max_chips counts usable chips: the first two usable ones are chips 2 and 3.
  c.eval.max_chips = 2
  first = online_eval.collect_chips(c, REG, SHARDING, source=damaged)
  same(first, full, slice(2, 4))
  # No chip with both bands usable: a user error naming the bands, not a nan figure.
  for rec in damaged:
    rec['instruments']['euclid']['band_valid'][vis.index] = False
  with pytest.raises(online_eval.UserError, match='no chip with both rubin_r and euclid_vis'):
    online_eval.collect_chips(c, REG, SHARDING, source=damaged)
  c.eval.gallery_band = 'euclid_k'
  with pytest.raises(online_eval.UserError, match="'euclid_k' is not in the band registry"):
    online_eval.collect_chips(c, REG, SHARDING)
