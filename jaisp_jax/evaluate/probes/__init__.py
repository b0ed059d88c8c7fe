"""Downstream probes of frozen representations, scored against the simulator's truth.

    from jaisp_jax import inference
    from jaisp_jax.evaluate import heldout, probes
    data = heldout.load_heldout(config, max_chips=32)
    models = {'trained': inference.load(export_dir),
              'init': inference.from_params(inference.init_params(config), config)}
    report = probes.run_probes(models, data)          # JSON-serialisable dict

Every probe reports each model's figures next to classical baselines that need no
learning, and next to the same head trained on shuffled labels (chance control); pass
the trained model and the same architecture at initialisation to get the untrained
figures beside the trained ones. Heads are small (linear / 2-layer MLP, optax, seconds
on CPU), seeds fixed, probe-train and probe-test chips split by sky region.

Probes (definitions of every number in each module's docstring):
  astrometry  sub-pixel offsets between bands (mas): head, registration in feature
              space, shift sensitivity; vs windowed centroids, cross-correlation, zero.
  detection   completeness / purity at S/N > 5, 10 within 0.5": heat-map head (DETR
              objectness for detr_jepa) vs sep and random positions.
  photometry  colour between two bands (mag scatter): head vs aperture photometry and
              the median colour.
  realdata    sep's real ground-based field vs its SExtractor catalogue: sep, each
              model's information map, and its detection head trained on simulations.

Schema of `run_probes` (version in 'schema'; NaN / inf become None):

  {'schema': 'jaisp_jax.evaluate.probes/1',
   'models': [model names],
   'heldout': {'source', 'n_chips', 'has_truth', 'pixel_unit', 'notes'},
   'skipped': {probe: reason},                  # probes not run (e.g. no truth)
   'seconds': {probe: wall seconds},
   'astrometry': {'config', 'baselines': {'chip_level', 'tile_level' (the chips of a
                    tile share its offset): {'zero', 'centroid', 'xcorr': stats},
                    'per_source': {'zero', 'centroid': binned}, 'pixels_shift_
                    sensitivity', 'truth_offsets_mas', 'centroid_error_scale', 'n_*'
                    (incl. n_tile_estimates), 'bands', 'reference_band'},
                  'models': {name: {'chip_level', 'tile_level': {'head', 'head_shuffled',
                    'register': stats}, 'per_source': {'head', 'head_shuffled': binned},
                    'head_fit': {'best_step' (0 = early stopping kept the untrained,
                    constant head), 'prediction_std_mas', ...}, 'shift_sensitivity',
                    'n_train_examples'}}},
       centroid stats also carry 'formal_rms_mas' (the noise floor of the estimate);
       stats = {'rms_mas', 'median_mas', 'n', 'n_failed'};
       binned = {'all': stats, 'isolated': stats, 'snr_bins': [{'snr_lo', 'snr_hi',
                 **stats}]};
       shift sensitivity = {'shifts_mas', 'cosine', 'drop_at_100mas', 'bands': {band:
                 {'cosine', 'drop_at_100mas'}}}
   'detection': {'config', 'baselines': {band: {'sep', 'random': det}},
                 'models': {name: {band: {'head', 'head_shuffled'[, 'objectness']: det}}}},
       det = {'completeness': {'snr>5', 'snr>10'}, 'purity', 'f1', 'n_detections',
              'n_true': {...}, 'threshold' (heads) | 'threshold_sigma' (sep) |
              'density' (random)}
   'photometry': {'config', 'baselines': {'a-b': {'median', 'aperture': phot, 'n_train',
                  'truth_colour_std'}}, 'models': {name: {'a-b': {'head', 'head_shuffled':
                  phot}}}},
       phot = {'scatter_mag', 'rms_mag', 'bias_mag', 'n', 'n_failed'}
   'realdata': {'config', 'source', 'image_shape', 'n_catalog', 'sep': det_real,
                'models': {name: {'infomap': {'mean_weight_sources', 'mean_weight_sky',
                'auc'}, 'head': det_real}}} or {'skipped': reason}}
       det_real = {'completeness': {'snr>5', 'snr>10'}, 'completeness_all', 'purity',
                   'n_detections', 'n_catalog'}
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Mapping

import numpy as np

from jaisp_jax.evaluate import heldout as heldout_lib
from jaisp_jax.evaluate.probes import astrometry
from jaisp_jax.evaluate.probes import detection
from jaisp_jax.evaluate.probes import photometry
from jaisp_jax.evaluate.probes import realdata

SCHEMA = 'jaisp_jax.evaluate.probes/1'
PROBES = ('astrometry', 'detection', 'photometry', 'realdata')


@dataclasses.dataclass(frozen=True)
class ProbesConfig:
  """Which probes run, and each probe's settings."""
  probes: tuple[str, ...] = PROBES
  astrometry: astrometry.AstrometryConfig = astrometry.AstrometryConfig()
  detection: detection.DetectionConfig = detection.DetectionConfig()
  photometry: photometry.PhotometryConfig = photometry.PhotometryConfig()
  realdata: realdata.RealDataConfig = realdata.RealDataConfig()

  @classmethod
  def from_dict(cls, overrides: Mapping[str, Any] | None = None) -> 'ProbesConfig':
    """Defaults with nested overrides, e.g. {'astrometry': {'bands': ['rubin_g']}}."""
    return _replace(cls(), overrides or {})


