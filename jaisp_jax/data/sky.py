"""The simulated sky: a population of stars and bulge+disk galaxies and their band fluxes.

This module knows nothing about telescopes: it says what is on the sky. The instrument
side (PSFs, noise, pixels) lives in `jaisp_jax.data.observe`.

Population (every number below is a parameter of `PopulationConfig`; its source is given
where it has one, and "our choice" where it is a plausible value we picked):

- Galaxy counts: cumulative N(<i) = 46 * 10**(0.31 (i - 25)) per arcmin^2 (LSST Science
  Book v2.0, arXiv:0912.0201, eq. 3.7, fitted for 20.5 < i < 25.5), extrapolated to the
  faint limit (i = 28 by default, ~390 galaxies / arcmin^2; Hubble UDF counts are of this
  order, they flatten slightly beyond i ~ 26, so this errs on the rich side).
- Redshifts: p(z | i) ~ z^2 exp(-z / z0), z0 = 0.0417 i - 0.744 (same book, eq. 3.8), a
  Gamma(3, z0) distribution, clipped to [0.02, 6].
- SED types (our choice): CWW templates E / Sbc / Scd / Im (Coleman, Wu & Weedman 1980,
  extended by Bolzonella et al. 2000; shipped with GalSim) with probabilities 0.10 / 0.25 /
  0.35 / 0.30. The bulge always has the E spectrum, the disk the galaxy type's spectrum,
  so bulge-dominated galaxies are redder and colour gradients exist. Bulge fraction in the
  reference band: E 0.7-1, Sbc 0.2-0.5, Scd 0-0.2, Im 0 (uniform; our choice).
- Profiles: exponential disk (Sersic n=1) + de Vaucouleurs bulge (Sersic n=4). Disk
  half-light radius: 1.678 r_d with ln(r_d / arcsec) = -1.145 - 0.269 (i - 23) (the
  CFHTLenS disk-size prior of Miller et al. 2013, MNRAS 429, 2858) plus a lognormal
  scatter of 0.3 (our choice); bulge radius 0.3-0.7 of the disk's (our choice).
  Disk axis ratio from a random inclination of a disk of intrinsic thickness 0.2:
  q = sqrt(cos^2 i + 0.2^2 sin^2 i), cos i uniform; bulge q uniform in 0.6-1; one random
  position angle for both.
- Intergalactic absorption: Madau (1995, ApJ 441, 18) Lyman-series line blanketing and
  Lyman-limit photoelectric absorption, so z > 2.5 galaxies drop out of u, z > 3.5 of g.
- Stars: 1 per arcmin^2 for 17 < i < 26 with dN/dm ~ 10**(0.1 m) (our rough choice for a
  high Galactic latitude field such as ECDFS, b = -54 deg), black-body spectra with T
  log-uniform in 3000-7000 K (faint high-latitude stars are mostly K/M dwarfs and
  halo turn-off stars; our choice).

Fluxes: every source has an AB magnitude in the reference filter (LSST i); its flux in
every other band follows from its spectrum through the band's filter curve (speclite's
'lsst2023-*' and 'Euclid-*' curves), integrated here with numpy (photon-counting AB
magnitudes; `ab_magnitudes` is checked against speclite's own integrator in
tests/sky_test.py) on a redshift grid and interpolated. Fluxes are in nJy
(AB mag = 31.4 - 2.5 log10(flux / nJy)).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Mapping, Sequence

import numpy as np

# Mapping from registry band name to its speclite filter curve. This is knowledge about
# the filters (data), not a band list: the simulator iterates over the registry and
# looks each band up here, failing clearly for a band without a known curve.
SPECLITE_FILTERS: dict[str, str] = {
    'rubin_u': 'lsst2023-u', 'rubin_g': 'lsst2023-g', 'rubin_r': 'lsst2023-r',
    'rubin_i': 'lsst2023-i', 'rubin_z': 'lsst2023-z', 'rubin_y': 'lsst2023-y',
    'euclid_vis': 'Euclid-VIS', 'euclid_y': 'Euclid-Y', 'euclid_j': 'Euclid-J',
    'euclid_h': 'Euclid-H',
}
REFERENCE_FILTER = 'lsst2023-i'   # magnitudes of the population are drawn in this filter

GALAXY_TYPES = ('E', 'Sbc', 'Scd', 'Im')   # CWW templates, red to blue
AB_NJY = 31.4                  # AB magnitude of 1 nJy: 2.5 log10(3631 Jy / 1 nJy)
_C_ANGSTROM_PER_S = 2.99792458e18
_WAVE = np.arange(2800.0, 21300.0, 5.0)    # observed-frame grid (Angstrom) covering all curves
_Z_GRID = np.linspace(0.0, 6.0, 301)
_T_GRID = np.geomspace(2500.0, 12000.0, 121)


@dataclasses.dataclass(frozen=True)
class PopulationConfig:
  """Parameters of the source population (sources in the module docstring)."""

  galaxy_counts_norm: float = 46.0      # galaxies / arcmin^2 with i < 25 (LSST SB eq. 3.7)
  galaxy_counts_slope: float = 0.31     # d log10 N / dm (LSST SB eq. 3.7)
  galaxy_mag_range: tuple[float, float] = (18.0, 28.0)   # i-band AB limits
  galaxy_density_scale: float = 1.0     # multiplies the counts (0 = no galaxies; tests)
  type_probs: tuple[float, ...] = (0.10, 0.25, 0.35, 0.30)   # E, Sbc, Scd, Im
  bulge_frac_ranges: tuple[tuple[float, float], ...] = ((0.7, 1.0), (0.2, 0.5), (0.0, 0.2),
                                                       (0.0, 0.0))
  z_max: float = 6.0
  disk_size_scatter: float = 0.3        # standard deviation of ln(disk radius)
  bulge_to_disk_radius: tuple[float, float] = (0.3, 0.7)
  disk_thickness: float = 0.2           # intrinsic axis ratio of an edge-on disk
  hlr_range: tuple[float, float] = (0.03, 3.0)    # clip for half-light radii (arcsec)
  star_density: float = 1.0             # stars / arcmin^2 in star_mag_range
  star_mag_range: tuple[float, float] = (17.0, 26.0)
  star_counts_slope: float = 0.1
  star_temperature_range: tuple[float, float] = (3000.0, 7000.0)   # K, log-uniform


# -- spectra ------------------------------------------------------------------------

def madau_transmission(wave_obs: np.ndarray, z: float) -> np.ndarray:
  """IGM transmission exp(-tau) at observed wavelengths (Angstrom) for a source at z.

  Madau (1995) eqs. 12, 15 and footnote 3: Lyman alpha..delta blanketing plus the
  photoelectric absorption of Lyman-limit systems below 912 (1 + z) Angstrom.
  """
  wave_obs = np.asarray(wave_obs, dtype=np.float64)
  tau = np.zeros_like(wave_obs)
  for lam, coeff in ((1215.67, 3.6e-3), (1025.72, 1.7e-3), (972.54, 1.2e-3),
                     (949.74, 9.3e-4)):
    absorbed = wave_obs < lam * (1.0 + z)
    tau += np.where(absorbed, coeff * (wave_obs / lam) ** 3.46, 0.0)
  xc = wave_obs / 911.75
  xe = 1.0 + z
  below = xc < xe
  xcb = np.where(below, np.maximum(xc, 1.0), 1.0)
  tau_c = (0.25 * xcb**3 * (xe**0.46 - xcb**0.46) + 9.4 * xcb**1.5 * (xe**0.18 - xcb**0.18)
           - 0.7 * xcb**3 * (xcb**-1.32 - xe**-1.32) - 0.023 * (xe**1.68 - xcb**1.68))
  tau += np.where(below, np.maximum(tau_c, 0.0), 0.0)
  return np.exp(-tau)


@functools.lru_cache(maxsize=None)
def cww_template(galaxy_type: str) -> tuple[np.ndarray, np.ndarray]:
  """Rest-frame CWW template shipped with GalSim: (wavelength Angstrom, f_lambda)."""
  import galsim  # deferred: galsim is heavy and only the simulator needs it
  path = os.path.join(galsim.meta_data.share_dir, 'SEDs', f'CWW_{galaxy_type}_ext.sed')
  table = np.loadtxt(path)
  return table[:, 0], table[:, 1]


def galaxy_flambda(galaxy_type: str, z: float, wave_obs: np.ndarray) -> np.ndarray:
  """Observed-frame f_lambda (arbitrary normalisation) of a CWW template at redshift z."""
  wave_rest, flux_rest = cww_template(galaxy_type)
  rest = np.interp(np.asarray(wave_obs) / (1.0 + z), wave_rest, flux_rest, left=0.0, right=0.0)
  return rest * madau_transmission(wave_obs, z) / (1.0 + z)


def blackbody_flambda(temperature: float, wave_obs: np.ndarray) -> np.ndarray:
  """Planck f_lambda (arbitrary normalisation) at wavelengths in Angstrom."""
  hc_over_k = 1.438776877e8   # h c / k_B in Angstrom K
  wave = np.asarray(wave_obs, dtype=np.float64)
  return wave**-5 / np.expm1(hc_over_k / (wave * temperature))


@functools.lru_cache(maxsize=None)
def filter_weights(filter_names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
  """Integration weights of speclite filter curves on the internal wavelength grid.

  Returns (num (n_wave, n_filters), den (n_filters,)) such that the photon-counting AB
  flux density of an f_lambda spectrum is f_nu = flambda @ num / den (erg/s/cm^2/Hz).
  """
  import speclite.filters  # deferred: slow import
  curves = speclite.filters.load_filters(*filter_names)
  dwave = np.gradient(_WAVE)
  num, den = [], []
  for curve in curves:
    resp = np.interp(_WAVE, curve.wavelength, curve.response, left=0.0, right=0.0)
    num.append(resp * _WAVE * dwave)
    den.append(np.sum(resp * _C_ANGSTROM_PER_S / _WAVE * dwave))
  return np.stack(num, axis=1), np.asarray(den)


def ab_magnitudes(flambda: np.ndarray, filter_names: Sequence[str]) -> np.ndarray:
  """AB magnitudes of spectra f_lambda (erg/s/cm^2/A) sampled on `wave_grid()`.

  flambda: (..., n_wave) -> (..., n_filters).
  """
  num, den = filter_weights(tuple(filter_names))
  fnu = (flambda @ num) / den
  with np.errstate(divide='ignore'):
    return -2.5 * np.log10(fnu) - 48.60


def wave_grid() -> np.ndarray:
  """The observed-frame wavelength grid (Angstrom) used for band integrals."""
  return _WAVE.copy()


@functools.lru_cache(maxsize=None)
def colour_tables(filter_names: tuple[str, ...]) -> dict[str, np.ndarray]:
  """Colours m(filter) - m(REFERENCE_FILTER) on grids, for interpolation.

  Returns {'z': (n_z,), 'T': (n_T,), '<type>': (n_z, n_filters) for each galaxy type,
  'star': (n_T, n_filters)}. A band the spectrum does not reach gets a colour of +inf
  (zero flux).
  """
  filters = tuple(filter_names) + (REFERENCE_FILTER,)
  out = {'z': _Z_GRID, 'T': _T_GRID}
  for gtype in GALAXY_TYPES:
    spectra = np.stack([galaxy_flambda(gtype, z, _WAVE) for z in _Z_GRID])  # (n_z, n_wave)
    mags = ab_magnitudes(spectra * 1e-17, filters)
    out[gtype] = mags[:, :-1] - mags[:, -1:]
  spectra = np.stack([blackbody_flambda(t, _WAVE) for t in _T_GRID])
  spectra /= spectra.max(axis=1, keepdims=True)
  mags = ab_magnitudes(spectra * 1e-17, filters)
  out['star'] = mags[:, :-1] - mags[:, -1:]
  return out


def _interp_rows(grid: np.ndarray, table: np.ndarray, x: np.ndarray) -> np.ndarray:
  """Linear interpolation of table (n_grid, n_filters) at x (n,) -> (n, n_filters)."""
  # Interpolate flux ratios, not magnitudes, so that +inf colours (no flux) stay finite.
  ratios = 10.0 ** (-0.4 * table)
  cols = [np.interp(x, grid, ratios[:, j]) for j in range(table.shape[1])]
  return np.stack(cols, axis=-1) if cols else np.zeros((len(x), 0))


def njy_from_mag(mag):
  """AB magnitude -> nJy."""
  return 10.0 ** (-0.4 * (np.asarray(mag, dtype=np.float64) - AB_NJY))


def mag_from_njy(flux):
  """nJy -> AB magnitude (+inf for non-positive flux)."""
  flux = np.asarray(flux, dtype=np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(flux > 0, AB_NJY - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.inf)


# -- the population -------------------------------------------------------------------

# Columns of a source catalogue (a dict of equal-length numpy arrays). Per-band fluxes are
# kept as 2-D arrays flux_bulge / flux_disk (n_sources, n_bands) in registry order of the
# bands passed to `band_fluxes`; stars put all their flux in 'flux_disk'.
SOURCE_COLUMNS = ('type', 'x', 'y', 'mag_ref', 'redshift', 'sed', 'temperature',
                  'bulge_frac', 'hlr_disk', 'hlr_bulge', 'n_disk', 'n_bulge', 'q_disk',
                  'q_bulge', 'beta_deg')


def _power_law_mags(rng, n, lo, hi, slope):
  """n magnitudes with dN/dm ~ 10**(slope m) in [lo, hi] (inverse CDF)."""
  a, b = 10.0 ** (slope * lo), 10.0 ** (slope * hi)
  return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


def _expected_count(norm, slope, lo, hi, pivot):
  """Number per arcmin^2 between lo and hi for N(<m) = norm 10**(slope (m - pivot))."""
  return norm * (10.0 ** (slope * (hi - pivot)) - 10.0 ** (slope * (lo - pivot)))


def sample_population(rng: np.random.Generator, x_range: tuple[float, float],
                      y_range: tuple[float, float], arcsec_per_unit: float,
                      config: PopulationConfig = PopulationConfig()) -> dict[str, np.ndarray]:
  """Draws stars and galaxies uniformly over a rectangle of the sky.

  Args:
    rng: the random generator (the only source of randomness).
    x_range, y_range: the rectangle, in the caller's position units (e.g. pixels).
    arcsec_per_unit: size of one position unit on the sky.
    config: population parameters.
  Returns:
    a catalogue dict with the SOURCE_COLUMNS, one row per source (galaxies then stars).
  """
  area = ((x_range[1] - x_range[0]) * (y_range[1] - y_range[0])
          * arcsec_per_unit**2 / 3600.0)   # arcmin^2
  lo, hi = config.galaxy_mag_range
  n_gal = rng.poisson(area * config.galaxy_density_scale * _expected_count(
      config.galaxy_counts_norm, config.galaxy_counts_slope, lo, hi, 25.0))
  slo, shi = config.star_mag_range
  n_star = rng.poisson(area * config.star_density)

  gal = {}
  gal['mag_ref'] = _power_law_mags(rng, n_gal, lo, hi, config.galaxy_counts_slope)
  z0 = np.maximum(0.0417 * gal['mag_ref'] - 0.744, 0.02)
  gal['redshift'] = np.clip(rng.gamma(3.0, z0), 0.02, config.z_max)
  type_idx = rng.choice(len(GALAXY_TYPES), size=n_gal, p=np.asarray(config.type_probs))
  gal['sed'] = np.asarray(GALAXY_TYPES, dtype=object)[type_idx].astype(str)
  ranges = np.asarray(config.bulge_frac_ranges)[type_idx]          # (n_gal, 2)
  gal['bulge_frac'] = ranges[:, 0] + rng.uniform(size=n_gal) * (ranges[:, 1] - ranges[:, 0])
  r_d = np.exp(-1.145 - 0.269 * (gal['mag_ref'] - 23.0)
               + config.disk_size_scatter * rng.standard_normal(n_gal))
  hmin, hmax = config.hlr_range
  gal['hlr_disk'] = np.clip(1.678 * r_d, hmin, hmax)
  ratio = rng.uniform(*config.bulge_to_disk_radius, size=n_gal)
  gal['hlr_bulge'] = np.where(gal['bulge_frac'] > 0,
                              np.clip(gal['hlr_disk'] * ratio, hmin, hmax), 0.0)
  cos_i = rng.uniform(size=n_gal)
  gal['q_disk'] = np.sqrt(cos_i**2 + config.disk_thickness**2 * (1.0 - cos_i**2))
  gal['q_bulge'] = rng.uniform(0.6, 1.0, size=n_gal)
  gal['beta_deg'] = rng.uniform(0.0, 180.0, size=n_gal)
  gal['n_disk'] = np.full(n_gal, 1.0)
  gal['n_bulge'] = np.full(n_gal, 4.0)
  gal['temperature'] = np.zeros(n_gal)
  gal['type'] = np.full(n_gal, 'galaxy')
  gal['x'] = rng.uniform(*x_range, size=n_gal)
  gal['y'] = rng.uniform(*y_range, size=n_gal)

  stars = make_stars(
      x=rng.uniform(*x_range, size=n_star), y=rng.uniform(*y_range, size=n_star),
      mag_ref=_power_law_mags(rng, n_star, slo, shi, config.star_counts_slope),
      temperature=np.exp(rng.uniform(*np.log(config.star_temperature_range), size=n_star)))
  return concat_sources([gal, stars])


def make_stars(x, y, mag_ref, temperature) -> dict[str, np.ndarray]:
  """A catalogue of black-body stars (e.g. to inject a known star into a tile)."""
  x = np.atleast_1d(np.asarray(x, dtype=np.float64))
  n = len(x)
  cat = {name: np.zeros(n) for name in SOURCE_COLUMNS}
  cat.update(type=np.full(n, 'star'), sed=np.full(n, 'blackbody'), x=x,
             y=np.broadcast_to(np.asarray(y, dtype=np.float64), (n,)).copy(),
             mag_ref=np.broadcast_to(np.asarray(mag_ref, dtype=np.float64), (n,)).copy(),
             temperature=np.broadcast_to(np.asarray(temperature, np.float64), (n,)).copy(),
             q_disk=np.ones(n), q_bulge=np.ones(n))
  return cat


def make_galaxies(x, y, mag_ref, redshift, sed, bulge_frac, hlr_disk, hlr_bulge,
                  q_disk=1.0, q_bulge=1.0, beta_deg=0.0) -> dict[str, np.ndarray]:
  """A catalogue of bulge+disk galaxies with the given parameters (for injection)."""
  x = np.atleast_1d(np.asarray(x, dtype=np.float64))
  n = len(x)
  full = lambda v: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)).copy()  # noqa: E731
  sed = np.broadcast_to(np.asarray(sed, dtype=str), (n,)).copy()
  unknown = set(sed) - set(GALAXY_TYPES)
  if unknown:
    raise ValueError(f'unknown galaxy SED type(s) {sorted(unknown)}; known: {GALAXY_TYPES}')
  return dict(type=np.full(n, 'galaxy'), x=x, y=full(y), mag_ref=full(mag_ref),
              redshift=full(redshift), sed=sed, temperature=np.zeros(n),
              bulge_frac=full(bulge_frac), hlr_disk=full(hlr_disk), hlr_bulge=full(hlr_bulge),
              n_disk=np.ones(n), n_bulge=np.full(n, 4.0), q_disk=full(q_disk),
              q_bulge=full(q_bulge), beta_deg=full(beta_deg))


def concat_sources(cats: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Concatenates catalogues row-wise."""
  return {name: np.concatenate([np.asarray(c[name]) for c in cats]) for name in SOURCE_COLUMNS}


