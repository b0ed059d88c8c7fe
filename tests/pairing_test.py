"""Pair sampling matches the configured mixture, respects band validity, any registry."""

import numpy as np
import pytest
from scipy import stats

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.data import pairing

# A goodness-of-fit test at this level fails by chance once in 10^4 seeds; the seeds
# are fixed, so a failure means the sampler's distribution is wrong.
P_MIN = 1e-4


def _three_instrument_registry():
  return bands.BandRegistry.from_dicts(bands.DEFAULT_BANDS + [
      dict(name='hst_f606w', instrument='hst', pixel_scale=0.05, wavelength_nm=590.0, index=0),
      dict(name='hst_f814w', instrument='hst', pixel_scale=0.05, wavelength_nm=805.0, index=1),
  ])


def _draw_batches(sampler, quotas, n_batches, seed, band_valid=None):
  """Draws `n_batches` batches; returns (pair index, kind, combo, draw) arrays."""
  rng = np.random.default_rng(seed)
  pair_idx, kinds, combos, draws = [], [], [], []
  for _ in range(n_batches):
    for combo, q in quotas.items():
      for _ in range(q):
        d = sampler.sample(rng, combo, band_valid)
        pair_idx.append(sampler.pair_index(d.band_a, d.band_b))
        kinds.append(d.kind)
        combos.append(combo)
        draws.append(d)
  return np.array(pair_idx), np.array(kinds), combos, draws


def _chi2_pvalue(observed_idx, probs):
  """Chi-square goodness of fit of integer observations against `probs`."""
  counts = np.bincount(observed_idx, minlength=len(probs))
  support = probs > 0
  assert counts[~support].sum() == 0, 'drew a category of zero probability'
  expected = probs[support] / probs[support].sum() * counts.sum()
  return stats.chisquare(counts[support], expected).pvalue


def test_exact_quotas_reproduce_configured_mixture():
  reg = bands.default_registry()
  sampler = pairing.PairSampler(reg)
  # The default mixture gives P(combo) = (10, 127, 13) / 150: 150 pairs round exactly.
  quotas = sampler.quotas(150, multiple=1)
  report = sampler.rounding_report(quotas)
  assert report['pair_total_variation'] < 1e-9
  pair_idx, kinds, _, _ = _draw_batches(sampler, quotas, n_batches=120, seed=0)
  assert _chi2_pvalue(pair_idx, sampler.pair_probs) > P_MIN
  assert _chi2_pvalue(kinds, np.array([0.5, 0.3, 0.2])) > P_MIN


def test_rounded_quotas_match_effective_mixture_and_report_rounding():
  reg = bands.default_registry()
  sampler = pairing.PairSampler(reg, {'cross_instrument': 0.4, 'hard': 0.4, 'random': 0.2})
  quotas = sampler.quotas(64, multiple=8)
  assert sum(quotas.values()) == 64 and all(q % 8 == 0 for q in quotas.values())
  for combo, p in sampler.combo_probs().items():
    assert abs(quotas[combo] - 64 * p) < 8  # largest remainder: off by less than one unit
  report = sampler.rounding_report(quotas)
  assert report['pair_total_variation'] > 0  # this configuration does not round exactly
  pair_idx, kinds, _, _ = _draw_batches(sampler, quotas, n_batches=200, seed=1)
  assert _chi2_pvalue(pair_idx, sampler.effective_pair_probs(quotas)) > P_MIN
  assert _chi2_pvalue(kinds, sampler.effective_kind_probs(quotas)) > P_MIN


def test_strategy_labels_are_consistent_and_every_band_is_used():
  reg = bands.default_registry()
  sampler = pairing.PairSampler(reg, hard_min_gap_nm=700.0)
  quotas = sampler.quotas(150, multiple=1)
  _, kinds, combos, draws = _draw_batches(sampler, quotas, n_batches=30, seed=2)
  for d, combo in zip(draws, combos):
    a, b = reg.bands[d.band_a], reg.bands[d.band_b]
    assert a.name != b.name
    assert batch_lib.combo_key(a.instrument, b.instrument) == combo
    if batch_lib.PAIR_KINDS[d.kind] == 'cross_instrument':
      assert a.instrument != b.instrument
    if batch_lib.PAIR_KINDS[d.kind] == 'hard':
      assert abs(a.wavelength_nm - b.wavelength_nm) >= 700.0
  usage = pairing.BandUsage(reg)
  usage.update({'all': dict(kind=kinds,
                            a=dict(band=np.array([d.band_a for d in draws])),
                            b=dict(band=np.array([d.band_b for d in draws])))})
  m = usage.metrics()
  assert usage.counts.sum() == 2 * len(draws)
  assert m['data/band_frac_min'] > 0  # every band drawn
  assert sum(m[f'data/band_frac/{n}'] for n in reg.names) == pytest.approx(1.0)
  assert m['data/kind_frac/hard'] > 0 and m['data/kind_frac/random'] > 0


