"""Train/validation split by sky region: overlapping tiles never straddle the split.

Chips cut from one tile, or from tiles that overlap on the sky, share pixels (tiles
cut from one mosaic with overlaps are pixel-identical where they overlap), so a
chip-level split would leak validation sky into training. Tiles are therefore
grouped into *sky regions*: connected components of the "overlaps" relation, where
two tiles overlap when

  * both have a WCS and their footprints intersect by more than `min_overlap_px`
    reference pixels on each side (convex-polygon clipping in a tangent plane), or
  * they share a pixel-identical window of `WINDOW` x `WINDOW` pixels in some band of
    the reference instrument (content hashing; this finds overlaps between tiles
    without WCS, e.g. the seed npz layout). Windows with a masked pixel or a single
    repeated value are ignored so empty or masked areas never link tiles.

Whole regions are then assigned to a split: in a seeded random order, regions go to
validation until it holds `val_fraction` of the chips (at least one region when there
are two or more), the rest to training.
"""

from __future__ import annotations

import dataclasses

import numpy as np

WINDOW = 8           # side of the hashed windows (px)
GRID_STRIDE = 32     # stride of the windows kept as a tile's signature (px)
_HASH_WEIGHTS = np.random.default_rng(20240611).integers(
    1, 2 ** 63, size=(WINDOW, WINDOW), dtype=np.uint64) | np.uint64(1)


@dataclasses.dataclass
class TileSky:
  """What the split needs to know about one tile pair (pixels not kept).

  Attributes:
    name: tile name.
    n_chips: chips the tile contributes.
    corners: (4, 2) RA, Dec (deg) of the reference tile's outer pixel corners, in
      order around the footprint; None without WCS.
    pixel_scale: arcsec per reference pixel.
    signature: (n,) uint64 hashes of grid-aligned windows of every valid band.
    probe: (m,) uint64 hashes of the windows at every offset of one valid band.
  """
  name: str
  n_chips: int
  corners: np.ndarray | None
  pixel_scale: float
  signature: np.ndarray
  probe: np.ndarray


def window_hashes(band: np.ndarray, valid: np.ndarray, stride: int, band_index: int) -> np.ndarray:
  """uint64 hashes of the WINDOW x WINDOW windows at multiples of `stride`.

  The hash is a function of the window's float32 bits and the band index only, so
  identical pixels give identical hashes wherever the window sits in a tile.
  """
  h, w = band.shape
  if h < WINDOW or w < WINDOW:
    return np.zeros(0, np.uint64)
  bits = np.ascontiguousarray(band, np.float32).view(np.uint32).astype(np.uint64)
  ny, nx = (h - WINDOW) // stride + 1, (w - WINDOW) // stride + 1
  with np.errstate(over='ignore'):
    acc = np.full((ny, nx), np.uint64(band_index + 1) * np.uint64(0x9E3779B97F4A7C15))
  bad = np.zeros((ny, nx), bool)
  first = bits[0:(ny - 1) * stride + 1:stride, 0:(nx - 1) * stride + 1:stride]
  same = np.ones((ny, nx), bool)
  with np.errstate(over='ignore'):
    for i in range(WINDOW):
      for j in range(WINDOW):
        sl = (slice(i, i + (ny - 1) * stride + 1, stride), slice(j, j + (nx - 1) * stride + 1, stride))
        v = bits[sl]
        acc += v * _HASH_WEIGHTS[i, j]
        bad |= ~valid[sl]
        same &= v == first
  return acc[~bad & ~same]


def tile_sky(name: str, n_chips: int, ref_image: np.ndarray, ref_valid: np.ndarray,
             band_valid: np.ndarray, pixel_scale: float, wcs=None) -> TileSky:
  """Summarises one tile pair from its reference-instrument arrays (n_bands, H, W)."""
  good = [c for c in range(ref_image.shape[0]) if band_valid[c]]
  signature = np.concatenate([np.zeros(0, np.uint64)] + [
      window_hashes(ref_image[c], ref_valid[c], GRID_STRIDE, c) for c in good])
  probe = (window_hashes(ref_image[good[0]], ref_valid[good[0]], 1, good[0])
           if good else np.zeros(0, np.uint64))
  corners = None
  if wcs is not None:
    h, w = ref_image.shape[-2:]
    xs = np.array([-0.5, w - 0.5, w - 0.5, -0.5])
    ys = np.array([-0.5, -0.5, h - 0.5, h - 0.5])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    corners = np.stack([np.asarray(ra, float), np.asarray(dec, float)], axis=-1)
  return TileSky(name, n_chips, corners, pixel_scale, np.unique(signature), np.unique(probe))


def _tangent(radec: np.ndarray, center: np.ndarray) -> np.ndarray:
  """Gnomonic projection (arcsec) of (n, 2) RA/Dec about the unit vector `center`."""
  ra, dec = np.radians(radec[:, 0]), np.radians(radec[:, 1])
  v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)
  east = np.cross([0.0, 0.0, 1.0], center)
  if np.linalg.norm(east) < 1e-12:  # at a pole any east will do
    east = np.array([0.0, 1.0, 0.0])
  east /= np.linalg.norm(east)
  north = np.cross(center, east)
  d = v @ center
  return np.degrees(np.stack([v @ east / d, v @ north / d], -1)) * 3600.0


