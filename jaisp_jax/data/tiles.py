"""Reading and validating tiles: one instrument's bands over one sky patch.

A *tile* is one file holding every band of one instrument (the band registry says
which bands, in which order, at which pixel scale). Tiles of different instruments
that show the same sky share a file name (stem) in per-instrument folders::

    <root>/rubin_tiles_<field>/tile_0001.npz     (6, H, W)    0.2"/px
    <root>/euclid_tiles_<field>/tile_0001.npz    (4, 2H, 2W)  0.1"/px

Accepted file formats (anything else is a `TileError` naming the file):

* ``.npz`` (numpy ``savez``/``savez_compressed``; never unpickled): keys ``image`` and
  ``rms``, numeric arrays of shape (n_bands, H, W) in the registry's band order (a 2-D
  (H, W) array is accepted for a one-band instrument). Optional key ``wcs``: a string
  holding a FITS header with the celestial WCS of the tile (e.g.
  ``np.str_(wcs.to_header_string())``; bytes are decoded, ``''`` means no WCS, text
  that holds no valid card is an error). Other keys are ignored.
* FITS (``.fits``, ``.fit``, ``.fts``, ``.fits.gz``), read with astropy, in one of two
  layouts, matched on EXTNAME (case-insensitive):
  (a) cube: an HDU named ``IMAGE`` or ``SCI`` holding (n_bands, H, W) and an HDU named
      ``RMS`` or ``ERR`` of the same shape; the WCS comes from the image HDU's header.
  (b) one HDU per band: the image of band ``rubin_g`` in an HDU named ``RUBIN_G``,
      ``G``, ``IMAGE_RUBIN_G`` or ``IMAGE_G`` (the short name drops the
      ``<instrument>_`` prefix), its rms in ``RMS_RUBIN_G`` or ``RMS_G``; each (H, W).
      The WCS comes from the first band's image header.
  Layout (a) is tried first. A WCS without celestial axes counts as no WCS. A WCS
  whose pixel scale differs from the registry's by more than 1% is an error.

Integer, float16 and float64 arrays are accepted and converted to float32 (noted).
Invalid pixels, i.e. a NaN/Inf image value or an rms that is zero, negative or
non-finite, and values beyond +-1e18 in either (blank markers such as -1e30 or
3e38: their squares overflow float32), are not errors: they are counted, reported as warnings, and masked
(``valid`` False, image and rms set to 0), so readers only ever return finite arrays
and one bad pixel cannot poison training. A band whose pixels are all masked is
reported and flagged missing in that tile (``band_valid`` False) so that it is never
sampled as a view there; a tile with no usable band is an error.

Tiles of different instruments pair up when their sizes agree with the ratio of
their pixel scales (Euclid 2x Rubin) within a tolerance (default +-1 px, since real
cutouts are often off by one); `make_tile_pair` then crops them so the ratio is
exact, and checks with the WCS, where both tiles have one, that they cover the same
sky.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import warnings
import zipfile
import zlib
from typing import TYPE_CHECKING, Mapping

import numpy as np

from jaisp_jax.bands import BandRegistry, default_registry
from jaisp_jax.cli import UserError, first_line

if TYPE_CHECKING:
  from astropy.wcs import WCS

# File name endings recognised as tiles (longest first, so '.fits.gz' wins over '.gz').
TILE_SUFFIXES = ('.fits.gz', '.npz', '.fits', '.fit', '.fts')
IMAGE_EXTNAMES = ('IMAGE', 'SCI')
RMS_EXTNAMES = ('RMS', 'ERR')
NPZ_WCS_KEY = 'wcs'
# Relative disagreement allowed between a tile's WCS pixel scale and the registry's.
PIXEL_SCALE_RTOL = 0.01

PathLike = str | pathlib.Path


class TileError(UserError):
  """A tile file (or folder) that cannot be used; `str()` is '<path>: <problem>'."""

  def __init__(self, path: PathLike, problem: str):
    # Both in args so the exception survives pickling (worker processes).
    super().__init__(path, problem)
    self.path = pathlib.Path(path)
    self.problem = problem

  def __str__(self) -> str:
    return f'{self.path}: {self.problem}'


@dataclasses.dataclass
class InstrumentTile:
  """All bands of one instrument over one sky patch, validated and masked.

  Attributes:
    path: the file read.
    instrument: instrument name in the band registry.
    band_names: registry names of the bands along axis 0.
    pixel_scale: arcsec per pixel (from the registry).
    image: (C, H, W) float32, finite everywhere; 0 where `valid` is False.
    rms: (C, H, W) float32, finite everywhere; > 0 where valid, 0 where not.
    valid: (C, H, W) bool pixel mask (weight 0 where False).
    band_valid: (C,) bool; False for a band with no usable pixel in this tile, which
      must then never be sampled as a view of this tile.
    wcs: celestial `astropy.wcs.WCS` of the (H, W) pixel grid, or None.
    n_bad_image: (C,) int64, NaN/Inf or blank-marker (|value| > 1e18) image pixels per band.
    n_bad_rms: (C,) int64, rms pixels that are zero, negative, non-finite or > 1e18.
    source_dtype: dtype of the image as stored in the file.
    notes: informational findings (dtype conversion, cropping).
    warnings: data-quality findings (masked pixels, masked bands); `check --strict`
      turns them into errors.
  """

  path: pathlib.Path
  instrument: str
  band_names: tuple[str, ...]
  pixel_scale: float
  image: np.ndarray
  rms: np.ndarray
  valid: np.ndarray
  band_valid: np.ndarray
  wcs: WCS | None
  n_bad_image: np.ndarray
  n_bad_rms: np.ndarray
  source_dtype: str
  notes: list[str] = dataclasses.field(default_factory=list)
  warnings: list[str] = dataclasses.field(default_factory=list)

  @property
  def n_bands(self) -> int:
    return self.image.shape[0]

  @property
  def shape(self) -> tuple[int, int]:
    """(H, W) in pixels."""
    return self.image.shape[1], self.image.shape[2]

  @property
  def n_masked(self) -> np.ndarray:
    """(C,) number of masked pixels per band."""
    return self.valid.size // self.n_bands - self.valid.sum(axis=(1, 2))

  def inverse_variance(self) -> np.ndarray:
    """(C, H, W) float32 weight 1/rms^2, 0 where invalid."""
    safe = np.where(self.valid, self.rms, 1.0)
    return np.where(self.valid, 1.0 / (safe * safe), 0.0).astype(np.float32)

  def usable_bands(self) -> tuple[str, ...]:
    """Names of the bands that may be sampled as views of this tile."""
    return tuple(n for n, ok in zip(self.band_names, self.band_valid) if ok)

  def crop(self, y0: int, x0: int, height: int, width: int) -> 'InstrumentTile':
    """The sub-tile [y0:y0+height, x0:x0+width], WCS shifted to match.

    `band_valid` is recomputed; `n_bad_image`/`n_bad_rms` still count the file as read.
    """
    h, w = self.shape
    if not (0 <= y0 and 0 <= x0 and height >= 1 and width >= 1
            and y0 + height <= h and x0 + width <= w):
      raise ValueError(f'crop {y0}:{y0 + height}, {x0}:{x0 + width} outside a {h}x{w} tile')
    sl = (slice(None), slice(y0, y0 + height), slice(x0, x0 + width))
    wcs = None
    if self.wcs is not None:
      wcs = self.wcs.slice((sl[1], sl[2]))
      wcs.pixel_shape = (width, height)
    valid = self.valid[sl]
    return dataclasses.replace(
        self, image=self.image[sl], rms=self.rms[sl], valid=valid,
        band_valid=self.band_valid & valid.any(axis=(1, 2)), wcs=wcs,
        notes=list(self.notes), warnings=list(self.warnings))


# -- reading -----------------------------------------------------------------------


def tile_name(path: PathLike) -> str | None:
  """The pairing key of a tile file (its name without the tile suffix), or None
  if the file is not a tile (hidden file, unknown suffix)."""
  name = pathlib.Path(path).name
  if name.startswith('.'):
    return None
  lower = name.lower()
  for suffix in TILE_SUFFIXES:
    if lower.endswith(suffix) and len(name) > len(suffix):
      return name[:-len(suffix)]
  return None


def read_tile(path: PathLike, instrument: str, registry: BandRegistry | None = None, *,
              min_band_valid_fraction: float = 0.0) -> InstrumentTile:
  """Reads, validates and masks one tile file (npz or FITS; see the module docstring).

  Args:
    path: the tile file.
    instrument: which instrument of `registry` the file holds.
    registry: band registry (default: Rubin + Euclid).
    min_band_valid_fraction: a band with a smaller fraction of usable pixels is
      flagged missing in this tile (it is always flagged when no pixel is usable).

  Raises:
    TileError: the file cannot be used (naming the file and the problem).
  """
  registry = registry or default_registry()
  path = pathlib.Path(path)
  bands = registry.instrument_bands(instrument)
  if not path.is_file():
    if path.is_symlink() and not path.exists():
      raise TileError(path, f'broken symbolic link (target {os.readlink(path)} is missing, or '
                      'the link loops)')
    raise TileError(path, 'file does not exist' if not path.exists() else 'not a regular file')
  notes: list[str] = []
  lower = path.name.lower()
  if lower.endswith('.npz'):
    image, rms, header = _load_npz(path)
  elif tile_name(path) is not None:
    image, rms, header = _load_fits(path, instrument, registry, notes)
  else:
    raise TileError(path, f'unknown tile format; expected one of {", ".join(TILE_SUFFIXES)}')

  source_dtype = str(image.dtype)
  image = _as_float32(image, 'image', path, notes)
  rms = _as_float32(rms, 'rms', path, notes)
  n = len(bands)
  if image.ndim == 2 and n == 1 and rms.ndim == 2:
    image, rms = image[None], rms[None]
  if image.ndim != 3:
    raise TileError(path, f'image has {image.ndim} dimension(s), shape {image.shape}; '
                    f'expected 3: (n_bands, H, W) = ({n}, H, W)')
  if rms.shape != image.shape:
    raise TileError(path, f'rms shape {rms.shape} does not match image shape {image.shape}')
  if image.shape[0] != n:
    raise TileError(path, f'image has {image.shape[0]} band(s), expected {n} for '
                    f'{instrument} ({", ".join(b.name for b in bands)})')
  if image.shape[1] == 0 or image.shape[2] == 0:
    raise TileError(path, f'image is empty: shape {image.shape}')

  wcs = _celestial_wcs(header, path, instrument, registry) if header is not None else None
  if wcs is not None:
    wcs.pixel_shape = (image.shape[2], image.shape[1])
  tile = _mask(path, instrument, tuple(b.name for b in bands), registry.pixel_scale(instrument),
               image, rms, wcs, source_dtype, notes, min_band_valid_fraction)
  if not tile.band_valid.any():
    raise TileError(path, 'no usable band: every band is masked (NaN/Inf image, or rms zero, '
                    'negative or non-finite) or below the minimum valid fraction')
  return tile


def _load_npz(path: pathlib.Path):
  """(image, rms, wcs header text or None) from an npz archive; never unpickles."""
  try:
    with open(path, 'rb') as f:
      magic = f.read(6)
  except OSError as e:  # e.g. no read permission
    raise TileError(path, f'cannot read the file ({e.strerror or e})') from None
  if not magic:
    raise TileError(path, 'file is empty (0 bytes)')
  if magic.startswith(b'\x93NUMPY'):
    raise TileError(path, 'is a single .npy array, not an npz archive with keys image and rms')
  if not magic.startswith(b'PK\x03\x04'):
    raise TileError(path, 'corrupted: not an npz (zip) archive (bad signature)')
  try:
    npz = np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
    raise TileError(path, f'corrupted or truncated npz archive ({e})') from None
  with npz:
    keys = list(npz.files)
    for key in ('image', 'rms'):
      if key not in keys:
        raise TileError(path, f"missing key '{key}' (keys found: {', '.join(keys) or 'none'})")
    image = _npz_array(npz, 'image', path)
    rms = _npz_array(npz, 'rms', path)
    header = None
    if NPZ_WCS_KEY in keys:
      text = _npz_array(npz, NPZ_WCS_KEY, path)
      if text.dtype.kind not in 'US' or text.size != 1:
        raise TileError(path, f"key '{NPZ_WCS_KEY}' must be a string holding a FITS header, "
                        f'got dtype {text.dtype} shape {text.shape}')
      value = text.reshape(())[()]
      if isinstance(value, bytes):  # an 'S' array: str() would give "b'...'"
        value = value.decode('latin-1')
      # An empty string: no WCS, as if the key were absent.
      header = _header_from_text(value, path) if value.strip() else None
  return image, rms, header


def _npz_member_check(npz, key: str, path: pathlib.Path):
  """Refuses a member whose .npy header claims more data than the member holds, before
  numpy allocates it (a corrupted header can claim petabytes)."""
  name = key + '.npy'
  try:
    info = npz.zip.getinfo(name)
    with npz.zip.open(name) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
  except Exception:  # pylint: disable=broad-except  # not a .npy member: npz[key] says
    return
  if dtype.hasobject:
    return  # refused as an object array by npz[key]
  claimed = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
  if claimed > info.file_size:
    raise TileError(path, f"'{key}' is corrupted: its header claims shape {tuple(shape)} "
                    f'{dtype} ({claimed} bytes) but the member holds {info.file_size} bytes')


def _npz_array(npz, key: str, path: pathlib.Path) -> np.ndarray:
  _npz_member_check(npz, key, path)
  try:
    value = npz[key]
  except MemoryError:
    raise TileError(path, f"'{key}' is corrupted or too large to load (out of memory)") from None
  except ValueError as e:
    if 'allow_pickle' in str(e):
      raise TileError(path, f"'{key}' is an object array; refusing to unpickle it "
                      '(allow_pickle=False): store a numeric array') from None
    raise TileError(path, f"'{key}' is truncated or corrupted ({e})") from None
  except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as e:
    raise TileError(path, f"'{key}' is truncated or corrupted ({e})") from None
  if not isinstance(value, np.ndarray):  # a member that is not a .npy file: raw bytes
    raise TileError(path, f"'{key}' is not a numpy array (the archive member is not a .npy "
                    'file): corrupted or not written by np.savez')
  return value


def _header_from_text(text: str, path: pathlib.Path):
  from astropy.io import fits
  from astropy.io.fits.verify import VerifyWarning
  from astropy.utils.exceptions import AstropyUserWarning
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', VerifyWarning)  # judged below, by the cards' keywords
      warnings.simplefilter('ignore', AstropyUserWarning)
      header = fits.Header.fromstring(text, sep='\n' if '\n' in text else '')
      bad = [c for c in header.cards if not _card_ok(c)]
  except Exception as e:  # astropy raises assorted types for malformed cards
    raise TileError(path, f"key '{NPZ_WCS_KEY}' is not a valid FITS header ({e})") from None
  if not len(header) or len(bad) == len(header):  # junk text; one odd card is tolerated
    what = f'invalid card {bad[0].image.strip()[:40]!r}' if bad else 'no cards'
    raise TileError(path, f"key '{NPZ_WCS_KEY}' is not a valid FITS header ({what}); store "
                    "np.str_(wcs.to_header_string()), or '' for no WCS")
  return header


def _card_ok(card) -> bool:
  """A card with a FITS keyword (1-8 of A-Z 0-9 _ -, or a HIERARCH one): astropy parses
  any text into 'cards', e.g. 'this is not a header' into the keyword 'THIS IS'."""
  return (bool(re.fullmatch(r'[A-Z0-9_-]{1,8}', card.keyword or ''))
          or card.image.upper().startswith('HIERARCH '))


def _short_band(name: str, instrument: str) -> str:
  prefix = instrument + '_'
  return name[len(prefix):] if name.startswith(prefix) else name


def _load_fits(path: pathlib.Path, instrument: str, registry: BandRegistry, notes: list[str]):
  """(image, rms, header of the image) from a FITS file in layout (a) or (b)."""
  from astropy.io import fits
  result = structural = None
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    try:
      with fits.open(path, memmap=False, checksum=True) as hdul:
        hdul.readall()
        result = _fits_arrays(hdul, path, instrument, registry, notes)
    except TileError as e:
      structural = e
    except (OSError, ValueError, TypeError, EOFError, IndexError, KeyError) as e:
      raise TileError(path, f'corrupted or truncated FITS file ({_first_line(e)})') from None
  # Corruption explains structural symptoms (a missing HDU), so it is reported first.
  for w in caught:
    msg = str(w.message)
    low = msg.lower()
    if any(s in low for s in ('truncat', 'checksum', 'datasum', 'error validating header',
                              'header missing end card')):
      raise TileError(path, f'corrupted or truncated FITS file ({_first_line(msg)})')
  if structural is not None:
    raise structural
  return result


def _first_line(e) -> str:
  return first_line(e) or type(e).__name__


def _fits_arrays(hdul, path, instrument, registry, notes):
  by_name: dict[str, object] = {}
  for hdu in hdul:
    by_name.setdefault(hdu.name.upper(), hdu)
  found = ', '.join(by_name) or 'none'

  def data_of(hdu):
    if hdu.data is None:
      raise TileError(path, f'HDU {hdu.name} has no data')
    return np.asarray(hdu.data)

  image_hdu = next((by_name[n] for n in IMAGE_EXTNAMES if n in by_name), None)
  if image_hdu is not None:  # layout (a): cubes
    rms_hdu = next((by_name[n] for n in RMS_EXTNAMES if n in by_name), None)
    if rms_hdu is None:
      raise TileError(path, f'missing rms HDU: image cube {image_hdu.name} found but no HDU '
                      f'named {" or ".join(RMS_EXTNAMES)} (HDUs: {found})')
    return data_of(image_hdu), data_of(rms_hdu), image_hdu.header

  bands = registry.instrument_bands(instrument)
  images, rmss, header = [], [], None
  for band in bands:
    short = _short_band(band.name, instrument).upper()
    full = band.name.upper()
    img_names = (full, short, f'IMAGE_{full}', f'IMAGE_{short}')
    rms_names = (f'RMS_{full}', f'RMS_{short}')
    img = next((by_name[n] for n in img_names if n in by_name), None)
    if img is None:
      if not images and band is bands[0]:
        raise TileError(path, 'no image HDU: expected an IMAGE or SCI cube, or one HDU per '
                        f'band named like {", ".join(img_names)} (HDUs: {found})')
      raise TileError(path, f'missing HDU for band {band.name}: expected EXTNAME '
                      f'{" or ".join(img_names)} (HDUs: {found})')
    rms = next((by_name[n] for n in rms_names if n in by_name), None)
    if rms is None:
      raise TileError(path, f'missing rms HDU for band {band.name}: expected EXTNAME '
                      f'{" or ".join(rms_names)} (HDUs: {found})')
    for hdu in (img, rms):
      arr = data_of(hdu)
      if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
      if arr.ndim != 2:
        raise TileError(path, f'HDU {hdu.name} has shape {arr.shape}; a per-band HDU must be '
                        '2-D (H, W)')
      (images if hdu is img else rmss).append(arr)
    if images[-1].shape != images[0].shape:
      raise TileError(path, f'band {band.name} image is {images[-1].shape} but band '
                      f'{bands[0].name} is {images[0].shape}; all bands must share one grid')
    if rmss[-1].shape != images[-1].shape:
      raise TileError(path, f'rms shape {rmss[-1].shape} of band {band.name} does not match '
                      f'its image shape {images[-1].shape}')
    if header is None:
      header = img.header
  return np.stack(images), np.stack(rmss), header


def _as_float32(a: np.ndarray, key: str, path: pathlib.Path, notes: list[str]) -> np.ndarray:
  kind = a.dtype.kind
  if kind == 'O':
    raise TileError(path, f"'{key}' is an object array; store a numeric array")
  if kind not in 'fiu':
    raise TileError(path, f"'{key}' has dtype {a.dtype}; expected a real numeric array "
                    '(float or integer)')
  if a.dtype == np.float32:
    return a if a.dtype.isnative else a.astype(np.float32)
  notes.append(f'{key}: {a.dtype} converted to float32')
  with np.errstate(over='ignore', invalid='ignore'):  # overflow -> inf -> masked below
    return a.astype(np.float32)


# Smallest usable rms: 1 / _RMS_MIN**2 = 1e38, below float32's 3.4e38.
_RMS_MIN = 1e-19
# Largest usable |image| and rms: larger values are blank markers (-1e30, 3e38), not
# data (a real pixel is far below 1e18 in any flux unit), and their squares overflow
# float32 in any residual or variance downstream.
_VALUE_MAX = 1e18


def _mask(path, instrument, band_names, pixel_scale, image, rms, wcs, source_dtype, notes,
          min_band_valid_fraction) -> InstrumentTile:
  """Counts and masks invalid pixels; flags bands with no (or too few) usable pixels."""
  nonfinite = ~np.isfinite(image)                      # (C, H, W)
  with np.errstate(invalid='ignore'):
    blank = np.abs(image) > _VALUE_MAX                 # (C, H, W), False where NaN
  bad_image = nonfinite | blank
  # rms below ~1e-19 is positive but its weight 1/rms^2 overflows float32 (inf): such a
  # pixel would dominate (or poison) every weighted sum, so it is masked like rms <= 0.
  rms_ok = np.isfinite(rms) & (rms >= _RMS_MIN) & (rms <= _VALUE_MAX)  # (C, H, W)
  valid = ~bad_image & rms_ok
  n_bad_image = bad_image.sum(axis=(1, 2))
  n_bad_rms = (~rms_ok).sum(axis=(1, 2))
  n_pix = image.shape[1] * image.shape[2]
  n_valid = valid.sum(axis=(1, 2))
  warns: list[str] = []
  if not valid.all():
    rms_in = rms
    image = np.where(valid, image, np.float32(0))
    rms = np.where(valid, rms, np.float32(0))
    for c, name in enumerate(band_names):
      n_nonfinite, n_blank = int(nonfinite[c].sum()), int(blank[c].sum())
      if n_nonfinite:
        warns.append(f'{name}: {n_nonfinite} NaN/Inf image pixel(s) '
                     f'({n_nonfinite / n_pix:.2%}) masked')
      if n_blank:
        warns.append(f'{name}: {n_blank} image pixel(s) beyond +-{_VALUE_MAX:g} (blank '
                     f'markers) ({n_blank / n_pix:.2%}) masked')
      if n_bad_rms[c]:
        band_rms = rms_in[c]
        kinds = {'zero': int((band_rms == 0).sum()), 'negative': int((band_rms < 0).sum()),
                 'NaN/Inf': int((~np.isfinite(band_rms)).sum()),
                 f'below {_RMS_MIN:g} (1/rms^2 overflows)':
                     int(((band_rms > 0) & (band_rms < _RMS_MIN)).sum()),
                 f'above {_VALUE_MAX:g} (blank markers)':
                     int((np.isfinite(band_rms) & (band_rms > _VALUE_MAX)).sum())}
        detail = ', '.join(f'{v} {k}' for k, v in kinds.items() if v)
        warns.append(f'{name}: {n_bad_rms[c]} rms pixel(s) masked ({detail}; '
                     f'{n_bad_rms[c] / n_pix:.2%} of the band)')
  band_valid = (n_valid > 0) & (n_valid >= min_band_valid_fraction * n_pix)
  for c, name in enumerate(band_names):
    if n_valid[c] == 0:
      warns.append(f'{name}: every pixel is masked; band treated as missing in this tile')
    elif not band_valid[c]:
      warns.append(f'{name}: only {n_valid[c] / n_pix:.1%} of pixels usable (minimum '
                   f'{min_band_valid_fraction:.1%}); band treated as missing in this tile')
  return InstrumentTile(
      path=path, instrument=instrument, band_names=band_names, pixel_scale=pixel_scale,
      image=image, rms=rms, valid=valid, band_valid=band_valid, wcs=wcs,
      n_bad_image=n_bad_image.astype(np.int64), n_bad_rms=n_bad_rms.astype(np.int64),
      source_dtype=source_dtype, notes=notes, warnings=warns)


def _celestial_wcs(header, path: pathlib.Path, instrument: str,
                   registry: BandRegistry) -> WCS | None:
  """The celestial WCS of a header (None if it has none), checked against the registry."""
  from astropy.wcs import WCS, FITSFixedWarning
  from astropy.wcs.utils import proj_plane_pixel_scales
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', FITSFixedWarning)
    try:
      wcs = WCS(header)
    except Exception as e:  # astropy raises assorted types for malformed WCS keywords
      raise TileError(path, f'invalid WCS in header ({_first_line(e)})') from None
  if not wcs.has_celestial:
    return None
  wcs = wcs.celestial
  expected = registry.pixel_scale(instrument)
  scales = proj_plane_pixel_scales(wcs) * 3600.0   # arcsec per pixel, per axis
  for s in scales:
    if not abs(s - expected) <= PIXEL_SCALE_RTOL * expected:
      raise TileError(path, f'WCS pixel scale {s:.4g}"/px differs from the registry\'s '
                      f'{expected:g}"/px for {instrument}')
  return wcs


# -- sky alignment -----------------------------------------------------------------


def _footprint_points(tile: InstrumentTile) -> np.ndarray:
  """(5, 2) pixel (x, y) of the outer corners and centre of the tile's pixel grid."""
  h, w = tile.shape
  return np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5],
                   [(w - 1) / 2, (h - 1) / 2]])