def _replace(obj, overrides: Mapping[str, Any]):
  changes = {}
  for key, value in overrides.items():
    if not any(f.name == key for f in dataclasses.fields(obj)):
      raise ValueError(f'{type(obj).__name__} has no field {key!r}; fields: '
                       f'{", ".join(f.name for f in dataclasses.fields(obj))}')
    current = getattr(obj, key)
    if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
      changes[key] = _replace(current, value)
    elif isinstance(current, tuple) and not isinstance(value, str):
      changes[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    else:
      changes[key] = value
  return dataclasses.replace(obj, **changes)


def to_json(obj: Any) -> Any:
  """numpy scalars / arrays, tuples and dataclasses -> JSON types; NaN and inf -> None."""
  if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
    return to_json(dataclasses.asdict(obj))
  if isinstance(obj, Mapping):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_json(obj.tolist())
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def run_probes(models: Mapping[str, Any], heldout: heldout_lib.HeldOut,
               cfg: ProbesConfig | None = None, log=lambda s: None) -> dict[str, Any]:
  """Runs every applicable probe for every model plus the baselines (schema: module doc).

  Args:
    models: {name: object with get_representation(image, rms, band)}, e.g.
      {'trained': inference.load(X), 'init': inference.from_params(...)}.
    heldout: `jaisp_jax.evaluate.heldout.HeldOut` (with or without truth).
    cfg: `ProbesConfig` (default: every probe with its defaults).
    log: called with one line per finished part (progress).
  """
  cfg = cfg or ProbesConfig()
  unknown = set(cfg.probes) - set(PROBES)
  if unknown:
    raise ValueError(f'unknown probe(s) {sorted(unknown)}; known: {PROBES}')
  out: dict[str, Any] = {
      'schema': SCHEMA, 'models': list(models),
      'heldout': {'source': heldout.source, 'n_chips': heldout.n_chips,
                  'has_truth': heldout.truth is not None, 'pixel_unit': heldout.pixel_unit,
                  'notes': list(heldout.notes)},
      'skipped': {}, 'seconds': {}}
  no_truth = 'held-out data has no truth catalogue' + (
      f' ({heldout.notes[0]})' if heldout.notes else '')

  def timed(name, fn):
    t0 = time.time()
    result = fn()
    out['seconds'][name] = round(time.time() - t0, 2)
    log(f'probes: {name} done in {out["seconds"][name]:.1f} s')
    return result

  if 'astrometry' in cfg.probes:
    c = cfg.astrometry
    res = {'config': c, 'models': {}}
    if heldout.truth is None:
      out['skipped']['astrometry'] = no_truth + '; only the shift sensitivity (needs no truth) ran'
      res['baselines'] = {'pixels_shift_sensitivity': timed(
          'astrometry/pixels', lambda: astrometry.shift_sensitivity(None, heldout, c))}
      for name, model in models.items():
        res['models'][name] = {'shift_sensitivity': timed(
            f'astrometry/{name}', lambda m=model: astrometry.shift_sensitivity(m, heldout, c))}
    else:
      _, test = heldout.split(c.train_fraction, c.split_seed)
      res['baselines'] = timed('astrometry/baselines', lambda: astrometry.baselines(heldout, c))
      res['baselines']['pixels_shift_sensitivity'] = astrometry.shift_sensitivity(None, test, c)
      for name, model in models.items():
        res['models'][name] = timed(f'astrometry/{name}',
                                    lambda m=model: astrometry.run(m, heldout, c))
    out['astrometry'] = res

  detectors = {name: {} for name in models}  # detection heads, reused on the real image
  for probe, module, c in (('detection', detection, cfg.detection),
                           ('photometry', photometry, cfg.photometry)):
    if probe not in cfg.probes:
      continue
    if heldout.truth is None:
      out['skipped'][probe] = no_truth
      continue
    res = {'config': c, 'baselines': timed(f'{probe}/baselines',
                                           lambda m=module, c=c: m.baselines(heldout, c)),
           'models': {}}
    for name, model in models.items():
      if probe == 'detection':
        fn = lambda m=model, n=name: detection.run(m, heldout, c, detectors[n])  # noqa: E731
      else:
        fn = lambda m=model: photometry.run(m, heldout, c)  # noqa: E731
      res['models'][name] = timed(f'{probe}/{name}', fn)
    out[probe] = res

  if 'realdata' in cfg.probes:
    band = cfg.realdata.band
    res = timed('realdata', lambda: realdata.run(
        models, cfg.realdata, heldout if heldout.truth is not None else None, cfg.detection,
        detectors={n: d[band] for n, d in detectors.items() if band in d}))
    if 'skipped' in res:
      out['skipped']['realdata'] = res['skipped']
    else:
      out['realdata'] = {'config': cfg.realdata, **res}
  return to_json(out)
