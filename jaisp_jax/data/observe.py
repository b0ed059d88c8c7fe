"""Observing the simulated sky: per-band depth, PSF, astrometric offsets, drawing, noise.

Instrument numbers come from surveycodex (`surveycodex.get_survey('LSST' | 'Euclid_VIS' |
'Euclid_NISP')`): pixel scales, mirror diameters and obscurations, per-filter zeropoints
(magnitude giving 1 e-/s, computed by surveycodex with speclite), sky brightness, PSF
FWHM and exposure times. Our own choices are marked as such in `ObserveConfig`.

- Depth: LSST exposure times in surveycodex are the 10-year totals; Euclid's are one
  exposure, so we use `euclid_n_exposures` = 4 (the Wide survey's reference sequence,
  Scaramella et al. 2022, A&A 662, A112). Noise is sky-limited (read noise and dark are
  omitted) plus the source's own Poisson noise. Per-pixel background rms in nJy:
  sigma_native = sqrt(sky electrons per native pixel) * nJy per electron.
  tests/sky_test.py compares the resulting depths with published ones: Rubin 5 sigma
  point-source depths within 0.4 mag of Ivezic et al. 2019 (r 27.2 vs 27.5); VIS 25.7 at
  10 sigma in 1.3" apertures (Q1 stacks: 25.6); NISP 5 sigma point sources ~25.0 (24.5
  published for three ~100 s exposures, we use 4 x 112 s).
- Resampled NISP: the Y/J/H tiles are 0.1"/px mosaics of 0.3"/px detectors. We model the
  resampling as a box of the native pixel (3x3 tile pixels) spreading each native
  pixel's noise, so the background noise is correlated over 0.3"; its per-pixel rms is
  sigma_native / 3**2, which keeps the noise of a large aperture equal to the native one.
  `rms` holds that per-pixel rms. The PSF includes the native pixel box.
- PSFs: ground (surveycodex `zeropoint_airmass` > 0): Kolmogorov with the survey's FWHM
  (wavelength dependent through the per-filter values) times a per-tile seeing factor,
  drawn with the tile pixel. Space: Airy(lambda_eff, D, obscuration) (x) Gaussian (x)
  native pixel, the Gaussian (jitter, charge diffusion; our model) sized so that the
  FWHM equals the survey's per-filter value. Both get a small random shear per tile-band.
- Astrometric offsets: each tile-band has a random offset (dx, dy) in mas along the +x
  and +y pixel axes; in that band every source is drawn at its WCS position plus the
  offset.
- Drawing (achromatic shortcut): each source is drawn on its own stamp, per band, as an
  achromatic GalSim profile (bulge and disk with their band fluxes) convolved with the
  band's PSF at the band's effective wavelength, and stamps are added into the tile.
  tests/sky_test.py checks this against GalSim's chromatic drawing (bulge and disk SEDs
  x bandpass, with a wavelength-dependent PSF) in g, VIS and H: total fluxes agree to
  0.3%, fluxes within 2 FWHM to 1%. Within 1 FWHM a red galaxy in the broad VIS band
  differs by ~1.2% (its light-weighted PSF is wider than the PSF at lambda_eff).
  Stamps are drawn by hand in k space (`render_instrument`), equal to GalSim's
  `drawImage` to 1e-4 of the peak (tested; typically 1e-5).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import numpy as np

from jaisp_jax.bands import Band
from jaisp_jax.data import sky

# Registry band name -> (surveycodex survey, filter). Knowledge about the instruments.
SURVEYCODEX_FILTERS: dict[str, tuple[str, str]] = {
    'rubin_u': ('LSST', 'u'), 'rubin_g': ('LSST', 'g'), 'rubin_r': ('LSST', 'r'),
    'rubin_i': ('LSST', 'i'), 'rubin_z': ('LSST', 'z'), 'rubin_y': ('LSST', 'y'),
    'euclid_vis': ('Euclid_VIS', 'IE'), 'euclid_y': ('Euclid_NISP', 'YE'),
    'euclid_j': ('Euclid_NISP', 'JE'), 'euclid_h': ('Euclid_NISP', 'HE'),
}


@dataclasses.dataclass(frozen=True)
class ObserveConfig:
  """Observing conditions (ranges are uniform unless said otherwise)."""

  euclid_n_exposures: int = 4            # Euclid Wide reference sequence (Scaramella+22)
  seeing_factor_range: tuple[float, float] = (0.9, 1.15)   # per tile, ground; our choice
  psf_shear_sigma_ground: float = 0.02   # per component, per tile-band; our choice
  psf_shear_sigma_space: float = 0.01
  offset_sigma_mas: float = 20.0         # astrometric offset per axis (Gaussian); our choice
  offset_clip_mas: float = 60.0
  depth_factor_range: tuple[float, float] = (0.9, 1.1)    # rms scale per tile-band
  rms_gradient_max: float = 0.1          # rms varies linearly by up to +-10% across a tile
  source_noise: bool = True              # add the sources' Poisson noise (not in `rms`)
  # Stamp sizes. GalSim sizes an FFT stamp so that at most `folding_threshold` of the
  # light wraps around it (its default: 5e-3). The wrapped light stays in the total
  # flux but lands on the far side of the stamp, which for bright sources would show
  # (and bias VIS centroids of bright stars by ~0.02 px). So the PSF part of each
  # source's stamp uses the loosest threshold of the ladder folding_threshold / 4**k
  # (k = 0, 1, ...), down to min_folding_threshold, for which threshold x flux <=
  # wrapped_flux_max_rms x pixel rms in every band: faint sources (most) get small
  # stamps, bright ones GalSim's default accuracy (Airy wings make stamps 16x larger per
  # factor 4 in threshold).
  folding_threshold: float = 2e-2
  min_folding_threshold: float = 5e-3
  wrapped_flux_max_rms: float = 20.0
  max_stamp: int = 1024                  # px; caps the stamp of the rare huge galaxy


@dataclasses.dataclass(frozen=True)
class BandPhysics:
  """Static numbers of one band, derived from surveycodex and the band registry."""

  name: str
  survey: str
  filter: str
  ground: bool
  pixel_scale: float          # tile pixel (arcsec)
  native_pixel_scale: float   # detector pixel (arcsec)
  wavelength_nm: float        # effective wavelength of the filter (surveycodex)
  psf_fwhm: float             # arcsec, nominal
  mirror_diameter: float      # m
  obscuration: float
  zeropoint: float            # AB mag giving 1 e-/s
  exposure_time: float        # s, total
  sky_mag: float              # mag / arcsec^2
  njy_per_electron: float     # flux (nJy) of one detected electron in the total exposure
  rms_native: float           # background rms per native pixel (nJy)
  resample: int               # native / tile pixel ratio (1, or 3 for NISP mosaics)
  rms: float                  # nominal background rms per tile pixel (nJy)


def band_physics(band: Band, config: ObserveConfig = ObserveConfig()) -> BandPhysics:
  """Looks up one registry band's instrument numbers in surveycodex."""
  import astropy.units as u
  import surveycodex
  try:
    survey_name, filter_name = SURVEYCODEX_FILTERS[band.name]
  except KeyError:
    raise ValueError(f'band {band.name!r} has no known instrument model; add it to '
                     'jaisp_jax.data.observe.SURVEYCODEX_FILTERS to simulate it') from None
  survey = surveycodex.get_survey(survey_name)
  filt = survey.get_filter(filter_name)
  ground = float(survey.zeropoint_airmass.value if hasattr(survey.zeropoint_airmass, 'value')
                 else survey.zeropoint_airmass) > 0
  n_exp = 1 if ground else config.euclid_n_exposures
  exptime = filt.full_exposure_time.to_value(u.s) * n_exp
  zeropoint = filt.zeropoint.value
  sky_mag = filt.sky_brightness.value
  native = survey.pixel_scale.to_value(u.arcsec)
  ratio = native / band.pixel_scale
  resample = int(round(ratio))
  if resample < 1 or abs(ratio - resample) > 1e-6:
    raise ValueError(f'band {band.name}: native pixel {native}" is not a whole multiple of '
                     f'the tile pixel {band.pixel_scale}"')
  njy_per_e = 10.0 ** (0.4 * (sky.AB_NJY - zeropoint)) / exptime
  sky_e = 10.0 ** (-0.4 * (sky_mag - zeropoint)) * exptime * native**2
  rms_native = math.sqrt(sky_e) * njy_per_e
  return BandPhysics(
      name=band.name, survey=survey_name, filter=filter_name, ground=ground,
      pixel_scale=band.pixel_scale, native_pixel_scale=native,
      wavelength_nm=filt.effective_wavelength.to_value(u.nm),
      psf_fwhm=filt.psf_fwhm.to_value(u.arcsec),
      mirror_diameter=survey.mirror_diameter.to_value(u.m),
      obscuration=float(survey.obscuration.value if hasattr(survey.obscuration, 'value')
                        else survey.obscuration),
      zeropoint=zeropoint, exposure_time=exptime, sky_mag=sky_mag,
      njy_per_electron=njy_per_e, rms_native=rms_native, resample=resample,
      rms=rms_native / resample**2)