def sky_offset_arcsec(a: InstrumentTile, b: InstrumentTile) -> float | None:
  """Largest sky separation (arcsec) between the corresponding outer corners and
  centres of two tiles' footprints; None unless both tiles have a WCS.

  Tiles covering the same sky give ~0 whatever their pixel scales.
  """
  if a.wcs is None or b.wcs is None:
    return None
  ra_a, dec_a = a.wcs.pixel_to_world_values(*_footprint_points(a).T)
  ra_b, dec_b = b.wcs.pixel_to_world_values(*_footprint_points(b).T)
  ra_a, dec_a, ra_b, dec_b = (np.radians(v) for v in (ra_a, dec_a, ra_b, dec_b))
  # Haversine: accurate for the tiny separations that matter here.
  hav = (np.sin((dec_b - dec_a) / 2) ** 2
         + np.cos(dec_a) * np.cos(dec_b) * np.sin((ra_b - ra_a) / 2) ** 2)
  sep = 2 * np.arcsin(np.sqrt(np.clip(hav, 0.0, 1.0)))
  return float(np.degrees(sep.max()) * 3600.0)


def check_sky_alignment(a: InstrumentTile, b: InstrumentTile,
                        tolerance_arcsec: float | None = None) -> float | None:
  """Checks with their WCS that two tiles cover the same sky.

  Args:
    a, b: tiles (typically the same sky patch seen by two instruments).
    tolerance_arcsec: largest allowed footprint offset; default one pixel of the
      coarser tile.

  Returns:
    The offset in arcsec (see `sky_offset_arcsec`), or None when either tile has no
    WCS (nothing to check).

  Raises:
    TileError: naming `b`, when the offset exceeds the tolerance.
  """
  offset = sky_offset_arcsec(a, b)
  if offset is None:
    return None
  tol = max(a.pixel_scale, b.pixel_scale) if tolerance_arcsec is None else tolerance_arcsec
  if offset > tol:
    raise TileError(b.path, f'does not cover the same sky as {a.instrument} tile {a.path.name}: '
                    f'footprints differ by up to {offset:.3g}" (tolerance {tol:g}")')
  return offset


