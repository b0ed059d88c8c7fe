"""Detection probe: where are the sources, from frozen tokens, against sep and truth.

Detectors (all applied to the same probe-test chips of one band, noise units):

  sep           classical: sep.extract (SExtractor's algorithm: 3x3 pyramid filter,
                threshold in sigma, minarea 5, deblending), no background subtraction
                (simulated images are sky-subtracted). The threshold (sigma) is chosen
                among `sep_thresholds` to maximise F1 on the probe-train chips.
  random        chance: uniformly random positions, `density` x as many per chip as
                the chip has true sources with S/N >= 5, the density (among
                `random_densities`) chosen by F1 on the probe-train chips, like every
                other detector's threshold.
  head          learned: a 2-layer MLP on each frozen token (with `context` rings of
                neighbours; each reduced to its first `pca_dim` principal components,
                fitted on the training tokens) predicts, for each of `cells` x `cells` cells of
                the token (1.6" for 3.2" tokens and cells=2), whether a source centre
                lies in the cell (a logit) and where (offset from the cell centre), as
                in CenterNet / YOLO. Targets: the brightest true centre (S/N >=
                `label_snr`) of each cell; loss: class-weighted binary cross-entropy
                plus squared offset error on occupied cells. Trained on the probe-train
                chips and their rotations / mirrors (re-embedded). Detections: cells
                with probability above a threshold (chosen by F1 on the probe-train
                chips), at cell centre + offset, closer pairs than `nms_arcsec` merged.
  head_shuffled the same head trained with its token labels permuted (chance control).
  objectness    detr_jepa only (the representation has 'objects'), no training: slots
                with objectness above a threshold (chosen by F1 on probe-train chips)
                placed at the attention-weighted mean of token centres (a token is
                3.2", so expect poor positions).

Scoring against truth: detections and true sources (S/N >= `purity_snr` in the band,
including sources just outside the chip whose light spills in) are matched one-to-one,
nearest pairs first, within `match_arcsec`. ``completeness['snr>T']`` = matched true
sources inside the chip with S/N > T / all such sources (S/N: `Truth.snr`, matched
filter). ``purity`` = matched detections / all detections. ``f1`` uses completeness at
S/N > 5.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate.probes import classical
from jaisp_jax.evaluate.probes import features
from jaisp_jax.evaluate.probes import heads


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
  """Detection probe settings (module docstring)."""
  bands: tuple[str, ...] = ('rubin_r', 'euclid_vis')
  snr_thresholds: tuple[float, ...] = (5.0, 10.0)
  match_arcsec: float = 0.5
  label_snr: float = 5.0        # head training positives: true centres with S/N >= this
  purity_snr: float = 2.0       # a detection matching a true source of S/N >= this is real
  cells: int = 2                # detection cells per token side (one source each)
  context: int = 0              # neighbour tokens on each side fed to the head (1 = 3x3;
  #                               overfits on a few chips)
  pca_dim: int = 32             # tokens reduced to this many principal components first
  head: heads.HeadConfig = heads.HeadConfig(hidden=64, steps=300, weight_decay=1e-3)
  nms_arcsec: float = 0.4       # detections closer than this are merged (highest kept)
  offset_weight: float = 10.0   # weight of the offset error (cell units) in the loss
  augment: int = 8              # rotations / mirrors of the train chips (1..8), re-embedded
  max_pos_weight: float = 20.0  # positive-class weight of the loss, at most this
  head_thresholds: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
  sep_thresholds: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0)
  random_densities: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
  train_fraction: float = 0.5
  split_seed: int = 0
  batch_size: int = 32
  seed: int = 0


# -- matching and scoring --------------------------------------------------------------


def match(det_xy: np.ndarray, true_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
  """Greedy one-to-one matching, nearest pairs first, within `radius`.

  Returns (det_match (n_det,) index of the matched true source or -1,
  true_match (n_true,) index of the matched detection or -1).
  """
  det_xy = np.asarray(det_xy, float).reshape(-1, 2)
  true_xy = np.asarray(true_xy, float).reshape(-1, 2)
  dm = np.full(len(det_xy), -1)
  tm = np.full(len(true_xy), -1)
  if len(det_xy) == 0 or len(true_xy) == 0:
    return dm, tm
  d = np.hypot(det_xy[:, None, 0] - true_xy[None, :, 0], det_xy[:, None, 1] - true_xy[None, :, 1])
  cand = np.argwhere(d <= radius)
  for i, j in cand[np.argsort(d[cand[:, 0], cand[:, 1]], kind='stable')]:
    if dm[i] < 0 and tm[j] < 0:
      dm[i], tm[j] = j, i
  return dm, tm


def score(dets: list[np.ndarray], heldout: heldout_lib.HeldOut, band: str,
          cfg: DetectionConfig) -> dict[str, Any]:
  """Completeness / purity of per-chip detections [(K_k, 2) pixel (x, y)] vs truth."""
  tr = heldout.truth
  b = heldout.band_index(band)
  radius = cfg.match_arcsec / heldout.pixel_scale(band)
  n_det = n_pure = 0
  found = {t: 0 for t in cfg.snr_thresholds}
  total = {t: 0 for t in cfg.snr_thresholds}
  for k in range(heldout.n_chips):
    if not heldout.band_valid[k, b]:
      continue
    rows = np.flatnonzero((tr.chip == k) & (tr.snr[:, b] >= cfg.purity_snr))
    xy = np.stack([tr.x[rows, b], tr.y[rows, b]], axis=1)
    dm, tm = match(dets[k], xy, radius)
    n_det += len(dm)
    n_pure += int(np.sum(dm >= 0))
    for t in cfg.snr_thresholds:
      sel = tr.in_chip[rows] & (tr.snr[rows, b] > t)
      total[t] += int(sel.sum())
      found[t] += int(np.sum(tm[sel] >= 0))
  comp = {f'snr>{t:g}': (found[t] / total[t] if total[t] else float('nan'))
          for t in cfg.snr_thresholds}
  purity = n_pure / n_det if n_det else float('nan')
  c5 = comp[f'snr>{cfg.snr_thresholds[0]:g}']
  f1 = 2 * c5 * purity / (c5 + purity) if n_det and c5 + purity > 0 else 0.0
  return {'completeness': comp, 'purity': purity, 'f1': f1, 'n_detections': n_det,
          'n_true': {f'snr>{t:g}': total[t] for t in cfg.snr_thresholds}}


def _choose(candidates: dict, train: heldout_lib.HeldOut, band: str, cfg: DetectionConfig):
  """The key of {threshold: detections on train} with the best F1 on the train chips."""
  f1 = {t: score(d, train, band, cfg)['f1'] for t, d in candidates.items()}
  return max(f1, key=lambda t: (f1[t], -abs(t)))


# -- classical and chance ----------------------------------------------------------------


def sep_detections(heldout: heldout_lib.HeldOut, band: str, thresh: float,
                   subtract_background: bool = False) -> list[np.ndarray]:
  """Per-chip (K, 2) sep detections (x, y) in pixels of the band."""
  image, rms, mask = heldout.view(band, 'noise')
  out = []
  for k in range(heldout.n_chips):
    d = classical.detect(image[k], rms[k], mask[k], thresh=thresh,
                         subtract_background=subtract_background)
    out.append(np.stack([d['x'], d['y']], axis=1))
  return out


def random_detections(heldout: heldout_lib.HeldOut, band: str, density: float,
                      seed: int = 0) -> list[np.ndarray]:
  """Uniform random positions, `density` x the chip's true sources with S/N >= 5."""
  rng = np.random.default_rng(seed)
  tr = heldout.truth
  b = heldout.band_index(band)
  hgt, wid = heldout.view(band, 'physical')[0].shape[-2:]
  out = []
  for k in range(heldout.n_chips):
    n = int(round(density * np.sum((tr.chip == k) & tr.in_chip & (tr.snr[:, b] >= 5.0))))
    out.append(np.stack([rng.uniform(-0.5, wid - 0.5, n), rng.uniform(-0.5, hgt - 0.5, n)], 1))
  return out