def _unit(radec: np.ndarray) -> np.ndarray:
  ra, dec = np.radians(radec[..., 0]), np.radians(radec[..., 1])
  v = np.stack([np.cos(dec) * np.cos(ra), np.cos(dec) * np.sin(ra), np.sin(dec)], -1)
  return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _clip(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
  """Sutherland-Hodgman: `subject` polygon clipped by convex `clip` (both (n, 2))."""
  # Orient the clip polygon counter-clockwise so "inside" is to the left of each edge.
  area = 0.5 * np.sum(clip[:, 0] * np.roll(clip[:, 1], -1) - np.roll(clip[:, 0], -1) * clip[:, 1])
  if area < 0:
    clip = clip[::-1]
  out = list(subject)
  for a, b in zip(clip, np.roll(clip, -1, axis=0)):
    if not out:
      break
    pts, out = out, []
    side = lambda p: (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])  # noqa: E731
    for p, q in zip(pts, pts[1:] + pts[:1]):
      sp, sq = side(p), side(q)
      if sp >= 0:
        out.append(p)
      if (sp >= 0) != (sq >= 0):
        t = sp / (sp - sq)
        out.append(p + t * (q - p))
  return np.array(out).reshape(-1, 2)


def footprints_overlap(a: TileSky, b: TileSky, min_overlap_px: float = 1.0) -> bool:
  """Whether two WCS footprints intersect by more than `min_overlap_px` on each side."""
  center = _unit(a.corners).mean(0)
  center /= np.linalg.norm(center)
  pa, pb = _tangent(a.corners, center), _tangent(b.corners, center)
  inter = _clip(pa, pb)
  if len(inter) < 3:
    return False
  extent = inter.max(0) - inter.min(0)
  return bool((extent > min_overlap_px * max(a.pixel_scale, b.pixel_scale)).all())


def sky_regions(tiles: list[TileSky], min_overlap_px: float = 1.0) -> np.ndarray:
  """(n_tiles,) region id per tile: connected components of the overlap relation."""
  n = len(tiles)
  parent = list(range(n))

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  def union(i, j):
    ri, rj = find(i), find(j)
    if ri != rj:
      parent[max(ri, rj)] = min(ri, rj)

  # WCS footprints: cheap bounding-circle test, then exact polygon clipping.
  with_wcs = [i for i, t in enumerate(tiles) if t.corners is not None]
  if with_wcs:
    centers = np.stack([_unit(tiles[i].corners).mean(0) for i in with_wcs])
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    radii = np.array([np.arccos(np.clip(_unit(tiles[i].corners) @ c, -1, 1)).max()
                      for i, c in zip(with_wcs, centers)])
    sep = np.arccos(np.clip(centers @ centers.T, -1, 1))
    for a in range(len(with_wcs)):
      for b in range(a + 1, len(with_wcs)):
        if sep[a, b] < radii[a] + radii[b] and footprints_overlap(
            tiles[with_wcs[a]], tiles[with_wcs[b]], min_overlap_px):
          union(with_wcs[a], with_wcs[b])

  # Pixel content: a tile's probe (every offset) against every other tile's grid windows.
  if n > 1:
    sig = np.concatenate([t.signature for t in tiles])
    owner = np.concatenate([np.full(len(t.signature), i) for i, t in enumerate(tiles)])
    order = np.argsort(sig, kind='stable')
    sig, owner = sig[order], owner[order]
    for i, t in enumerate(tiles):
      if not len(t.probe) or not len(sig):
        continue
      lo = np.searchsorted(sig, t.probe, side='left')
      hi = np.searchsorted(sig, t.probe, side='right')
      for l, h in zip(lo[hi > lo], hi[hi > lo]):
        for j in owner[l:h]:
          if j != i:
            union(i, int(j))

  roots = np.array([find(i) for i in range(n)])
  _, ids = np.unique(roots, return_inverse=True)
  return ids.astype(np.int64)


def assign_splits(regions: np.ndarray, n_chips: np.ndarray, val_fraction: float,
                  seed: int = 0) -> np.ndarray:
  """(n_tiles,) split name per tile ('train' or 'validation'), whole regions at once."""
  regions = np.asarray(regions)
  n_chips = np.asarray(n_chips)
  out = np.full(len(regions), 'train', dtype=object)
  chips_of = {r: int(n_chips[regions == r].sum()) for r in np.unique(regions)}
  # Only regions with chips count: leaving a chipless one "for training" would leave
  # the train split empty (e.g. a tile smaller than one chip).
  ids = np.array([r for r, n in chips_of.items() if n > 0])
  if val_fraction <= 0 or len(ids) < 2:
    return out
  target = val_fraction * int(n_chips.sum())
  order = np.random.default_rng(seed).permutation(ids)
  taken = 0
  for r in order[:-1]:  # always leave at least one region for training
    if taken >= target:
      break
    if taken > 0 and taken + chips_of[r] > 1.5 * target:
      continue  # would overshoot a lot; try a smaller region
    out[regions == r] = 'validation'
    taken += chips_of[r]
  return out
