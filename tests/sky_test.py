"""Physics of the simulated sky: spectra and band fluxes, population, PSFs, drawing."""

import math
import os

import numpy as np
import pytest

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import observe, sky

REGISTRY = bands_lib.default_registry()
FILTERS = [sky.SPECLITE_FILTERS[b] for b in REGISTRY.names]


def _fluxes(cat):
  flux_bulge, flux_disk = sky.band_fluxes(cat, REGISTRY.names)
  return dict(zip(REGISTRY.names, (flux_bulge + flux_disk)[0]))


# -- spectra and band fluxes ----------------------------------------------------------

@pytest.mark.parametrize('spectrum', ['Sbc z=1.3', 'Im z=3.2', 'blackbody 4000K'])
def test_ab_magnitudes_agree_with_speclite(spectrum):
  import speclite.filters
  wave = sky.wave_grid()
  if spectrum.startswith('blackbody'):
    flambda = sky.blackbody_flambda(4000.0, wave)
    flambda = flambda / flambda.max() * 1e-17
  else:
    gtype, z = spectrum.split()
    flambda = sky.galaxy_flambda(gtype, float(z[2:]), wave) * 1e-17
  ours = sky.ab_magnitudes(flambda, FILTERS)
  theirs = speclite.filters.load_filters(*FILTERS).get_ab_magnitudes(flambda, wave)
  np.testing.assert_allclose(ours, [theirs[name][0] for name in theirs.colnames], atol=2e-3)


def test_madau_transmission():
  z = 4.0
  wave = np.array([1300.0, 1150.0, 1000.0, 880.0, 700.0]) * (1 + z)   # rest-frame Angstrom
  t = sky.madau_transmission(wave, z)
  assert t[0] == 1.0                       # redward of Lyman alpha: no absorption
  assert 0.3 < t[1] < 0.6                  # Lyman alpha forest at z ~ 4 (Madau 1995 fig. 3)
  assert t[2] < t[1]                       # more series lines bluer
  assert t[4] < t[3] < 0.2 and t[4] < 0.01  # Lyman-limit systems beyond 912 A
  assert np.all(sky.madau_transmission(wave, 0.2) == 1.0)


def test_high_redshift_galaxies_drop_out_of_blue_bands():
  kwargs = dict(x=0.0, y=0.0, mag_ref=24.0, sed='Scd', bulge_frac=0.0, hlr_disk=0.3,
                hlr_bulge=0.1)
  low = _fluxes(sky.make_galaxies(redshift=0.5, **kwargs))
  u_drop = _fluxes(sky.make_galaxies(redshift=3.5, **kwargs))
  g_drop = _fluxes(sky.make_galaxies(redshift=4.8, **kwargs))
  assert low['rubin_u'] / low['rubin_i'] > 0.1
  assert u_drop['rubin_u'] / u_drop['rubin_i'] < 0.05
  assert u_drop['rubin_g'] / u_drop['rubin_i'] > 0.3
  assert g_drop['rubin_g'] / g_drop['rubin_i'] < 0.05
  # ... while they stay bright in the near infrared.
  assert g_drop['euclid_h'] > g_drop['rubin_i']


def test_red_galaxies_are_faint_in_u_and_bright_in_the_infrared():
  kwargs = dict(x=0.0, y=0.0, mag_ref=22.0, redshift=1.0, hlr_disk=0.3, hlr_bulge=0.2)
  red = _fluxes(sky.make_galaxies(sed='E', bulge_frac=1.0, **kwargs))
  blue = _fluxes(sky.make_galaxies(sed='Im', bulge_frac=0.0, **kwargs))
  assert red['rubin_u'] / red['rubin_i'] < 0.1 < blue['rubin_u'] / blue['rubin_i']
  assert red['euclid_h'] / red['rubin_i'] > 3 * blue['euclid_h'] / blue['rubin_i']