def baselines(heldout: heldout_lib.HeldOut, cfg: DetectionConfig = DetectionConfig()
              ) -> dict[str, Any]:
  """{band: {'sep': figures (+ 'threshold_sigma'), 'random': figures}} on probe-test chips."""
  train, test = heldout.split(cfg.train_fraction, cfg.split_seed)
  out = {}
  for band in cfg.bands:
    if not heldout.has_band(band):
      continue
    t = _choose({s: sep_detections(train, band, s) for s in cfg.sep_thresholds}, train, band, cfg)
    d = _choose({m: random_detections(train, band, m, cfg.seed) for m in cfg.random_densities},
                train, band, cfg)
    out[band] = {'sep': {**score(sep_detections(test, band, t), test, band, cfg),
                         'threshold_sigma': float(t)},
                 'random': {**score(random_detections(test, band, d, cfg.seed), test, band, cfg),
                            'density': float(d)}}
  return out


# -- learned head: objectness + offset per cell -----------------------------------------


def dihedral(x: np.ndarray, t: int) -> np.ndarray:
  """The t-th (0..7) rotation / mirror of the last two (square) axes."""
  x = np.rot90(x, t % 4, axes=(-2, -1))
  return np.ascontiguousarray(x[..., ::-1] if t >= 4 else x)


