"""Real pixels: sep's ground-based deep field, scored against its SExtractor catalogue.

The source distribution of sep 1.4.1 on PyPI carries a real image: ``data/image.fits``
(256 x 256 px, R band, ESO NTT/EMMI 1992, sum of 3 frames, 1200 s; background ~6850
counts, not subtracted), ``data/rms.fits`` and ``data/back.fits`` (SExtractor's rms and
background maps of it) and ``data/image.cat`` (the SExtractor catalogue of 65 objects,
DETECT_THRESH 1.5, DETECT_MINAREA 5, default filter). `fetch_sep_data` obtains it at
run time through pip (``pip download --no-deps --no-binary sep sep==1.4.1``; nothing is
committed) and caches the four files.

`run` scores, against that catalogue (positions X_IMAGE, Y_IMAGE, 1-based -> 0-based):

  sep           classical detector on the background-subtracted image (sep.Background)
                with the catalogue's settings (thresh 1.5 x rms.fits, minarea 5).
                Against SExtractor itself this measures agreement of two
                implementations of one algorithm (should be near 1).
  infomap       each model's information map (`weights`): mean weight on pixels within
                `source_radius_px` of a catalogue source vs on pixels farther than
                `sky_radius_px` from every source, and the ROC AUC of the weight as a
                source-vs-sky pixel classifier.
  head          each model's detection head (detection.TokenDetector) trained on
                simulated held-out chips of `band` (rubin_r, 0.2"/px) and applied to this
                image as if it were that band: a domain-transfer test (other telescope,
                pixel scale, seeing, noise). Reported only when held-out data with truth
                is given.

Detection figures: ``completeness['snr>T']`` = fraction of catalogue objects with
FLUX_AUTO / FLUXERR_AUTO > T matched one-to-one within `match_px` pixels; ``purity`` =
matched detections / detections; detections and catalogue objects closer than
`border_px` to the image edge are left out.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
from typing import Any
from urllib.parse import urlparse

import numpy as np

from jaisp_jax.evaluate.probes import classical
from jaisp_jax.evaluate.probes import detection
from jaisp_jax.evaluate.probes import features

SEP_VERSION = '1.4.1'
FILES = ('image.fits', 'rms.fits', 'back.fits', 'image.cat')
_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'jaisp_jax', f'sep-{SEP_VERSION}-data')


class RegistryUnreachable(RuntimeError):
  """The package registry cannot be reached (no network): the real image is unavailable."""


@dataclasses.dataclass(frozen=True)
class RealDataConfig:
  """Real-pixel evaluation settings (module docstring)."""
  band: str = 'rubin_r'          # the band the image is presented as to the models
  match_px: float = 2.0
  border_px: float = 4.0
  snr_thresholds: tuple[float, ...] = (5.0, 10.0)
  sep_thresh: float = 1.5
  source_radius_px: float = 2.0
  sky_radius_px: float = 6.0
  cache_dir: str = _CACHE
  timeout_s: float = 300.0


def _index_host() -> tuple[str, int]:
  """(host, port) of the index pip uses (PIP_INDEX_URL or pypi.org)."""
  url = os.environ.get('PIP_INDEX_URL', 'https://pypi.org/simple')
  parsed = urlparse(url)
  return parsed.hostname or 'pypi.org', parsed.port or (443 if parsed.scheme == 'https' else 80)


def registry_reachable(timeout_s: float = 5.0) -> tuple[bool, str]:
  """(reachable, reason): a TCP connection to the package index succeeds."""
  host, port = _index_host()
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return True, f'{host}:{port} reachable'
  except OSError as e:
    return False, f'cannot connect to the package index {host}:{port} ({e})'


def fetch_sep_data(cache_dir: str = _CACHE, timeout_s: float = 300.0) -> dict[str, str]:
  """Paths {name: path} of sep's data files, downloading the sdist once into `cache_dir`.

  Raises:
    RegistryUnreachable: no cached copy and the package index cannot be reached.
    RuntimeError: pip ran but did not produce the files (a real failure).
  """
  paths = {f: os.path.join(cache_dir, f) for f in FILES}
  if all(os.path.exists(p) for p in paths.values()):
    return paths
  ok, reason = registry_reachable()
  if not ok:
    raise RegistryUnreachable(reason)
  os.makedirs(cache_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='jaisp-sep-') as tmp:
    # --no-binary sep: the sdist (the wheels carry no data); build dependencies may be
    # wheels (':all:' would try to build numpy etc. from source, and fails).
    cmd = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--no-binary', 'sep',
           f'sep=={SEP_VERSION}', '-d', tmp, '--disable-pip-version-check', '-q']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    sdists = [f for f in os.listdir(tmp) if f.endswith('.tar.gz')]
    if proc.returncode != 0 or not sdists:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise RuntimeError(f'pip download sep=={SEP_VERSION} failed: {" | ".join(tail)}')
    with tarfile.open(os.path.join(tmp, sdists[0])) as tar:
      for member in tar.getmembers():
        name = os.path.basename(member.name)
        if member.isfile() and name in FILES and member.name.endswith(f'data/{name}'):
          data = tar.extractfile(member).read()
          part = paths[name] + f'.{os.getpid()}.tmp'
          with open(part, 'wb') as f:
            f.write(data)
          os.replace(part, paths[name])
  missing = [f for f, p in paths.items() if not os.path.exists(p)]
  if missing:
    raise RuntimeError(f'sep {SEP_VERSION} sdist has no data/{", data/".join(missing)}')
  return paths


def read_catalog(path: str) -> dict[str, np.ndarray]:
  """SExtractor ASCII_HEAD catalogue -> {column: array}; positions made 0-based.

  A vector column (e.g. FLUX_RADIUS(3), header numbers 18 then 21) spans several
  columns: its first element keeps the name, the others get NAME_2, NAME_3, ...
  """
  starts: list[tuple[int, str]] = []
  rows = []
  with open(path) as f:
    for line in f:
      if line.startswith('#'):
        parts = line.split()
        starts.append((int(parts[1]), parts[2]))
      elif line.strip():
        rows.append([float(v) for v in line.split()])
  data = np.asarray(rows, float).reshape(len(rows), -1)
  names = []
  for k, (col, name) in enumerate(starts):
    end = starts[k + 1][0] if k + 1 < len(starts) else data.shape[1] + 1
    names += [name] + [f'{name}_{e}' for e in range(2, end - col + 1)]
  cat = {name: data[:, k] for k, name in enumerate(names[:data.shape[1]])}
  for key in ('X_IMAGE', 'Y_IMAGE', 'XWIN_IMAGE', 'YWIN_IMAGE'):
    if key in cat:
      cat[key] = cat[key] - 1.0  # FITS 1-based pixel centres -> numpy 0-based
  return cat


def load_field(paths: dict[str, str]) -> dict[str, np.ndarray]:
  """{'image' (raw), 'rms', 'back', 'catalog'} of the sep test field (float32 images)."""
  from astropy.io import fits  # pylint: disable=g-import-not-at-top
  import warnings  # pylint: disable=g-import-not-at-top
  out = {}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # non-standard ESO-LOG header cards
    for key in ('image', 'rms', 'back'):
      out[key] = np.asarray(fits.getdata(paths[f'{key}.fits']), np.float32)
  out['catalog'] = read_catalog(paths['image.cat'])
  return out


def _score(det_xy: np.ndarray, cat: dict, shape, cfg: RealDataConfig) -> dict[str, Any]:
  hgt, wid = shape
  inner = lambda x, y: ((x >= cfg.border_px) & (x <= wid - 1 - cfg.border_px)  # noqa: E731
                        & (y >= cfg.border_px) & (y <= hgt - 1 - cfg.border_px))
  det_xy = np.asarray(det_xy, float).reshape(-1, 2)
  det_xy = det_xy[inner(det_xy[:, 0], det_xy[:, 1])]
  cx, cy = cat['X_IMAGE'], cat['Y_IMAGE']
  keep = inner(cx, cy)
  snr = cat['FLUX_AUTO'] / np.maximum(cat['FLUXERR_AUTO'], 1e-12)
  dm, tm = detection.match(det_xy, np.stack([cx[keep], cy[keep]], 1), cfg.match_px)
  comp = {}
  for t in cfg.snr_thresholds:
    sel = snr[keep] > t
    comp[f'snr>{t:g}'] = float(np.mean(tm[sel] >= 0)) if sel.any() else float('nan')
  return {'completeness': comp, 'completeness_all': float(np.mean(tm >= 0)) if len(tm) else
          float('nan'), 'purity': float(np.mean(dm >= 0)) if len(dm) else float('nan'),
          'n_detections': int(len(dm)), 'n_catalog': int(keep.sum())}


def _infomap_scores(weights: np.ndarray, cat: dict, cfg: RealDataConfig) -> dict[str, float]:
  hgt, wid = weights.shape
  yy, xx = np.mgrid[:hgt, :wid]
  d = np.full(weights.shape, np.inf)
  for x, y in zip(cat['X_IMAGE'], cat['Y_IMAGE']):
    d = np.minimum(d, np.hypot(xx - x, yy - y))
  src = weights[d <= cfg.source_radius_px]
  sky = weights[d > cfg.sky_radius_px]
  # ROC AUC = P(weight of a source pixel > weight of a sky pixel), ties counting half
  # (the Mann-Whitney U statistic from average ranks).
  from scipy import stats  # pylint: disable=g-import-not-at-top
  ranks = stats.rankdata(np.concatenate([src, sky]))
  auc = (ranks[:src.size].sum() - src.size * (src.size + 1) / 2) / max(src.size * sky.size, 1)
  return {'mean_weight_sources': float(src.mean()), 'mean_weight_sky': float(sky.mean()),
          'auc': float(auc)}


def run(models: dict[str, Any], cfg: RealDataConfig = RealDataConfig(), heldout=None,
        detection_cfg: detection.DetectionConfig | None = None,
        paths: dict[str, str] | None = None,
        detectors: dict[str, detection.TokenDetector] | None = None) -> dict[str, Any]:
  """Figures on the real field (module docstring); `paths` from `fetch_sep_data`.

  The detection heads are `detectors[name]` where given (e.g. those the detection probe
  fitted on the probe-train chips), else fitted on all of `heldout`.

  Returns {'source', 'image_shape', 'n_catalog', 'sep': figures, 'models': {name:
  {'infomap': ..., 'head': ...}}} or {'skipped': reason} when the data is unavailable.
  """
  if paths is None:
    try:
      paths = fetch_sep_data(cfg.cache_dir, cfg.timeout_s)
    except RegistryUnreachable as e:
      return {'skipped': f'real image unavailable: {e}'}
  field = load_field(paths)
  import sep  # pylint: disable=g-import-not-at-top
  raw, rms, cat = field['image'], field['rms'], field['catalog']
  bkg = sep.Background(np.ascontiguousarray(raw, np.float64))
  image = (raw - bkg.back()).astype(np.float32)
  det = classical.detect(image, rms, thresh=cfg.sep_thresh, minarea=5)
  out: dict[str, Any] = {
      'source': f'sep {SEP_VERSION} sdist data/image.fits (ESO NTT/EMMI R band) vs data/image.cat',
      'image_shape': list(image.shape), 'n_catalog': int(len(cat['X_IMAGE'])),
      'sep': {**_score(np.stack([det['x'], det['y']], 1), cat, image.shape, cfg),
              'thresh_sigma': cfg.sep_thresh},
      'models': {}}
  noise_img = image / np.median(rms)
  noise_rms = rms / np.median(rms)
  for name, model in models.items():
    res = {}
    emb = features.Embedder(model, 1)(noise_img[None], noise_rms[None], cfg.band)
    if emb['weights'] is not None:
      res['infomap'] = _infomap_scores(emb['weights'][0], cat, cfg)
    detector = (detectors or {}).get(name)
    if detector is None and heldout is not None and heldout.truth is not None and (
        heldout.has_band(cfg.band)):
      dcfg = detection_cfg or detection.DetectionConfig()
      detector = detection.TokenDetector(model, cfg.band, dcfg).fit(heldout)
    if detector is not None:
      xy = detector.detect(noise_img[None], noise_rms[None])[0]
      res['head'] = {**_score(xy, cat, image.shape, cfg), 'threshold': detector.threshold}
    out['models'][name] = res
  return out
