"""report.json of the evaluation suite: schema, headline table, summary, JSON output.

Schema version 1 (keys always present; a figure that cannot be computed is null,
never NaN; models are 'trained' (the checkpoint's EMA parameters), 'init' (the same
architecture at initialisation) and 'classical' (pixels, no learning)):

  schema_version  1
  run             {workdir, variant, step, seed, embed_dim}
  data            {split ('validation'...: the TFDS split; 'fresh simulated field':
                   on-the-fly configs; 'given': chips passed to evaluate), n_chips,
                   has_truth, n_sources, source, bands, query_band, gallery_band,
                   crop_px: {instrument: px}}
  models          {trained, init, classical: one-line descriptions}
  diagnostics     {model: {token_similarity, token_similarity_unweighted,
                   token_similarity_shuffled, var_loss, var_min, var_mean, effective_dim,
                   rankme, embed_dim, n, per_band: {band: {var_loss, var_min, var_mean,
                   effective_dim, rankme, embed_dim, n, collapsed}}, n_collapsed_bands,
                   cross_band: {bands, matrix, contrast, mean_contrast},
                   activation_weight: {pearson, spearman, pearson_centred,
                   spearman_centred, n_tokens}}}
  retrieval       {query_band, gallery_band, n, chance_top1, chance_top5,
                   models: {model: {global: {top1, top5}, tokens: {top1, top5}} | null
                   (null: fewer than two chips have both bands)},
                   band_pairs: {model: {'<q>-><g>': global top1}}}
  embeddings      {method ('umap' | 'pca'), band, properties: [names],
                   global: {model: spearman table}, sources: {model: table} | null,
                   comparison: {models, cka, profile_cosine}}
                   (spearman table = embeddings.spearman_table's dict)
  probes          {status: 'ok' | 'skipped', note (what was skipped and why), results:
                   probes.run_probes' dict (its own schema, 'jaisp_jax.evaluate.probes/1')
                   | null}
  table           [{metric, trained, init, classical, chance, higher_is_better}]: every
                  headline figure in one flat list (what compare_objectives tabulates)
  plots           [file names in W/eval written by this evaluation]
  notes           [strings]: what was skipped or approximated, and why
  summary         [the lines printed at the end]
  report_path     where this file was written
  seconds         wall time of the evaluation
"""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np

SCHEMA_VERSION = 1
MODELS = ('trained', 'init', 'classical')


def _get(d, *path):
  for p in path:
    if d is None:
      return None
    d = d.get(p) if isinstance(d, Mapping) else None
  return d


def headline_table(report: dict) -> list[dict]:
  """Every headline figure as {metric, trained, init, classical, chance, higher_is_better}."""
  rows = []

  def add(metric, getter, chance=None, higher=True):
    vals = {m: getter(m) for m in MODELS}
    rows.append({'metric': metric, **vals, 'chance': chance, 'higher_is_better': higher})

  r = report['retrieval']
  for method in ('global', 'tokens'):
    for k in ('top1', 'top5'):
      add(f'retrieval.{method}.{k}', lambda m, a=method, b=k: _get(r, 'models', m, a, b),
          r[f'chance_{k}'])
  d = report['diagnostics']
  add('diag.token_similarity', lambda m: _get(d, m, 'token_similarity'), None, None)
  add('diag.token_similarity_gap', lambda m: None if _get(d, m, 'token_similarity') is None
      else d[m]['token_similarity'] - d[m]['token_similarity_shuffled'], 0.0)
  for k, higher in (('effective_dim', True), ('rankme', True), ('var_min', True),
                    ('var_loss', False)):
    add(f'diag.{k}', lambda m, k=k: _get(d, m, k), None, higher)
  add('diag.n_collapsed_bands', lambda m: _get(d, m, 'n_collapsed_bands'), None, False)
  add('diag.cross_band_contrast', lambda m: _get(d, m, 'cross_band', 'mean_contrast'), 0.0)
  add('diag.activation_weight_pearson', lambda m: _get(d, m, 'activation_weight', 'pearson'),
      0.0)
  add('diag.activation_weight_pearson_centred',
      lambda m: _get(d, m, 'activation_weight', 'pearson_centred'), 0.0)
  e = report['embeddings']
  for scope in ('global', 'sources'):
    for prop in e['properties'] if scope == 'global' else sorted(
        next(iter((e['sources'] or {}).values()), {'best': {}})['best']):
      # chance: the best |rho| of the trained embedding with the property shuffled.
      add(f'embed.{scope}.spearman.{prop}', lambda m, s=scope, p=prop: _get(e, s, m, 'best', p),
          _get(e, scope, 'trained', 'null', prop))
  rows.extend(probe_rows(report['probes'].get('results')))
  return rows


def _min_or_none(*values):
  vals = [v for v in values if v is not None]
  return min(vals) if vals else None