@dataclasses.dataclass(frozen=True)
class BandConditions:
  """Random per tile-band conditions (recorded in the per-tile metadata)."""

  psf_fwhm: float        # arcsec
  psf_g1: float
  psf_g2: float
  dx_mas: float          # astrometric offset along +x pixels
  dy_mas: float          # along +y pixels
  depth_factor: float    # multiplies the nominal rms
  rms_gradient: float    # fractional rms change from tile centre to edge
  rms_gradient_angle_deg: float


def sample_conditions(rng: np.random.Generator, physics: Mapping[str, BandPhysics],
                      config: ObserveConfig = ObserveConfig()) -> dict[str, BandConditions]:
  """Draws conditions for every band of one tile (seeing is shared by a ground survey)."""
  seeing = {}
  out = {}
  for name, phys in physics.items():
    if phys.ground:
      if phys.survey not in seeing:
        seeing[phys.survey] = rng.uniform(*config.seeing_factor_range)
      fwhm = phys.psf_fwhm * seeing[phys.survey]
      g_sigma = config.psf_shear_sigma_ground
    else:
      fwhm = phys.psf_fwhm
      g_sigma = config.psf_shear_sigma_space
    g1, g2 = rng.normal(0.0, g_sigma, size=2)
    dx, dy = np.clip(rng.normal(0.0, config.offset_sigma_mas, size=2),
                     -config.offset_clip_mas, config.offset_clip_mas)
    out[name] = BandConditions(
        psf_fwhm=float(fwhm), psf_g1=float(g1), psf_g2=float(g2), dx_mas=float(dx),
        dy_mas=float(dy), depth_factor=float(rng.uniform(*config.depth_factor_range)),
        rms_gradient=float(rng.uniform(0.0, config.rms_gradient_max)),
        rms_gradient_angle_deg=float(rng.uniform(0.0, 360.0)))
  return out