# -- pairing -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TileFiles:
  """The files of one sky patch, one per instrument, found by their shared name."""

  name: str
  paths: Mapping[str, pathlib.Path]   # instrument -> file, in registry order


@dataclasses.dataclass
class TileListing:
  """What `find_tile_pairs` found.

  Attributes:
    pairs: complete sets of files (one per instrument), sorted by name.
    problems: errors found while listing (unpaired tiles, duplicate names).
    skipped: messages about unpaired tiles skipped because `allow_unpaired` was set.
    ignored: files in the folders that are not tiles (unknown suffix).
  """

  pairs: list[TileFiles]
  problems: list[TileError]
  skipped: list[str]
  ignored: list[pathlib.Path]


@dataclasses.dataclass
class TilePair:
  """One sky patch seen by several instruments, sizes aligned to the pixel-scale ratio.

  Attributes:
    name: the shared file name (without suffix).
    tiles: instrument -> tile, in registry order.
    reference: the instrument with the coarsest pixels; the others are exactly
      (reference pixel scale / their pixel scale) times its size.
    notes: pair-level findings (cropping).
    sky_offset_arcsec: largest footprint offset from the reference tile measured with
      the WCS, or None when not every tile has one.
  """

  name: str
  tiles: dict[str, InstrumentTile]
  reference: str
  notes: list[str]
  sky_offset_arcsec: float | None

  def __getitem__(self, instrument: str) -> InstrumentTile:
    return self.tiles[instrument]

  def usable_bands(self) -> tuple[str, ...]:
    """Names of the bands that may be sampled as views of this sky patch."""
    return tuple(b for t in self.tiles.values() for b in t.usable_bands())