def band_fluxes(cat: Mapping[str, np.ndarray],
                band_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """True fluxes (nJy) of each source's bulge and disk in each band.

  Returns (flux_bulge, flux_disk), each (n_sources, n_bands); their sum is the total flux.
  """
  try:
    filters = tuple(SPECLITE_FILTERS[b] for b in band_names)
  except KeyError as e:
    raise ValueError(f'band {e.args[0]!r} has no known filter curve; add it to '
                     'jaisp_jax.data.sky.SPECLITE_FILTERS to simulate it') from None
  tables = colour_tables(filters)
  n = len(cat['x'])
  total_ref = njy_from_mag(cat['mag_ref'])                         # (n,)
  flux_bulge = np.zeros((n, len(filters)))
  flux_disk = np.zeros((n, len(filters)))
  is_star = cat['type'] == 'star'
  if is_star.any():
    flux_disk[is_star] = total_ref[is_star, None] * _interp_rows(
        tables['T'], tables['star'], cat['temperature'][is_star])
  bulge_ref = total_ref * cat['bulge_frac']
  for gtype in GALAXY_TYPES:
    # The disk has the galaxy type's spectrum; every bulge has the E spectrum.
    sel = (~is_star) & (cat['sed'] == gtype)
    if sel.any():
      flux_disk[sel] = (total_ref[sel] - bulge_ref[sel])[:, None] * _interp_rows(
          tables['z'], tables[gtype], cat['redshift'][sel])
  gal = ~is_star
  if gal.any():
    flux_bulge[gal] = bulge_ref[gal, None] * _interp_rows(
        tables['z'], tables['E'], cat['redshift'][gal])
  return flux_bulge, flux_disk