def test_bulge_and_disk_fluxes_add_up_in_the_reference_band():
  cat = sky.make_galaxies(x=[0.0, 1.0], y=0.0, mag_ref=[21.0, 23.5], redshift=[0.3, 1.7],
                          sed=['Sbc', 'Scd'], bulge_frac=[0.4, 0.1], hlr_disk=0.5, hlr_bulge=0.2)
  flux_bulge, flux_disk = sky.band_fluxes(cat, ['rubin_i'])
  np.testing.assert_allclose((flux_bulge + flux_disk)[:, 0], sky.njy_from_mag([21.0, 23.5]),
                             rtol=1e-9)
  np.testing.assert_allclose(flux_bulge[:, 0] / (flux_bulge + flux_disk)[:, 0], [0.4, 0.1])


def test_unknown_band_fails_clearly():
  with pytest.raises(ValueError, match='hst_f606w'):
    sky.band_fluxes(sky.make_stars(0.0, 0.0, 20.0, 5000.0), ['hst_f606w'])


# -- population ---------------------------------------------------------------------------

def test_population_follows_the_documented_counts_sizes_and_redshifts():
  rng = np.random.default_rng(0)
  side = 600.0                                     # arcsec: 100 arcmin^2
  cat = sky.sample_population(rng, (0.0, side), (0.0, side), 1.0)
  area = side**2 / 3600.0
  gal = cat['type'] == 'galaxy'
  mag = cat['mag_ref'][gal]
  # LSST Science Book eq. 3.7: N(i < 25) = 46 / arcmin^2 (here counted from i = 18).
  expected = area * 46.0 * (1 - 10**(0.31 * (18 - 25)))
  assert abs((mag < 25).sum() - expected) < 5 * math.sqrt(expected)
  assert mag.max() <= 28.0 and (mag > 27).sum() > (mag < 26).sum()   # rising to 28
  # Eq. 3.8: mean redshift 3 z0 with z0 = 0.0417 i - 0.744.
  sel = (mag > 24.0) & (mag < 25.0)
  assert np.mean(cat['redshift'][gal][sel]) == pytest.approx(3 * (0.0417 * 24.5 - 0.744),
                                                             rel=0.1)
  # CFHTLenS disk sizes: median half-light radius 1.678 exp(-1.145) at i = 23.
  sel = (mag > 22.8) & (mag < 23.2)
  assert np.median(cat['hlr_disk'][gal][sel]) == pytest.approx(1.678 * math.exp(-1.145),
                                                               rel=0.15)
  assert set(cat['sed'][gal]) == set(sky.GALAXY_TYPES)
  assert np.all((cat['q_disk'][gal] >= 0.2) & (cat['q_disk'][gal] <= 1.0))
  n_star = (~gal).sum()
  assert abs(n_star - area * 1.0) < 5 * math.sqrt(area)
  x, y = cat['x'], cat['y']
  assert x.min() >= 0 and x.max() <= side and y.min() >= 0 and y.max() <= side


# -- instruments -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def physics():
  return {b.name: observe.band_physics(b) for b in REGISTRY}


def _nominal(phys):
  return observe.BandConditions(psf_fwhm=phys.psf_fwhm, psf_g1=0.0, psf_g2=0.0, dx_mas=0.0,
                                dy_mas=0.0, depth_factor=1.0, rms_gradient=0.0,
                                rms_gradient_angle_deg=0.0)


def test_psfs_have_the_survey_fwhm_and_depend_on_wavelength(physics):
  import surveycodex
  vis = physics['euclid_vis']
  assert vis.psf_fwhm == surveycodex.get_survey('Euclid_VIS').get_filter('IE').psf_fwhm.value
  fwhm = {}
  for name, phys in physics.items():
    psf, _ = observe.band_psf(phys, _nominal(phys))
    fwhm[name] = psf.calculateFWHM()
    assert fwhm[name] == pytest.approx(phys.psf_fwhm, rel=0.03), name
  assert fwhm['rubin_u'] > fwhm['rubin_y']                 # seeing ~ lambda^-0.2
  assert fwhm['euclid_vis'] < 0.3 * fwhm['rubin_r']        # space vs ground
  # Diffraction: the Airy core of H is ~2.4x wider than VIS's (lambda / D).
  assert physics['euclid_h'].wavelength_nm / physics['euclid_vis'].wavelength_nm > 2.3
  assert fwhm['euclid_h'] > 2 * fwhm['euclid_vis']
  assert not vis.ground and physics['rubin_r'].ground
  assert physics['euclid_h'].resample == 3 and vis.resample == 1