def list_tile_files(folder: PathLike) -> tuple[dict[str, pathlib.Path], list[TileError],
                                               list[pathlib.Path]]:
  """Tile files of one folder: (name -> path, problems (duplicate or non-UTF-8 names),
  ignored files). A broken symlink named like a tile is listed (`read_tile` reports it).

  Raises:
    TileError: the folder is missing, not a folder, or holds no tile file.
  """
  folder = pathlib.Path(folder)
  if not folder.exists():
    raise TileError(folder, 'folder does not exist')
  if not folder.is_dir():
    raise TileError(folder, 'not a folder')
  files: dict[str, pathlib.Path] = {}
  problems, ignored = [], []
  try:
    entries = sorted(folder.iterdir())
  except OSError as e:  # e.g. no read permission on the folder
    raise TileError(folder, f'cannot list the folder ({e.strerror or e})') from None
  for p in entries:
    name = tile_name(p)
    if name is not None and _not_utf8(name):
      # Tile names are stored as text in the dataset (record ids): such a name would
      # pass here and crash the build while it writes.
      problems.append(TileError(p, 'file name is not valid UTF-8; rename the file (and its '
                                'partners in the other folders)'))
      continue
    # A broken link named like a tile is listed, so that `read_tile` reports it, rather
    # than ignored (which would blame its partners for being unpaired).
    if name is None or not (p.is_file() or (p.is_symlink() and not p.exists())):
      if not p.name.startswith('.'):
        ignored.append(p)
      continue
    if name in files:
      problems.append(TileError(p, f'duplicate tile name {name!r}: {files[name].name} is '
                                'already in this folder'))
      continue
    files[name] = p
  if not files and not problems:
    raise TileError(folder, f'no tile files ({", ".join("*" + s for s in TILE_SUFFIXES)}) '
                    'in this folder')
  return files, problems, ignored


