"""evaluate.embed: the classical token-grid baseline and the held-out summary verdicts."""

import numpy as np

from jaisp_jax import bands
from jaisp_jax.evaluate import embed

REG = bands.default_registry()


def _point_source(px, pixel_scale, x_arcsec, y_arcsec, snr=50.0, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:px, :px] * pixel_scale
  img = snr * np.exp(-((xx - x_arcsec) ** 2 + (yy - y_arcsec) ** 2) / (2 * 0.3 ** 2))
  return (img + rng.normal(size=(px, px)))[None, None].astype(np.float32)  # (1, 1, H, W)


def test_classical_grid_puts_a_source_in_the_same_cell_in_both_instruments():
  fn = embed.classical_grid_fn(REG, 3.2)
  # 12.8" of sky: Rubin 64 px at 0.2", Euclid 128 px at 0.1"; a source at (8.0", 4.5").
  r = fn(_point_source(64, 0.2, 8.0, 4.5), None, 'rubin_r')
  e = fn(_point_source(128, 0.1, 8.0, 4.5, seed=1), None, 'euclid_vis')
  assert r.shape == e.shape == (1, 16)
  # Token (row 1, column 2) of the 4 x 4 grid of 3.2" tokens holds the source.
  assert int(np.argmax(r[0])) == int(np.argmax(e[0])) == 1 * 4 + 2


def _fig(t1, i1, grid_t, grid_c):
  side = lambda top1, grid: dict(retrieval_top1=top1, retrieval_top5=min(1.0, 3 * top1),
                                 chance_top1=0.01, n_chips=100.0, rankme=10.0,
                                 effective_dim=2.0, embed_dim=64.0,
                                 token_grid=dict(retrieval_top1=grid, retrieval_top5=grid))
  return dict(trained=side(t1, grid_t), init=side(i1, 0.02), query_band='rubin_r',
              gallery_band='euclid_vis', variant='jepa', step=10,
              classical_grid=dict(retrieval_top1=grid_c, retrieval_top5=grid_c))


def test_summary_verdicts_follow_the_figures():
  good = '\n'.join(embed.summary_lines(_fig(0.4, 0.01, 0.9, 0.8)))
  assert 'verdict: learned' in good and 'beats it (0.900 vs 0.800' in good
  bad = '\n'.join(embed.summary_lines(_fig(0.01, 0.02, 0.5, 0.8)))
  assert 'NOT LEARNED' in bad and 'does NOT beat it' in bad