# -- PSFs -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _gsparams(folding_threshold: float):
  import galsim
  return galsim.GSParams(folding_threshold=folding_threshold)


def folding_threshold_for(flux_over_rms: float, config: ObserveConfig) -> float:
  """The stamp folding threshold for a source of this peak band flux / pixel rms."""
  threshold = config.folding_threshold
  while (threshold * flux_over_rms > config.wrapped_flux_max_rms
         and threshold / 4 >= config.min_folding_threshold):
    threshold /= 4
  return threshold


@functools.lru_cache(maxsize=None)
def _space_psf_sigma(lam_nm: float, diam: float, obscuration: float, native: float,
                     fwhm: float) -> float:
  """Gaussian sigma (arcsec) making FWHM(Airy (x) Gaussian (x) native pixel) == fwhm."""
  import galsim
  from scipy.optimize import brentq

  def excess(sigma):
    parts = [galsim.Airy(lam=lam_nm, diam=diam, obscuration=obscuration),
             galsim.Pixel(native)]
    if sigma > 0:
      parts.append(galsim.Gaussian(sigma=sigma))
    return galsim.Convolve(parts).calculateFWHM() - fwhm

  if excess(0.0) >= 0:   # diffraction + pixel alone already as wide: no extra blur
    return 0.0
  return float(brentq(excess, 1e-4, fwhm, xtol=1e-4))