def _not_utf8(name: str) -> bool:
  """Whether a file name held bytes that are not UTF-8 (decoded as lone surrogates)."""
  try:
    name.encode('utf-8')
  except UnicodeEncodeError:
    return True
  return False


def find_tile_pairs(dirs: Mapping[str, PathLike], registry: BandRegistry | None = None,
                    allow_unpaired: bool = False) -> TileListing:
  """Pairs the tiles of per-instrument folders by file name.

  Args:
    dirs: instrument -> folder of that instrument's tiles.
    registry: band registry (default: Rubin + Euclid); every instrument must be in it.
    allow_unpaired: a name missing from some folder is skipped (and reported in
      `skipped`) instead of being a problem.

  Raises:
    UserError: unknown instrument or no folder; TileError: a folder is missing or empty.
  """
  registry = registry or default_registry()
  if not dirs:
    raise UserError('no tile folder given')
  for inst in dirs:
    if inst not in registry.instruments:
      raise UserError(f'unknown instrument {inst!r}; the band registry knows '
                      f'{", ".join(registry.instruments)}')
  order = [i for i in registry.instruments if i in dirs]
  per_inst, problems, ignored = {}, [], []
  for inst in order:
    files, dup, ign = list_tile_files(dirs[inst])
    per_inst[inst] = files
    problems += dup
    ignored += ign
  names = sorted(set().union(*(f.keys() for f in per_inst.values())))
  pairs, skipped = [], []
  for name in names:
    missing = [i for i in order if name not in per_inst[i]]
    if not missing:
      pairs.append(TileFiles(name, {i: per_inst[i][name] for i in order}))
      continue
    present = next(per_inst[i][name] for i in order if name in per_inst[i])
    problem = ('unpaired: no ' + ' or '.join(f'{i} tile named {name} in {dirs[i]}'
                                             for i in missing))
    if allow_unpaired:
      skipped.append(f'{present}: {problem} (skipped)')
    else:
      problems.append(TileError(present, problem))
  return TileListing(pairs=pairs, problems=problems, skipped=skipped, ignored=ignored)