def _psf_image(phys, size=64):
  """The PSF on native pixels, normalised to unit sum."""
  psf, _ = observe.band_psf(phys, _nominal(phys))
  image = psf.drawImage(nx=size, ny=size, scale=phys.native_pixel_scale,
                        method='auto' if phys.ground else 'no_pixel').array
  return image / image.sum()


def _aperture_depth(phys, diameter, n_sigma, corrected):
  """n_sigma depth (AB) in a circular aperture on native pixels (optionally corrected
  for the PSF light outside it, as published point-source depths are)."""
  image = _psf_image(phys)
  yy, xx = np.mgrid[0:64, 0:64]
  inside = np.hypot(xx - 31.5, yy - 31.5) * phys.native_pixel_scale < diameter / 2
  sigma = phys.rms_native * math.sqrt(math.pi * (diameter / 2 / phys.native_pixel_scale)**2)
  flux = n_sigma * sigma / (image[inside].sum() if corrected else 1.0)
  return sky.AB_NJY - 2.5 * math.log10(flux)


# Published depths. Rubin: 10-year coadds, 5 sigma point sources (Ivezic et al. 2019, ApJ
# 873, 111, Table 1). Euclid VIS: stacks of the Wide survey reach I_E = 25.6 at 10 sigma
# in 1.3" apertures (Euclid Collaboration: McCracken et al. 2025, arXiv:2503.15303).
# NISP: ~24.5 at 5 sigma for point sources in three ~100 s exposures (Euclid
# Collaboration: Jahnke et al. 2025); we use 4 x 112 s (surveycodex), ~0.3 mag deeper.
PUBLISHED_DEPTHS = {'rubin_u': 26.1, 'rubin_g': 27.4, 'rubin_r': 27.5, 'rubin_i': 26.8,
                    'rubin_z': 26.1, 'rubin_y': 24.9, 'euclid_vis': 25.6, 'euclid_y': 24.5,
                    'euclid_j': 24.5, 'euclid_h': 24.5}


def test_depths_match_published_values(physics):
  depth = {}
  for name, phys in physics.items():
    if phys.ground:      # PSF-optimal point-source depth, as in Ivezic et al.
      sigma = phys.rms_native / math.sqrt((_psf_image(phys)**2).sum())
      depth[name] = sky.AB_NJY - 2.5 * math.log10(5 * sigma)
    elif name == 'euclid_vis':
      depth[name] = _aperture_depth(phys, 1.3, 10, corrected=False)
    else:
      depth[name] = _aperture_depth(phys, 1.2, 5, corrected=True)
  for name, published in PUBLISHED_DEPTHS.items():
    tolerance = 0.75 if name in ('euclid_y', 'euclid_j', 'euclid_h') else 0.5
    assert depth[name] == pytest.approx(published, abs=tolerance), (name, depth[name])


def _two_sources():
  return sky.concat_sources([
      sky.make_galaxies(x=30.3, y=33.8, mag_ref=22.0, redshift=0.7, sed='Sbc', bulge_frac=0.4,
                        hlr_disk=0.6, hlr_bulge=0.25, q_disk=0.5, q_bulge=0.8, beta_deg=30.0),
      sky.make_stars(x=25.2, y=20.6, mag_ref=20.0, temperature=5000.0)])