def band_psf(phys: BandPhysics, cond: BandConditions, config: ObserveConfig = ObserveConfig(),
             folding_threshold: float | None = None):
  """The band's PSF as a GalSim profile, and the drawImage method that goes with it.

  Ground: Kolmogorov, drawn with the tile pixel ('auto'). Space: Airy (x) Gaussian (x)
  native pixel, which already contains the detector pixel ('no_pixel').
  """
  import galsim
  gsp = _gsparams(folding_threshold or config.folding_threshold)
  if phys.ground:
    psf = galsim.Kolmogorov(fwhm=cond.psf_fwhm, gsparams=gsp)
    method = 'auto'
  else:
    sigma = _space_psf_sigma(phys.wavelength_nm, phys.mirror_diameter, phys.obscuration,
                             phys.native_pixel_scale, cond.psf_fwhm)
    parts = [galsim.Airy(lam=phys.wavelength_nm, diam=phys.mirror_diameter,
                         obscuration=phys.obscuration, gsparams=gsp),
             galsim.Pixel(phys.native_pixel_scale, gsparams=gsp)]
    if sigma > 0:
      parts.append(galsim.Gaussian(sigma=sigma, gsparams=gsp))
    psf = galsim.Convolve(parts, gsparams=gsp)
    method = 'no_pixel'
  return psf.shear(g1=cond.psf_g1, g2=cond.psf_g2), method


# -- drawing --------------------------------------------------------------------------

_FFT_SIZES = sorted(2**a * 3**b for a in range(3, 12) for b in range(2))   # 8, 12, 16, ...


def _fft_size(n: float) -> int:
  return next(s for s in _FFT_SIZES if s >= n)


class _EffectivePSF:
  """A band's PSF including the pixel response, with its k-images cached per grid."""

  def __init__(self, phys: BandPhysics, cond: BandConditions, config: ObserveConfig):
    self._phys, self._cond, self._config = phys, cond, config
    self._profiles = {}
    self.profile = self.at(config.folding_threshold)
    self.maxk = self.profile.maxk     # k values do not depend on the folding threshold
    self._k = {}

  def at(self, folding_threshold: float):
    """The profile with GSParams of this folding threshold (sets its stepk)."""
    import galsim
    if folding_threshold not in self._profiles:
      psf, method = band_psf(self._phys, self._cond, self._config, folding_threshold)
      if method != 'no_pixel':
        psf = galsim.Convolve(psf, galsim.Pixel(self._phys.pixel_scale),
                              gsparams=_gsparams(folding_threshold))
      self._profiles[folding_threshold] = psf
    return self._profiles[folding_threshold]

  def stepk(self, folding_threshold: float) -> float:
    return self.at(folding_threshold).stepk

  def k_image(self, n: int, nk: int, dk: float) -> np.ndarray:
    """(nk, nk) complex k-image, k = 0 at index [0, 0] (numpy FFT order)."""
    if (n, nk) not in self._k:
      image = self.profile.drawKImage(nx=nk, ny=nk, scale=dk).array
      self._k[(n, nk)] = np.fft.ifftshift(image)
    return self._k[(n, nk)]


def _unit_components(cat: Mapping[str, np.ndarray], i: int, has_bulge: bool, has_disk: bool,
                     folding_threshold: float):
  """Unit-flux GalSim bulge and disk profiles of galaxy i (None where absent)."""
  import galsim
  gsp = _gsparams(folding_threshold)
  beta = float(cat['beta_deg'][i]) * galsim.degrees
  disk = bulge = None
  if has_disk:
    disk = _sersic(float(cat['n_disk'][i]), float(cat['hlr_disk'][i]), gsp).shear(
        q=float(cat['q_disk'][i]), beta=beta)
  if has_bulge:
    bulge = _sersic(float(cat['n_bulge'][i]), float(cat['hlr_bulge'][i]), gsp).shear(
        q=float(cat['q_bulge'][i]), beta=beta)
  return bulge, disk


def _sersic(n: float, hlr: float, gsp):
  """Sersic profile; GalSim's analytic Exponential for n = 1 (5x faster k values)."""
  import galsim
  if n == 1.0:
    return galsim.Exponential(half_light_radius=hlr, gsparams=gsp)
  return galsim.Sersic(n=n, half_light_radius=hlr, gsparams=gsp)