def make_tile_pair(name: str, tiles: Mapping[str, InstrumentTile],
                   registry: BandRegistry | None = None, *, size_tolerance: int = 1,
                   sky_tolerance_arcsec: float | None = None,
                   check_sky: bool = True) -> TilePair:
  """Aligns already-read tiles of one sky patch into a `TilePair`.

  The reference is the instrument with the coarsest pixels; every other tile must be
  (reference scale / its scale) times the reference size, to within `size_tolerance`
  of its own pixels. Tiles are then cropped so that the ratio is exact: at the far
  edge, or at the near edge when both WCS say the extra pixels lie there (noted).
  With WCS on both sides the footprints must agree to `sky_tolerance_arcsec`.

  Raises:
    TileError: naming the offending file (size or sky mismatch).
  """
  registry = registry or default_registry()
  order = [i for i in registry.instruments if i in tiles]
  ref = max(order, key=registry.pixel_scale)   # first of the coarsest, in registry order
  ref_tile = tiles[ref]
  rh, rw = ref_tile.shape
  ratios = {i: registry.pixel_scale(ref) / registry.pixel_scale(i) for i in order}
  for inst in order:
    if inst == ref:
      continue
    k, (h, w) = ratios[inst], tiles[inst].shape
    if abs(h - rh * k) > size_tolerance or abs(w - rw * k) > size_tolerance:
      raise TileError(
          tiles[inst].path,
          f'{inst} tile is {h}x{w} px but {ref} tile {ref_tile.path.name} is {rh}x{rw} px: '
          f'expected {k:g}x that = {_fmt(rh * k)}x{_fmt(rw * k)} px (+-{size_tolerance} px)')
  # Largest reference size that every tile covers completely.
  nh = min([rh] + [math.floor(tiles[i].shape[0] / ratios[i] + 1e-9) for i in order])
  nw = min([rw] + [math.floor(tiles[i].shape[1] / ratios[i] + 1e-9) for i in order])
  out, notes = {}, []
  for inst in order:
    tile, k = tiles[inst], ratios[inst]
    th, tw = _scaled(nh, k), _scaled(nw, k)
    h, w = tile.shape
    if (th, tw) != (h, w):
      y0, x0 = _crop_start(ref_tile, tile, h - th, w - tw) if inst != ref else (0, 0)
      tile = tile.crop(y0, x0, th, tw)
      if not tile.band_valid.any():
        raise TileError(tile.path, f'no usable band left after cropping to {th}x{tw} px')
      msg = (f'{inst} tile cropped from {h}x{w} to {th}x{tw} px (first row {y0}, '
             f'first column {x0}) to match the {ref} tile at exactly {k:g}x')
      tile.notes.append(msg)
      notes.append(f'{tile.path}: {msg}')
    out[inst] = tile
  offsets = []
  if check_sky:
    for inst in order:
      if inst != ref:
        offsets.append(check_sky_alignment(out[ref], out[inst], sky_tolerance_arcsec))
  sky = max(offsets) if offsets and None not in offsets else None
  return TilePair(name=name, tiles=out, reference=ref, notes=notes, sky_offset_arcsec=sky)