@pytest.mark.parametrize('instrument', REGISTRY.instruments)
def test_stamps_match_galsim_drawimage(instrument):
  import galsim
  config = observe.ObserveConfig(folding_threshold=2e-3, min_folding_threshold=2e-3)
  bands = REGISTRY.instrument_bands(instrument)
  ratio = int(round(0.2 / bands[0].pixel_scale))
  phys = [observe.band_physics(b, config) for b in bands]
  rng = np.random.default_rng(1)
  conds = list(observe.sample_conditions(rng, {p.name: p for p in phys}, config).values())
  cat = _two_sources()
  flux_bulge, flux_disk = sky.band_fluxes(cat, [b.name for b in bands])
  x = (cat['x'][:, None] + 0.5) * ratio - 0.5 + rng.uniform(-0.5, 0.5, (2, len(bands)))
  y = (cat['y'][:, None] + 0.5) * ratio - 0.5 + rng.uniform(-0.5, 0.5, (2, len(bands)))
  size = 64 * ratio
  ours = observe.render_instrument(cat, flux_bulge, flux_disk, x, y, (size, size), phys, conds,
                                   config)
  for b, (p, c) in enumerate(zip(phys, conds)):
    psf, method = observe.band_psf(p, c, config)
    image = galsim.ImageD(galsim.BoundsI(0, size - 1, 0, size - 1), scale=p.pixel_scale)
    galaxy = observe.galaxy_profile(cat, 0, flux_bulge[0, b], flux_disk[0, b], config)
    galsim.Convolve(galaxy, psf).drawImage(image, center=galsim.PositionD(x[0, b], y[0, b]),
                                           method=method, add_to_image=True)
    psf.withFlux(flux_bulge[1, b] + flux_disk[1, b]).drawImage(
        image, center=galsim.PositionD(x[1, b], y[1, b]), method=method, add_to_image=True)
    assert np.abs(ours[b] - image.array).max() < 1e-4 * image.array.max(), p.name


def test_correlated_nisp_noise_has_unit_pixel_variance_and_native_aperture_depth(physics):
  phys = physics['euclid_h']
  rng = np.random.default_rng(0)
  shape = (600, 600)
  rms = np.full(shape, 2.0)
  noise = observe.add_noise(np.zeros(shape), rms, rng, phys)
  assert noise.std() == pytest.approx(2.0, rel=0.02)
  # The noise of a large aperture is that of the native 0.3" pixels, whose rms (in flux
  # per native pixel) is rms x 3^2: a 2" x 2" aperture holds 400 / 9 native pixels.
  blocks = noise.reshape(30, 20, 30, 20).sum(axis=(1, 3))
  native_equivalent = 2.0 * 9 * math.sqrt(400 / 9)
  # (0.96: the box correlation reaches 1 px beyond the aperture edge.)
  assert blocks.std() == pytest.approx(0.96 * native_equivalent, rel=0.08)
  # Neighbouring pixels are correlated (resampled mosaic), unlike VIS.
  corr = np.corrcoef(noise[:, :-1].ravel(), noise[:, 1:].ravel())[0, 1]
  assert corr > 0.5
  vis = observe.add_noise(np.zeros(shape), rms, rng, physics['euclid_vis'])
  assert abs(np.corrcoef(vis[:, :-1].ravel(), vis[:, 1:].ravel())[0, 1]) < 0.02


# -- the achromatic shortcut vs GalSim's chromatic drawing -------------------------------

def _galsim_bandpass(speclite_name):
  import galsim
  import speclite.filters
  curve = speclite.filters.load_filter(speclite_name)
  table = galsim.LookupTable(curve.wavelength / 10.0, curve.response, interpolant='linear')
  return galsim.Bandpass(table, wave_type='nm').thin(rel_err=1e-3).withZeropoint('AB')


