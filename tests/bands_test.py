"""Band registry: the default bands, validation, and a new instrument added as data."""

import ml_collections
import numpy as np
import pytest
import speclite.filters

from jaisp_jax import bands


def test_default_registry_has_the_ten_jaisp_bands():
  reg = bands.default_registry()
  assert reg.names == ('rubin_u', 'rubin_g', 'rubin_r', 'rubin_i', 'rubin_z', 'rubin_y',
                       'euclid_vis', 'euclid_y', 'euclid_j', 'euclid_h')
  assert reg.instruments == ('rubin', 'euclid')
  assert reg.pixel_scale('rubin') == 0.2 and reg.pixel_scale('euclid') == 0.1
  assert [b.index for b in reg.instrument_bands('euclid')] == [0, 1, 2, 3]
  assert reg['euclid_h'].index == 3 and reg.band_id('euclid_h') == 9


@pytest.mark.parametrize('prefix,instrument', [('lsst2023-', 'rubin'), ('Euclid-', 'euclid')])
def test_wavelengths_agree_with_filter_curves(prefix, instrument):
  reg = bands.default_registry()
  for band in reg.instrument_bands(instrument):
    suffix = band.name.split('_')[1]
    filt = speclite.filters.load_filter(
        prefix + (suffix.upper() if instrument == 'euclid' else suffix))
    lam = filt.effective_wavelength.to('nm').value
    assert abs(lam - band.wavelength_nm) / lam < 0.01, (band.name, lam)


def test_strides_give_the_same_sky_per_token():
  reg = bands.default_registry()
  assert reg.stride('rubin_r', 3.2) == 16
  assert reg.stride('euclid_vis', 3.2) == 32
  with pytest.raises(ValueError, match='not a whole number'):
    reg.stride('rubin_r', 0.3)


def test_new_instrument_from_config_is_data_not_code():
  cfg = ml_collections.ConfigDict()
  cfg.bands = bands.DEFAULT_BANDS + [
      dict(name='hst_f606w', instrument='hst', pixel_scale=0.05, wavelength_nm=590.0, index=0),
      dict(name='hst_f814w', instrument='hst', pixel_scale=0.05, wavelength_nm=805.0, index=1),
  ]
  reg = bands.BandRegistry.from_config(cfg.bands)
  assert len(reg) == 12
  assert reg.instruments == ('rubin', 'euclid', 'hst')
  assert reg.n_bands('hst') == 2
  assert reg.stride('hst_f814w', 3.2) == 64
  assert reg.band_id('hst_f606w') == 10
  # Round trip through plain data (what an exported bundle stores).
  assert bands.BandRegistry.from_dicts(reg.to_dicts()) == reg
  # Wavelength ordering across instruments, as used by hard-pair sampling.
  order = np.argsort([b.wavelength_nm for b in reg])
  assert reg.names[order[0]] == 'rubin_u' and reg.names[order[-1]] == 'euclid_h'


def test_empty_config_means_default():
  assert bands.BandRegistry.from_config([]) == bands.default_registry()


@pytest.mark.parametrize('entries,match', [
    ([dict(name='a', instrument='x', pixel_scale=0.1, wavelength_nm=500.0, index=1)],
     'indices must be 0..0'),
    ([dict(name='a', instrument='x', pixel_scale=0.1, wavelength_nm=500.0, index=0),
      dict(name='a', instrument='x', pixel_scale=0.1, wavelength_nm=600.0, index=1)],
     'duplicate band name'),
    ([dict(name='a', instrument='x', pixel_scale=0.1, wavelength_nm=500.0, index=0),
      dict(name='b', instrument='x', pixel_scale=0.2, wavelength_nm=600.0, index=1)],
     'share a pixel scale'),
    ([dict(name='a', instrument='x', pixel_scale=-1, wavelength_nm=500.0, index=0)],
     'pixel_scale must be > 0'),
    ([dict(name='a', instrument='x', pixel_scale=0.1, index=0)], 'missing fields'),
])
def test_bad_registries_fail_with_a_clear_message(entries, match):
  with pytest.raises(ValueError, match=match):
    bands.BandRegistry.from_dicts(entries)


def test_unknown_band_names_the_known_ones():
  with pytest.raises(KeyError, match='known bands: rubin_u'):
    bands.default_registry()['rubin_q']