def read_tile_pair(files: TileFiles, registry: BandRegistry | None = None, *,
                   size_tolerance: int = 1, sky_tolerance_arcsec: float | None = None,
                   min_band_valid_fraction: float = 0.0) -> TilePair:
  """Reads every file of one sky patch and aligns them (`read_tile` + `make_tile_pair`).

  Raises:
    TileError: for the first bad file (use `read_tile` per file to collect them all).
  """
  registry = registry or default_registry()
  tiles = {inst: read_tile(p, inst, registry, min_band_valid_fraction=min_band_valid_fraction)
           for inst, p in files.paths.items()}
  return make_tile_pair(files.name, tiles, registry, size_tolerance=size_tolerance,
                        sky_tolerance_arcsec=sky_tolerance_arcsec)


def _scaled(n: int, k: float) -> int:
  return int(round(n * k)) if abs(n * k - round(n * k)) < 1e-6 else math.floor(n * k)


def _fmt(x: float) -> str:
  return f'{x:g}' if abs(x - round(x)) > 1e-6 else str(int(round(x)))


def _crop_start(ref: InstrumentTile, tile: InstrumentTile, extra_h: int,
                extra_w: int) -> tuple[int, int]:
  """First row/column to keep when cropping `tile` by (extra_h, extra_w) pixels.

  Without WCS on both tiles the far edge is cropped. With them, the crop starts where
  the reference tile's outer corner falls on `tile`'s pixel grid (clipped to the
  available extra pixels), so a cutout with one extra pixel at the near edge
  realigns exactly.
  """
  if ref.wcs is None or tile.wcs is None:
    return 0, 0
  ra, dec = ref.wcs.pixel_to_world_values(-0.5, -0.5)
  x, y = tile.wcs.world_to_pixel_values(ra, dec)
  y0 = int(np.clip(np.round(float(y) + 0.5), 0, extra_h))
  x0 = int(np.clip(np.round(float(x) + 0.5), 0, extra_w))
  return y0, x0