@pytest.mark.parametrize('band_name', ['rubin_g', 'euclid_vis', 'euclid_h'])
def test_achromatic_shortcut_matches_chromatic_drawing(physics, band_name):
  """Total flux within 1%, and within 1% inside 2 FWHM.

  Drawn both ways: GalSim's chromatic bulge (E spectrum) + disk (Scd spectrum) through the
  speclite bandpass with a wavelength-dependent PSF (Kolmogorov ~ lambda^-0.2 or Airy ~
  lambda / D), and our achromatic profile with band fluxes from the spectra and the PSF at
  the band's effective wavelength. The PSF's colour dependence inside a band moves ~1% of
  the light of a red galaxy between r < FWHM and the wings in the broad VIS band.
  """
  import galsim
  z, mag_ref, bulge_frac = 0.8, 21.0, 0.4      # no IGM absorption in these bands at z = 0.8
  cat = sky.make_galaxies(x=0.0, y=0.0, mag_ref=mag_ref, redshift=z, sed='Scd',
                          bulge_frac=bulge_frac, hlr_disk=0.5, hlr_bulge=0.2, q_disk=0.6,
                          q_bulge=0.9, beta_deg=20.0)
  phys = physics[band_name]
  config = observe.ObserveConfig(folding_threshold=5e-3)
  gsp = galsim.GSParams(folding_threshold=5e-3)
  share = os.path.join(galsim.meta_data.share_dir, 'SEDs')
  ref = _galsim_bandpass(sky.REFERENCE_FILTER)
  sed = {t: galsim.SED(os.path.join(share, f'CWW_{t}_ext.sed'), wave_type='Ang',
                       flux_type='flambda').atRedshift(z) for t in ('E', 'Scd')}
  bulge_sed = sed['E'].withMagnitude(mag_ref - 2.5 * math.log10(bulge_frac), ref)
  disk_sed = sed['Scd'].withMagnitude(mag_ref - 2.5 * math.log10(1 - bulge_frac), ref)
  beta = 20.0 * galsim.degrees
  chromatic = (galsim.DeVaucouleurs(half_light_radius=0.2, gsparams=gsp).shear(
      q=0.9, beta=beta) * bulge_sed + galsim.Exponential(half_light_radius=0.5, gsparams=gsp)
               .shear(q=0.6, beta=beta) * disk_sed)
  bandpass = _galsim_bandpass(sky.SPECLITE_FILTERS[band_name])
  lam = phys.wavelength_nm
  if phys.ground:
    psf = galsim.ChromaticObject(galsim.Kolmogorov(fwhm=phys.psf_fwhm, gsparams=gsp)).dilate(
        lambda w: (w / lam)**-0.2)
    method, size = 'auto', 96
  else:
    sigma = observe._space_psf_sigma(lam, phys.mirror_diameter, phys.obscuration,
                                     phys.native_pixel_scale, phys.psf_fwhm)
    psf = galsim.Convolve([
        galsim.ChromaticAiry(lam=lam, diam=phys.mirror_diameter, obscuration=phys.obscuration,
                             gsparams=gsp),
        galsim.Gaussian(sigma=sigma, gsparams=gsp),
        galsim.Pixel(phys.native_pixel_scale, gsparams=gsp)]).interpolate(
            np.linspace(bandpass.blue_limit, bandpass.red_limit, 12))
    method, size = 'no_pixel', 160
  counts = galsim.Convolve([chromatic, psf]).drawImage(
      bandpass, nx=size, ny=size, scale=phys.pixel_scale, method=method).array
  chrom = counts * 10**(-0.4 * (bandpass.zeropoint - sky.AB_NJY))      # photons -> nJy

  flux_bulge, flux_disk = sky.band_fluxes(cat, [band_name])
  # GalSim's and our SED integrals agree (independent implementations).
  assert chromatic.calculateFlux(bandpass) * 10**(-0.4 * (bandpass.zeropoint - sky.AB_NJY)) \
      == pytest.approx(flux_bulge[0, 0] + flux_disk[0, 0], rel=5e-3)
  achromatic_psf, method = observe.band_psf(phys, _nominal(phys), config)
  achrom = galsim.Convolve(observe.galaxy_profile(cat, 0, flux_bulge[0, 0], flux_disk[0, 0],
                                                  config), achromatic_psf).drawImage(
      nx=size, ny=size, scale=phys.pixel_scale, method=method).array
  assert chrom.sum() == pytest.approx(achrom.sum(), rel=0.01)
  yy, xx = np.mgrid[0:size, 0:size]
  inner = np.hypot(xx - (size - 1) / 2, yy - (size - 1) / 2) * phys.pixel_scale < 2 * phys.psf_fwhm
  assert chrom[inner].sum() == pytest.approx(achrom[inner].sum(), rel=0.01)
