"""Detection probe: matching, sep baseline, and a head that learns from informative tokens
but lands at chance on a blind representation and on shuffled labels."""

import numpy as np
import pytest

from jaisp_jax.evaluate.probes import detection
from jaisp_jax.evaluate.probes import synthetic


def test_match_is_one_to_one_nearest_first():
  det = np.array([[0.0, 0.0], [0.3, 0.0], [10.0, 10.0]])
  true = np.array([[0.2, 0.0], [5.0, 5.0]])
  dm, tm = detection.match(det, true, radius=1.0)
  np.testing.assert_array_equal(dm, [-1, 0, -1])  # the nearer detection wins the source
  np.testing.assert_array_equal(tm, [1, -1])


def test_dihedral_positions_follow_the_image():
  img = np.zeros((16, 16))
  img[3, 11] = 1.0  # x = 11, y = 3
  for t in range(8):
    j = np.unravel_index(np.argmax(detection.dihedral(img, t)), img.shape)
    x, y = detection.dihedral_xy(np.array([11.0]), np.array([3.0]), t, 16)
    assert (x[0], y[0]) == (j[1], j[0])


@pytest.fixture(scope='module')
def field():
  # Stars uniformly placed (not at token centres), S/N 8-200.
  return synthetic.star_field(n_chips=12, n_stars=8, snr_range=(8.0, 200.0), jitter_px=8.0,
                              seed=3)


CFG = detection.DetectionConfig(bands=('rubin_r',), augment=4)


def test_sep_finds_the_stars_and_random_does_not(field):
  base = detection.baselines(field, CFG)['rubin_r']
  assert base['sep']['completeness']['snr>10'] > 0.9
  assert base['sep']['purity'] > 0.9
  assert base['random']['f1'] < 0.15


def test_head_beats_chance_on_informative_tokens_only(field):
  base = detection.baselines(field, CFG)['rubin_r']
  good = detection.run(synthetic.MomentModel(), field, CFG)['rubin_r']
  assert good['head']['f1'] > 0.6
  assert good['head']['completeness']['snr>10'] > 0.5
  assert good['head']['purity'] > 0.6
  # Shuffled labels and a representation that carries nothing: near chance.
  assert good['head_shuffled']['f1'] < max(0.15, 2 * base['random']['f1'])
  blind = detection.run(synthetic.BlindModel(), field, CFG)['rubin_r']
  assert blind['head']['f1'] < max(0.15, 2 * base['random']['f1'])