def dihedral_xy(x: np.ndarray, y: np.ndarray, t: int, size: int):
  """Pixel positions (x, y) in an image of side `size` after `dihedral(image, t)`."""
  x, y = np.asarray(x, float), np.asarray(y, float)
  for _ in range(t % 4):  # np.rot90: new[i, j] = old[j, n - 1 - i]
    x, y = y, size - 1 - x
  if t >= 4:
    x = size - 1 - x
  return x, y


def cell_targets(heldout: heldout_lib.HeldOut, band: str, grid_hw: tuple[int, int],
                 stride: float, cfg: 'DetectionConfig', t: int = 0) -> np.ndarray:
  """(n, h, w, 3 c^2) targets per token: [occupied (c^2), dx (c^2), dy (c^2)] of its
  c x c cells, offsets of the brightest true centre (S/N >= label_snr) from the cell
  centre in cell units; positions taken through `dihedral_xy(.., t)`."""
  tr = heldout.truth
  b = heldout.band_index(band)
  h, w = grid_hw
  c = cfg.cells
  cell = stride / c
  size = heldout.view(band, 'physical')[0].shape[-1]
  occ = np.zeros((heldout.n_chips, h * c, w * c), np.float32)
  off = np.zeros((2,) + occ.shape, np.float32)
  best = np.zeros(occ.shape)
  sel = np.flatnonzero(tr.in_chip & (tr.snr[:, b] >= cfg.label_snr)
                       & heldout.band_valid[tr.chip, b])
  x, y = dihedral_xy(tr.x[sel, b], tr.y[sel, b], t, size)
  jx, iy = np.floor((x + 0.5) / cell).astype(int), np.floor((y + 0.5) / cell).astype(int)
  for s, k, i, j, xx, yy in zip(sel, tr.chip[sel], iy, jx, x, y):
    if 0 <= i < h * c and 0 <= j < w * c and tr.snr[s, b] > best[k, i, j]:
      best[k, i, j] = tr.snr[s, b]
      occ[k, i, j] = 1.0
      off[0, k, i, j] = (xx + 0.5) / cell - (j + 0.5)
      off[1, k, i, j] = (yy + 0.5) / cell - (i + 0.5)
  maps = np.stack([occ, off[0], off[1]], axis=1)  # (n, 3, H c, W c)
  n = heldout.n_chips
  tok = maps.reshape(n, 3, h, c, w, c).transpose(0, 2, 4, 1, 3, 5)  # (n, h, w, 3, c, c)
  return tok.reshape(n, h, w, 3 * c * c)