def test_invalid_bands_are_never_drawn_and_impossible_combo_returns_none():
  reg = bands.default_registry()
  sampler = pairing.PairSampler(reg)
  rng = np.random.default_rng(3)
  for _ in range(500):
    valid = rng.random(len(reg)) < 0.6
    for combo in sampler.combo_names:
      d = sampler.sample(rng, combo, valid)
      inst_a, inst_b = combo.split('-')
      n_a = sum(valid[reg.band_id(b.name)] for b in reg.instrument_bands(inst_a))
      n_b = sum(valid[reg.band_id(b.name)] for b in reg.instrument_bands(inst_b))
      possible = (n_a >= 2) if inst_a == inst_b else (n_a >= 1 and n_b >= 1)
      assert (d is not None) == possible
      if d is not None:
        assert valid[d.band_a] and valid[d.band_b]
  no_euclid = np.array([b.instrument == 'rubin' for b in reg.bands])
  assert sampler.sample(rng, 'rubin-euclid', no_euclid) is None


def test_three_instruments_give_six_combos_and_the_mixture():
  reg = _three_instrument_registry()
  sampler = pairing.PairSampler(reg)
  assert len(sampler.combo_names) == 6 and 'euclid-hst' in sampler.combo_names
  assert sum(sampler.combo_probs().values()) == pytest.approx(1.0)
  quotas = sampler.quotas(96, multiple=4)
  assert sum(quotas.values()) == 96
  pair_idx, kinds, combos, draws = _draw_batches(sampler, quotas, n_batches=60, seed=4)
  assert _chi2_pvalue(pair_idx, sampler.effective_pair_probs(quotas)) > P_MIN
  for d, combo in zip(draws, combos):
    assert combo == batch_lib.combo_key(reg.bands[d.band_a].instrument,
                                        reg.bands[d.band_b].instrument)


def test_min_per_combo_keeps_every_combination():
  sampler = pairing.PairSampler(bands.default_registry())
  strict = sampler.quotas(32, multiple=8)
  assert strict['rubin-rubin'] == 0  # P(rubin-rubin) = 1/15 rounds away at 32 pairs
  kept = sampler.quotas(32, multiple=8, min_per_combo=8)
  assert sum(kept.values()) == 32 and min(kept.values()) == 8
  with pytest.raises(ValueError, match='does not fit'):
    sampler.quotas(16, multiple=8, min_per_combo=8)


def test_bad_configuration_is_rejected():
  reg = bands.default_registry()
  with pytest.raises(ValueError, match='sum to 1'):
    pairing.PairSampler(reg, {'cross_instrument': 0.5, 'hard': 0.3})
  with pytest.raises(ValueError, match='unknown pairing'):
    pairing.PairSampler(reg, {'easy': 1.0})
  single = bands.BandRegistry.from_dicts(bands.DEFAULT_BANDS[:6])
  with pytest.raises(ValueError, match='cross_instrument'):
    pairing.PairSampler(single)
  with pytest.raises(ValueError, match='multiple'):
    pairing.PairSampler(reg).quotas(30, multiple=8)


def test_draws_equal_the_direct_restricted_mixture_draw():
  """The cached per-(combo, valid bands) tables give the draws of the plain formula."""
  reg = bands.default_registry()
  sampler = pairing.PairSampler(reg)
  masks = [None] + [np.random.default_rng(s).random(len(reg)) < 0.7 for s in range(4)]
  rng, ref_rng = np.random.default_rng(9), np.random.default_rng(9)
  for t in range(300):
    valid = masks[t % len(masks)]
    combo = sampler.combo_names[t % len(sampler.combo_names)]
    got = sampler.sample(rng, combo, valid)
    # The plain draw: restrict P(pair) to the combo's valid pairs, renormalise.
    idx = np.flatnonzero(sampler.pair_combo == sampler.combo_names.index(combo))
    w = sampler.pair_probs[idx] * (1.0 if valid is None else
                                   valid[sampler.pair_a[idx]] & valid[sampler.pair_b[idx]])
    if w.sum() <= 0:
      assert got is None
      continue
    j = idx[ref_rng.choice(len(idx), p=w / w.sum())]
    kind = int(ref_rng.choice(len(batch_lib.PAIR_KINDS), p=sampler.kind_given_pair[:, j]))
    a, b = int(sampler.pair_a[j]), int(sampler.pair_b[j])
    if reg.bands[a].instrument == reg.bands[b].instrument and ref_rng.random() < 0.5:
      a, b = b, a
    assert got == pairing.PairDraw(a, b, kind)
