"""Band registry: the one place that says which bands exist and how they are stored.

Everything that depends on bands (stems, pairing, file reading, plots) reads this
registry instead of hard-coding band lists. A band is one filter of one instrument;
an instrument is a set of bands stored together in one tile file, ``index`` being
the band's position along the file's leading axis.

Adding an instrument is data, not code::

    registry = BandRegistry.from_dicts(DEFAULT_BANDS + [
        dict(name='hst_f606w', instrument='hst', pixel_scale=0.05,
             wavelength_nm=590.0, index=0),
        dict(name='hst_f814w', instrument='hst', pixel_scale=0.05,
             wavelength_nm=805.0, index=1),
    ])

or, from a config, ``BandRegistry.from_config(config.bands)`` where ``config.bands``
is a list of such dicts (an empty list means the default Rubin + Euclid registry).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Band:
  """One filter of one instrument.

  Attributes:
    name: unique band name, ``<instrument>_<filter>`` by convention (e.g. 'rubin_r').
    instrument: instrument name; bands of one instrument share a tile file.
    pixel_scale: arcsec per pixel of the tiles this band is stored in.
    wavelength_nm: effective (pivot) wavelength in nm; used for hard-pair sampling
      and for ordering bands in plots.
    index: position of the band along axis 0 of the instrument's tile arrays.
  """

  name: str
  instrument: str
  pixel_scale: float
  wavelength_nm: float
  index: int

  def __post_init__(self):
    if not self.name or not isinstance(self.name, str):
      raise ValueError(f'band name must be a non-empty string, got {self.name!r}')
    if not self.instrument or not isinstance(self.instrument, str):
      raise ValueError(f'band {self.name}: instrument must be a non-empty string')
    if not self.pixel_scale > 0:
      raise ValueError(f'band {self.name}: pixel_scale must be > 0 arcsec, '
                       f'got {self.pixel_scale!r}')
    if not self.wavelength_nm > 0:
      raise ValueError(f'band {self.name}: wavelength_nm must be > 0, '
                       f'got {self.wavelength_nm!r}')
    if int(self.index) != self.index or self.index < 0:
      raise ValueError(f'band {self.name}: index must be an integer >= 0, '
                       f'got {self.index!r}')


# Effective wavelengths (nm, rounded) of the filter curves shipped with speclite:
# 'lsst2023-*' for Rubin and 'Euclid-*' for Euclid.
# Pixel scales are those of the tiles (Euclid NISP resampled to 0.1"/px in MER
# mosaics; native NISP pixels are 0.3"). tests/bands_test.py cross-checks the
# wavelengths against the filter curves in galsim and speclite.
DEFAULT_BANDS: list[dict[str, Any]] = [
    dict(name='rubin_u', instrument='rubin', pixel_scale=0.2, wavelength_nm=375.0, index=0),
    dict(name='rubin_g', instrument='rubin', pixel_scale=0.2, wavelength_nm=485.0, index=1),
    dict(name='rubin_r', instrument='rubin', pixel_scale=0.2, wavelength_nm=625.0, index=2),
    dict(name='rubin_i', instrument='rubin', pixel_scale=0.2, wavelength_nm=758.0, index=3),
    dict(name='rubin_z', instrument='rubin', pixel_scale=0.2, wavelength_nm=869.0, index=4),
    dict(name='rubin_y', instrument='rubin', pixel_scale=0.2, wavelength_nm=977.0, index=5),
    dict(name='euclid_vis', instrument='euclid', pixel_scale=0.1, wavelength_nm=751.0, index=0),
    dict(name='euclid_y', instrument='euclid', pixel_scale=0.1, wavelength_nm=1089.0, index=1),
    dict(name='euclid_j', instrument='euclid', pixel_scale=0.1, wavelength_nm=1379.0, index=2),
    dict(name='euclid_h', instrument='euclid', pixel_scale=0.1, wavelength_nm=1786.0, index=3),
]


class BandRegistry:
  """An ordered, immutable set of bands.

  The order defines the band id used by the model (stacked stem parameters are
  gathered by id), so it must be the same at training and inference time; the
  exported bundle stores the registry for that reason.
  """

  def __init__(self, bands: Iterable[Band]):
    self._bands: tuple[Band, ...] = tuple(bands)
    if not self._bands:
      raise ValueError('a band registry needs at least one band')
    self._by_name: dict[str, Band] = {}
    for band in self._bands:
      if band.name in self._by_name:
        raise ValueError(f'duplicate band name {band.name!r} in the registry')
      self._by_name[band.name] = band
    instruments: dict[str, list[Band]] = {}
    for band in self._bands:
      instruments.setdefault(band.instrument, []).append(band)
    for inst, members in instruments.items():
      indices = sorted(b.index for b in members)
      if indices != list(range(len(members))):
        raise ValueError(
            f'instrument {inst!r}: band indices must be 0..{len(members) - 1} '
            f'with no gaps or repeats, got {indices}')
      scales = {b.pixel_scale for b in members}
      if len(scales) != 1:
        raise ValueError(
            f'instrument {inst!r}: all bands of one tile file must share a pixel '
            f'scale, got {sorted(scales)}')
      members.sort(key=lambda b: b.index)
    self._instruments = {k: tuple(v) for k, v in instruments.items()}

  # -- construction -----------------------------------------------------------
  @classmethod
  def from_dicts(cls, entries: Sequence[Mapping[str, Any]]) -> 'BandRegistry':
    """Builds a registry from a list of dicts with the `Band` fields."""
    bands = []
    fields = {f.name for f in dataclasses.fields(Band)}
    for i, entry in enumerate(entries):
      entry = dict(entry)
      missing = fields - set(entry)
      unknown = set(entry) - fields
      if missing or unknown:
        raise ValueError(
            f'band entry {i} ({entry.get("name", "?")}): missing fields '
            f'{sorted(missing)}, unknown fields {sorted(unknown)}; '
            f'expected exactly {sorted(fields)}')
      bands.append(Band(name=str(entry['name']), instrument=str(entry['instrument']),
                        pixel_scale=float(entry['pixel_scale']),
                        wavelength_nm=float(entry['wavelength_nm']),
                        index=int(entry['index'])))
    return cls(bands)

  @classmethod
  def from_config(cls, bands_cfg: Sequence[Mapping[str, Any]] | None) -> 'BandRegistry':
    """Registry from `config.bands`; None or empty gives the default registry."""
    if not bands_cfg:
      return default_registry()
    return cls.from_dicts([dict(b) for b in bands_cfg])

  def to_dicts(self) -> list[dict[str, Any]]:
    """Plain-data form (for configs, JSON and exported bundles)."""
    return [dataclasses.asdict(b) for b in self._bands]

  # -- queries ----------------------------------------------------------------
  def __len__(self) -> int:
    return len(self._bands)

  def __iter__(self):
    return iter(self._bands)

  def __contains__(self, name: str) -> bool:
    return name in self._by_name

  def __getitem__(self, name: str) -> Band:
    try:
      return self._by_name[name]
    except KeyError:
      raise KeyError(f'unknown band {name!r}; known bands: {", ".join(self.names)}') from None

  def __eq__(self, other: object) -> bool:
    return isinstance(other, BandRegistry) and self._bands == other._bands

  def __hash__(self) -> int:
    return hash(self._bands)

  def __repr__(self) -> str:
    return f'BandRegistry({", ".join(self.names)})'

  @property
  def bands(self) -> tuple[Band, ...]:
    return self._bands

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(b.name for b in self._bands)

  @property
  def instruments(self) -> tuple[str, ...]:
    """Instrument names in registry order."""
    return tuple(self._instruments)

  def band_id(self, name: str) -> int:
    """Integer id of a band: its position in the registry (used to gather stems)."""
    return self.names.index(self[name].name)

  def instrument_bands(self, instrument: str) -> tuple[Band, ...]:
    """Bands of one instrument, ordered by their index in the tile file."""
    try:
      return self._instruments[instrument]
    except KeyError:
      raise KeyError(f'unknown instrument {instrument!r}; known: '
                     f'{", ".join(self.instruments)}') from None

  def pixel_scale(self, instrument: str) -> float:
    """Arcsec per pixel of an instrument's tiles."""
    return self.instrument_bands(instrument)[0].pixel_scale

  def n_bands(self, instrument: str) -> int:
    return len(self.instrument_bands(instrument))

  def stride(self, name: str, token_arcsec: float) -> int:
    """Pixels per token side for `name` so that one token covers `token_arcsec`.

    Raises if the token size is not a whole number of the band's pixels, since a
    fractional stride would break the sky alignment of token grids.
    """
    scale = self[name].pixel_scale
    ratio = token_arcsec / scale
    stride = int(round(ratio))
    if stride < 1 or abs(ratio - stride) > 1e-6:
      raise ValueError(
          f'token size {token_arcsec}" is not a whole number of {name} pixels '
          f'({scale}"/px); choose a multiple of {scale}"')
    return stride


def default_registry() -> BandRegistry:
  """The 10 Rubin + Euclid bands of JAISP."""
  return BandRegistry.from_dicts(DEFAULT_BANDS)