def detection_loss(pred, target, pos_weight, offset_weight):
  """Loss on (prediction, target) (T, 3 n_cells) (a `heads` loss): class-weighted BCE on
  the occupancy logits + offset_weight x squared offset error on occupied cells."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n_cells = target.shape[1] // 3
  occ = target[:, :n_cells]
  err = jnp.square(pred[:, n_cells:] - target[:, n_cells:])  # (T, 2 n_cells)
  occ2 = jnp.concatenate([occ, occ], axis=1)
  reg = jnp.sum(err * occ2) / jnp.maximum(jnp.sum(occ2), 1.0)
  return heads.weighted_bce(pred[:, :n_cells], occ, pos_weight) + offset_weight * reg


def nms(xy: np.ndarray, score: np.ndarray, radius: float) -> np.ndarray:
  """Indices kept by greedy non-maximum suppression (highest score first)."""
  order = np.argsort(-score, kind='stable')
  keep = []
  for i in order:
    if all(np.hypot(*(xy[i] - xy[j])) > radius for j in keep):
      keep.append(i)
  return np.asarray(keep, int)


class TokenDetector:
  """A fitted objectness + offset head on one model's tokens of one band (module doc)."""

  def __init__(self, model: Any, band: str, cfg: 'DetectionConfig' = None):
    self.cfg = cfg or DetectionConfig()
    self.embed = features.Embedder(model, self.cfg.batch_size)
    self.band = band
    self.head = None
    self.pca = None
    self.threshold = 0.5
    self.stride = None
    self.pixel_scale = None

  def _tokens(self, image, rms):
    emb = self.embed(image, rms, self.band)
    self.stride = emb['stride']
    return emb['tokens']  # (n, h, w, D)

  def _inputs(self, tokens):
    """Tokens reduced to `pca_dim` principal components, each with its neighbours."""
    return features.neighbourhood(self.pca(tokens), self.cfg.context)  # (n, h, w, 9 p)

  def training_set(self, train: heldout_lib.HeldOut) -> dict[str, Any]:
    """Head inputs and targets of `train` and its `augment` rotations / mirrors
    (re-embedded): {'x' (T, 9p), 'y' (T, 3 c^2), 'groups' (T,) chip, 'plain'
    (n, h, w, 9p) unaugmented, 'pca', 'stride'}; fits the PCA of the training tokens."""
    image, rms, _ = train.view(self.band, 'noise')
    toks = [self._tokens(dihedral(image, t), dihedral(rms, t))
            for t in range(max(1, self.cfg.augment))]
    self.pca = features.Pca(np.concatenate(toks), self.cfg.pca_dim)
    n, h, w, _ = toks[0].shape
    xs, ys, gs = [], [], []
    for t, tok in enumerate(toks):
      xs.append(self._inputs(tok).reshape(n * h * w, -1))
      ys.append(cell_targets(train, self.band, (h, w), self.stride, self.cfg, t).reshape(
          n * h * w, -1))
      gs.append(np.repeat(np.arange(n), h * w))
    return {'x': np.concatenate(xs), 'y': np.concatenate(ys), 'groups': np.concatenate(gs),
            'plain': self._inputs(toks[0]), 'pca': self.pca, 'stride': self.stride}

  def fit(self, train: heldout_lib.HeldOut, shuffle_labels: bool = False,
          train_set: dict[str, Any] | None = None) -> 'TokenDetector':
    """Trains the head on `train` (`training_set`, computed if not given) and picks the
    threshold with the best F1 on the unaugmented train chips."""
    ts = train_set if train_set is not None else self.training_set(train)
    self.pca, self.stride = ts['pca'], ts['stride']
    self.pixel_scale = train.pixel_scale(self.band)
    n_cells = self.cfg.cells ** 2
    y = ts['y']
    pos = max(float(y[:, :n_cells].mean()), 1e-6)
    pos_weight = float(np.clip((1 - pos) / pos, 1.0, self.cfg.max_pos_weight))
    self.head = heads.fit(ts['x'], y, self.cfg.head, loss=detection_loss,
                          loss_args=(pos_weight, self.cfg.offset_weight), standardise_y=False,
                          shuffle_labels=shuffle_labels, groups=ts['groups'])
    cands = {t: self._detect(ts['plain'], t) for t in self.cfg.head_thresholds}
    self.threshold = _choose(cands, train, self.band, self.cfg)
    return self

  def _outputs(self, inputs: np.ndarray):
    """(prob (n, h, w, c, c), x, y (n, h, w, c, c) pixel positions) of head inputs."""
    n, h, w, d = inputs.shape
    c = self.cfg.cells
    out = self.head.predict(inputs.reshape(-1, d)).reshape(n, h, w, 3, c, c)
    prob = 1.0 / (1.0 + np.exp(-out[:, :, :, 0]))
    cell = self.stride / c
    gy = (np.arange(h)[:, None] * c + np.arange(c)[None, :])  # (h, c) cell row index
    gx = (np.arange(w)[:, None] * c + np.arange(c)[None, :])  # (w, c)
    dx = np.clip(out[:, :, :, 1], -0.5, 0.5)
    dy = np.clip(out[:, :, :, 2], -0.5, 0.5)
    x = (gx[None, None, :, None, :] + 0.5 + dx) * cell - 0.5
    y = (gy[None, :, None, :, None] + 0.5 + dy) * cell - 0.5
    return prob, x, y

  def _detect(self, inputs: np.ndarray, threshold: float) -> list[np.ndarray]:
    prob, x, y = self._outputs(inputs)
    radius = self.cfg.nms_arcsec / (self.pixel_scale or 1.0)
    out = []
    for k in range(prob.shape[0]):
      sel = prob[k] >= threshold
      xy = np.stack([x[k][sel], y[k][sel]], axis=1)
      out.append(xy[nms(xy, prob[k][sel], radius)] if len(xy) else xy)
    return out

  def probability(self, image: np.ndarray, rms: np.ndarray) -> np.ndarray:
    """(n, h, w, c, c) probability that a source centre lies in each cell of each token."""
    return self._outputs(self._inputs(self._tokens(image, rms)))[0]

  def detect(self, image: np.ndarray, rms: np.ndarray) -> list[np.ndarray]:
    """Per-view (K, 2) pixel positions of detections in views (n, H, W)."""
    return self._detect(self._inputs(self._tokens(image, rms)), self.threshold)