def probe_rows(results: Mapping | None) -> list[dict]:
  """Headline rows of `probes.run_probes`' results (its schema 'jaisp_jax.evaluate.probes/1').

  Columns as in `headline_table`: `classical` is the best classical baseline of the
  probe (windowed centroids or cross-correlation for astrometry, sep for detection,
  aperture photometry for colours, pixel tokens for shift sensitivity); `chance` the
  no-information estimate (zero offset, random positions, the median colour).
  """
  rows: list[dict] = []
  if not results:
    return rows

  def add(metric, getter, classical, chance, higher):
    rows.append({'metric': f'probe.{metric}', **{m: getter(m) for m in ('trained', 'init')},
                 'classical': classical, 'chance': chance, 'higher_is_better': higher})

  a = results.get('astrometry')
  if a:
    mods, base = a.get('models', {}), a.get('baselines', {})
    cl = _get(base, 'chip_level') or {}
    for est in ('head', 'register'):
      add(f'astrometry.{est}_rms_mas', lambda m, e=est: _get(mods, m, 'chip_level', e, 'rms_mas'),
          _min_or_none(_get(cl, 'centroid', 'rms_mas'), _get(cl, 'xcorr', 'rms_mas')),
          _get(cl, 'zero', 'rms_mas'), False)
    add('astrometry.head_shuffled_rms_mas',
        lambda m: _get(mods, m, 'chip_level', 'head_shuffled', 'rms_mas'), None,
        _get(cl, 'zero', 'rms_mas'), None)
    ps = _get(base, 'per_source') or {}
    add('astrometry.per_source_head_rms_mas',
        lambda m: _get(mods, m, 'per_source', 'head', 'all', 'rms_mas'),
        _get(ps, 'centroid', 'all', 'rms_mas'), _get(ps, 'zero', 'all', 'rms_mas'), False)
    add('astrometry.shift_drop_at_100mas',
        lambda m: _get(mods, m, 'shift_sensitivity', 'drop_at_100mas'),
        _get(base, 'pixels_shift_sensitivity', 'drop_at_100mas'), 0.0, True)
  d = results.get('detection')
  if d:
    mods, base = d.get('models', {}), d.get('baselines', {})
    for band in sorted(base):
      for key, path in (('completeness_snr>5', ('completeness', 'snr>5')),
                        ('completeness_snr>10', ('completeness', 'snr>10')),
                        ('purity', ('purity',)), ('f1', ('f1',))):
        add(f'detection.{band}.{key}', lambda m, b=band, p=path: _get(mods, m, b, 'head', *p),
            _get(base, band, 'sep', *path), _get(base, band, 'random', *path), True)
  p = results.get('photometry')
  if p:
    mods, base = p.get('models', {}), p.get('baselines', {})
    for pair in sorted(base):
      add(f'photometry.{pair}.scatter_mag',
          lambda m, q=pair: _get(mods, m, q, 'head', 'scatter_mag'),
          _get(base, pair, 'aperture', 'scatter_mag'), _get(base, pair, 'median', 'scatter_mag'),
          False)
  r = results.get('realdata')
  if r:
    mods = r.get('models', {})
    add('realdata.infomap_auc', lambda m: _get(mods, m, 'infomap', 'auc'), None, 0.5, True)
    for key, path in (('completeness_snr>5', ('completeness', 'snr>5')),
                      ('purity', ('purity',))):
      add(f'realdata.head_{key}', lambda m, q=path: _get(mods, m, 'head', *q),
          _get(r, 'sep', *path), None, True)
  return rows


def fmt(v) -> str:
  if v is None:
    return '-'
  if isinstance(v, bool):
    return str(v)
  if isinstance(v, int):
    return str(v)
  return f'{v:.3f}' if abs(v) < 100 else f'{v:.1f}'


_SUMMARY_METRICS = ('retrieval.global.top1', 'retrieval.tokens.top1', 'diag.token_similarity',
                    'diag.token_similarity_gap', 'diag.effective_dim', 'diag.rankme',
                    'diag.n_collapsed_bands', 'diag.cross_band_contrast',
                    'diag.activation_weight_pearson_centred')


_SUMMARY_PROBE_KEYS = ('astrometry.head_rms_mas', 'astrometry.register_rms_mas', 'shift_drop',
                       '.f1', 'scatter_mag', 'infomap_auc')


def beats(row: Mapping) -> str | None:
  """Which references the trained figure of a table row beats: e.g. 'init,chance'.

  '-' when it beats none; None for rows without a better direction.
  """
  higher = row['higher_is_better']
  trained = row['trained']
  if higher is None or trained is None:
    return None
  won = [name for name in ('init', 'classical', 'chance') if row[name] is not None and (
      trained > row[name] if higher else trained < row[name])]
  return ','.join(won) or '-'


def summary_lines(report: dict) -> list[str]:
  """The short summary printed at the end of `evaluate` (also stored in the report).

  One line per headline figure: trained, init, classical, chance, and which of the
  three references the trained figure beats (in the metric's better direction).
  """
  run, data = report['run'], report['data']
  lines = [f'evaluation of {run["variant"]} at step {run["step"]} on {data["n_chips"]} '
           f'held-out chips ({data["source"]}; truth: {"yes" if data["has_truth"] else "no"})',
           f'  {"":48s} {"trained":>9s} {"init":>9s} {"classical":>9s} {"chance":>8s}  '
           'trained beats']
  wanted = set(_SUMMARY_METRICS) | {
      row['metric'] for row in report['table'] if row['metric'].startswith('probe.') and
      any(k in row['metric'] for k in _SUMMARY_PROBE_KEYS)}
  for row in report['table']:
    if row['metric'] in wanted:
      lines.append(f'  {row["metric"]:48s} {fmt(row["trained"]):>9s} {fmt(row["init"]):>9s} '
                   f'{fmt(row["classical"]):>9s} {fmt(row["chance"]):>8s}  '
                   f'{beats(row) or ""}'.rstrip())
  if report['probes']['note']:
    lines.append(f'  probes: {report["probes"]["status"]} ({report["probes"]["note"]})')
  lines.append(f'  report: {report["report_path"]}')
  return lines


def clean(x):
  """JSON-safe copy: numpy scalars -> Python, NaN/inf -> None, tuples -> lists."""
  if isinstance(x, Mapping):
    return {str(k): clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  if isinstance(x, np.ndarray):
    return clean(x.tolist())
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (int, np.integer)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  return x


def write_json(path: str, obj: dict):
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True, allow_nan=False)
  os.replace(tmp, path)
