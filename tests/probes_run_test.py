"""run_probes: stable JSON schema for real (smoke) models, trained-vs-init plumbing with
known answers, and data without truth (probes that need truth skipped with a note)."""

import json

import jax
import numpy as np
import pytest

from jaisp_jax import inference
from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate import probes
from jaisp_jax.evaluate.probes import __main__ as probes_cli
from jaisp_jax.evaluate.probes import synthetic
from jaisp_jax.train import config as config_lib

SMALL = {
    'astrometry': {'bands': ['euclid_vis'], 'n_train_shifts': 1, 'register_max_chips': 1,
                   'register_half_mas': 50.0, 'sensitivity_max_chips': 1,
                   'sensitivity_bands': ['rubin_r'], 'head': {'steps': 50}},
    'detection': {'bands': ['rubin_r'], 'augment': 1, 'head': {'steps': 50}},
    'photometry': {'pairs': [['rubin_g', 'rubin_i']], 'head': {'steps': 50}},
}


def smoke_config():
  """configs/jepa.py:smoke, one transformer block (the schema does not need more)."""
  c = config_lib.sized(config_lib.base_config(), 'smoke')
  c.model.trunk.depth = 1
  return c


def test_schema_for_smoke_models():
  c = smoke_config()
  data = heldout_lib.load_heldout(c, max_chips=4, size=64, chip_px=64)
  params = inference.init_params(c)
  # A second, different model of the same architecture (initialising another costs a
  # compilation); the schema does not care which one is trained.
  other = jax.tree.map(lambda p: p * 1.5 + 0.01, params)
  models = {'trained': inference.from_params(other, c), 'init': inference.from_params(params, c)}
  cfg = probes.ProbesConfig.from_dict(
      {**SMALL, 'probes': ['astrometry', 'detection', 'photometry']})
  rep = probes.run_probes(models, data, cfg)
  text = json.dumps(rep, allow_nan=False)  # strict JSON: no NaN / inf anywhere
  assert json.loads(text) == rep
  assert rep['schema'] == probes.SCHEMA and rep['models'] == ['trained', 'init']
  assert rep['heldout']['has_truth'] and rep['heldout']['n_chips'] == 4
  assert rep['skipped'] == {} and 'realdata' not in rep
  a = rep['astrometry']
  assert set(a['baselines']['chip_level']) == {'zero', 'centroid', 'xcorr'}
  for name in ('trained', 'init'):
    m = a['models'][name]
    assert {'head', 'head_shuffled', 'register'} <= set(m['chip_level'])
    assert m['chip_level']['register']['n'] >= 1
    assert set(m['per_source']['head']) == {'all', 'isolated', 'snr_bins'}
    assert len(m['shift_sensitivity']['cosine']) == len(m['shift_sensitivity']['shifts_mas'])
    assert m['shift_sensitivity']['cosine'][0] == pytest.approx(1.0, abs=1e-4)
    det = rep['detection']['models'][name]['rubin_r']
    assert {'head', 'head_shuffled'} <= set(det)
    assert set(det['head']['completeness']) == {'snr>5', 'snr>10'}
    phot = rep['photometry']['models'][name]['rubin_g-rubin_i']
    assert set(phot) == {'head', 'head_shuffled'}
  assert set(rep['detection']['baselines']['rubin_r']) == {'sep', 'random'}
  assert set(rep['photometry']['baselines']['rubin_g-rubin_i']) >= {'median', 'aperture'}
  assert set(rep['seconds']) >= {'astrometry/trained', 'detection/init', 'photometry/baselines'}
  text = '\n'.join(probes_cli.headline(rep))
  for word in ('astrometry', 'detection rubin_r', 'colour rubin_g-rubin_i', 'trained', 'init'):
    assert word in text


def test_trained_and_init_side_by_side_with_known_answers():
  """A representation that keeps the pixels ('trained') vs one that keeps nothing
  ('init'): the report must put the first ahead where it should."""
  field = synthetic.star_field(n_chips=8, n_stars=8, snr_range=(100.0, 1000.0), seed=5)
  cfg = probes.ProbesConfig.from_dict({
      'probes': ['astrometry'],
      'astrometry': {'bands': ['rubin_g'], 'register_max_chips': 2, 'n_train_shifts': 1,
                     'register_half_mas': 100.0, 'sensitivity_bands': ['rubin_r'],
                     'sensitivity_max_chips': 2}})
  rep = probes.run_probes({'trained': synthetic.PixelModel(), 'init': synthetic.BlindModel()},
                          field, cfg)
  reg = {m: rep['astrometry']['models'][m]['chip_level']['register']['rms_mas']
         for m in ('trained', 'init')}
  zero = rep['astrometry']['models']['trained']['chip_level']['register']['zero_same_chips']
  assert reg['trained'] < 0.3 * zero['rms_mas'] < reg['init']
  drop = {m: rep['astrometry']['models'][m]['shift_sensitivity']['drop_at_100mas']
          for m in ('trained', 'init')}
  assert drop['trained'] > 0.01 and drop['init'] == pytest.approx(0.0, abs=1e-6)


def test_data_without_truth_skips_truth_probes_with_a_note():
  field = synthetic.star_field(n_chips=2, seed=6)
  bare = heldout_lib.HeldOut.from_arrays(field.registry, field.images, field.rms,
                                         band_valid=field.band_valid, source='user tiles')
  assert bare.truth is None
  cfg = probes.ProbesConfig.from_dict({
      'probes': ['astrometry', 'detection', 'photometry'],
      'astrometry': {'sensitivity_bands': ['rubin_r'], 'sensitivity_max_chips': 2}})
  rep = probes.run_probes({'trained': synthetic.PixelModel()}, bare, cfg)
  json.dumps(rep, allow_nan=False)
  assert set(rep['skipped']) == {'astrometry', 'detection', 'photometry'}
  assert all('no truth' in why for why in rep['skipped'].values())
  assert 'detection' not in rep and 'photometry' not in rep
  sens = rep['astrometry']['models']['trained']['shift_sensitivity']  # needs no truth
  assert sens['drop_at_100mas'] > 0.0
  assert rep['astrometry']['baselines']['pixels_shift_sensitivity']['drop_at_100mas'] > 0.0


def test_config_overrides_are_checked():
  sets = probes_cli.overrides(['detection.augment=2', 'astrometry.bands=["rubin_g"]',
                               'realdata.band=rubin_i'])
  assert sets == {'detection': {'augment': 2}, 'astrometry': {'bands': ['rubin_g']},
                  'realdata': {'band': 'rubin_i'}}
  cfg = probes.ProbesConfig.from_dict({'detection': {'bands': ['euclid_vis'], 'augment': 2}})
  assert cfg.detection.bands == ('euclid_vis',) and cfg.detection.augment == 2
  with pytest.raises(ValueError, match='no field'):
    probes.ProbesConfig.from_dict({'detection': {'band': 'rubin_r'}})
  with pytest.raises(ValueError, match='unknown probe'):
    probes.run_probes({}, synthetic.star_field(n_chips=2), probes.ProbesConfig(probes=('x',)))
  assert np.isnan(float('nan'))  # to_json turns NaN into None:
  assert probes.to_json({'a': float('nan'), 'b': (1, np.float32(2.5))}) == {'a': None,
                                                                           'b': [1, 2.5]}