def objectness_detections(emb: dict, threshold: float) -> list[np.ndarray]:
  """Slots with objectness >= threshold at the attention-weighted mean token centre."""
  obj = emb['objects']
  n, h, w, _ = emb['tokens'].shape
  s = emb['stride']
  cy, cx = np.meshgrid((np.arange(h) + 0.5) * s - 0.5, (np.arange(w) + 0.5) * s - 0.5,
                       indexing='ij')
  attn = obj['attn'] / np.maximum(obj['attn'].sum(axis=-1, keepdims=True), 1e-12)  # (n, Q, N)
  x = attn @ cx.ravel()
  y = attn @ cy.ravel()
  keep = obj['objectness'] >= threshold
  return [np.stack([x[k][keep[k]], y[k][keep[k]]], axis=1) for k in range(n)]


def run(model: Any, heldout: heldout_lib.HeldOut, cfg: DetectionConfig = DetectionConfig(),
        detectors: dict[str, 'TokenDetector'] | None = None) -> dict[str, Any]:
  """{band: {'head', 'head_shuffled'[, 'objectness']: figures}} on the probe-test chips.

  `detectors`, if given, receives the fitted heads {band: TokenDetector} (e.g. for the
  real-image evaluation).
  """
  train, test = heldout.split(cfg.train_fraction, cfg.split_seed)
  out = {}
  for band in cfg.bands:
    if not heldout.has_band(band):
      continue
    res = {}
    image, rms, _ = test.view(band, 'noise')
    train_set = TokenDetector(model, band, cfg).training_set(train)
    for name, shuffle in (('head', False), ('head_shuffled', True)):
      det = TokenDetector(model, band, cfg).fit(train, shuffle, train_set)
      res[name] = {**score(det.detect(image, rms), test, band, cfg),
                   'threshold': float(det.threshold)}
      if name == 'head' and detectors is not None:
        detectors[band] = det
    emb = features.Embedder(model, cfg.batch_size)(image, rms, band)
    if emb['objects'] is not None:
      tr_img, tr_rms, _ = train.view(band, 'noise')
      tr_emb = features.Embedder(model, cfg.batch_size)(tr_img, tr_rms, band)
      qs = np.quantile(tr_emb['objects']['objectness'], np.linspace(0.05, 0.95, 10))
      t = _choose({float(q): objectness_detections(tr_emb, q) for q in qs}, train, band, cfg)
      res['objectness'] = {**score(objectness_detections(emb, t), test, band, cfg),
                           'threshold': float(t)}
    out[band] = res
  return out