def galaxy_profile(cat: Mapping[str, np.ndarray], i: int, flux_bulge: float,
                   flux_disk: float, config: ObserveConfig = ObserveConfig()):
  """Achromatic bulge+disk GalSim profile of source i with the given band fluxes."""
  import galsim
  bulge, disk = _unit_components(cat, i, flux_bulge > 0, flux_disk > 0,
                                 config.folding_threshold)
  parts = [c.withFlux(f) for c, f in ((bulge, flux_bulge), (disk, flux_disk)) if c is not None]
  return parts[0] if len(parts) == 1 else galsim.Add(
      parts, gsparams=_gsparams(config.folding_threshold))


def render_instrument(cat: Mapping[str, np.ndarray], flux_bulge: np.ndarray,
                      flux_disk: np.ndarray, x: np.ndarray, y: np.ndarray,
                      shape: tuple[int, int], physics: Sequence[BandPhysics],
                      conditions: Sequence[BandConditions],
                      config: ObserveConfig = ObserveConfig(),
                      min_flux: np.ndarray | None = None) -> np.ndarray:
  """Noiseless images (nJy per pixel) of one instrument's bands.

  Each source is drawn on its own stamp in every band and the stamps are added. A stamp
  is GalSim's FFT drawing done by hand so the galaxy's transform is shared by the bands:
  GalSim gives the k-images of the unit-flux bulge and disk (once per source) and of
  each band's PSF (x pixel); per band the stamp is the inverse FFT of
  (f_bulge B + f_disk D) x PSF x shift phase, with frequencies beyond Nyquist folded
  back (aliasing, as GalSim does). Stamp size and k range follow GalSim's rules
  (stepk and maxk of the convolution). tests/sky_test.py checks the stamps against
  `galsim.Convolve(galaxy, psf).drawImage` to 1e-4 of the peak (typically 1e-5).

  Args:
    cat: source catalogue (see `sky.SOURCE_COLUMNS`).
    flux_bulge, flux_disk: (n_sources, n_bands) band fluxes in nJy.
    x, y: (n_sources, n_bands) pixel positions of the source centres in each band
      (0-based, pixel centres at integers), astrometric offsets included.
    shape: (H, W) of the tile.
    physics, conditions: per band, in the order of the flux columns; all bands share
      the pixel scale. Bands get their own stamp size (GalSim's rule for the galaxy x
      that band's PSF); bands with the same grid share the galaxy's k-images.
    min_flux: (n_bands,) a source is skipped in a band where its total flux (nJy) is not
      above this (invisible under the noise).
  Returns:
    (n_bands, H, W) float64 images.
  """
  height, width = shape
  n_bands = len(physics)
  scale = physics[0].pixel_scale
  out = np.zeros((n_bands, height, width))
  psfs = [_EffectivePSF(p, c, config) for p, c in zip(physics, conditions)]
  min_flux = np.zeros(n_bands) if min_flux is None else np.asarray(min_flux)
  is_star = np.asarray(cat['type']) == 'star'
  total = flux_bulge + flux_disk                                   # (n, n_bands)
  rms = np.array([p.rms for p in physics])
  for i in range(len(total)):
    bands = np.flatnonzero(total[i] > min_flux)
    if bands.size == 0:
      continue
    threshold = folding_threshold_for(float(np.max(total[i] / rms)), config)
    comps, fluxes = [], []
    gal_stepk2, gal_maxk = 0.0, np.inf
    if not is_star[i]:
      # The galaxy's own wings keep the loose threshold: a wide bright galaxy's wrapped
      # 2% is spread thinly over its large stamp; the PSF's sets the stamp of compact ones.
      bulge, disk = _unit_components(cat, i, flux_bulge[i].max() > 0, flux_disk[i].max() > 0,
                                     config.folding_threshold)
      comps = [c for c in (bulge, disk) if c is not None]
      fluxes = [f for c, f in ((bulge, flux_bulge[i]), (disk, flux_disk[i])) if c is not None]
      gal_stepk2 = min(c.stepk for c in comps)**-2
      gal_maxk = max(c.maxk for c in comps)
    grids = {}   # (n, nk) -> (dk, freq, unit k-images of the components); shared by bands
    for b in bands:
      # GalSim's rules for a convolution: 1/stepk^2 adds up, maxk is the smallest. The
      # stamp is n pixels; the k grid has spacing 2 pi / (n scale) and covers +-maxk.
      stepk = 1.0 / math.sqrt(gal_stepk2 + psfs[b].stepk(threshold)**-2)
      n = _fft_size(min(2 * math.pi / (stepk * scale), config.max_stamp))
      dk = 2 * math.pi / (n * scale)
      nk = n * max(1, math.ceil(2 * min(gal_maxk, psfs[b].maxk) / (n * dk)))
      ix, iy = int(round(x[i, b])), int(round(y[i, b]))
      x0, y0 = ix - n // 2, iy - n // 2
      if x0 >= width or y0 >= height or x0 + n <= 0 or y0 + n <= 0:
        continue
      if (n, nk) not in grids:
        grids[(n, nk)] = (np.fft.fftfreq(nk, d=1.0 / nk) * dk,    # (nk,) arcsec^-1
                          [np.fft.ifftshift(c.drawKImage(nx=nk, ny=nk, scale=dk).array)
                           for c in comps])
      freq, comp_k = grids[(n, nk)]
      if comps:
        k_image = sum(f[b] * ck for f, ck in zip(fluxes, comp_k))
      else:
        k_image = total[i, b]
      # Shift the centre from stamp pixel 0 to the source position, n//2 + the sub-pixel
      # offset: exp(-i k.delta), applied before folding so it is exact for every alias.
      phase_x = np.exp(-1j * freq * (x[i, b] - x0) * scale)
      phase_y = np.exp(-1j * freq * (y[i, b] - y0) * scale)
      k_image = k_image * psfs[b].k_image(n, nk, dk) * phase_y[:, None] * phase_x[None, :]
      if nk > n:   # fold frequencies beyond Nyquist back (the pixel sampling aliases them)
        m = nk // n
        k_image = k_image.reshape(m, n, m, n).sum(axis=(0, 2))
      stamp = np.fft.irfft2(k_image[:, :n // 2 + 1], s=(n, n))   # (n, n), real
      xa, xb = max(x0, 0), min(x0 + n, width)
      ya, yb = max(y0, 0), min(y0 + n, height)
      out[b, ya:yb, xa:xb] += stamp[ya - y0:yb - y0, xa - x0:xb - x0]
  return out


# -- noise ----------------------------------------------------------------------------

def rms_map(shape: tuple[int, int], phys: BandPhysics, cond: BandConditions) -> np.ndarray:
  """Per-pixel background rms (nJy): nominal x depth factor x a linear gradient."""
  height, width = shape
  yy, xx = np.mgrid[0:height, 0:width]
  angle = np.deg2rad(cond.rms_gradient_angle_deg)
  # +-1 at the tile edges along the gradient direction.
  u = ((xx - (width - 1) / 2) * np.cos(angle) + (yy - (height - 1) / 2) * np.sin(angle)) / (
      max(height, width) / 2)
  return phys.rms * cond.depth_factor * (1.0 + cond.rms_gradient * u)


def add_noise(model: np.ndarray, rms: np.ndarray, rng: np.random.Generator,
              phys: BandPhysics, config: ObserveConfig = ObserveConfig()) -> np.ndarray:
  """model + background noise of per-pixel rms `rms` (+ the sources' Poisson noise)."""
  from scipy import ndimage
  background = rng.standard_normal(model.shape)
  if phys.resample > 1:
    # Spread each native pixel's noise over resample^2 tile pixels (box), then restore
    # unit variance per pixel: the box mean of r^2 unit normals has variance 1/r^2.
    background = ndimage.uniform_filter(background, size=phys.resample, mode='wrap')
    background *= phys.resample
  image = model + rms * background
  if config.source_noise:
    # Poisson noise of the detected source electrons (Gaussian limit), in nJy.
    variance = np.maximum(model, 0.0) * phys.njy_per_electron
    image += np.sqrt(variance) * rng.standard_normal(model.shape)
  return image
