r"""`--mode=evaluate`: the evaluation suite of a trained workdir.

    python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir=runs/smoke --mode=evaluate

Takes the EMA (target) parameters of the latest checkpoint in `W/checkpoints` as the
frozen representation and evaluates it on held-out chips (`evaluate.heldout`: the TFDS
validation split, sky regions never seen in training, or for on-the-fly configs a
freshly simulated field), next to two references computed on the same chips:

  init       the same architecture at initialisation (same seed as the run);
  classical  pixels, no learning (`embeddings.PixelBaseline`).

Sections: collapse diagnostics (diagnostics.py), cross-instrument retrieval and
embedding analysis (embeddings.py), and the probes scored against truth
(`evaluate.probes`: astrometry, detection, photometry, sep's real field). Writes
`W/eval/report.json` (schema in report.py), PNG plots in `W/eval/`, the scalars and plots to
TensorBoard under `eval/` (step = checkpoint step) and prints a summary. Everything
is seeded; two runs on the same workdir give the same numbers.

`python -m jaisp_jax.evaluate.suite W` prints the summary of a stored W/eval/report.json.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax import inference
from jaisp_jax.cli import UserError, read_json
from jaisp_jax.evaluate import diagnostics
from jaisp_jax.evaluate import embeddings
from jaisp_jax.evaluate import plots
from jaisp_jax.evaluate import report as report_lib

SCHEMA_VERSION = report_lib.SCHEMA_VERSION
MODELS = report_lib.MODELS
_WEIGHT_CHIPS = 4     # chips whose pixel information maps are kept (overlay plot)


# -- inputs ------------------------------------------------------------------------


@dataclasses.dataclass
class HeldOutData:
  """Held-out chips as the suite uses them.

  Attributes:
    chips: {instrument: {'image', 'rms', 'mask': (N, n_bands, H, W), 'band_valid':
      (N, n_bands)}}, pixels in the batch contract's noise units.
    sources: per-source truth {'chip': (S,), 'x', 'y': (S, n_bands) pixel position in
      the chip of each band's instrument, property columns (S,)} or None (user data).
    chip_properties: {name: (N,)} per-chip values to colour global maps by.
    description: where the chips came from.
    notes: caveats to put in the report.
    raw: the loader's own object (handed to the probes), or None.
  """
  chips: dict
  sources: dict | None
  chip_properties: dict
  description: str
  notes: list
  raw: Any = None

  @property
  def n(self) -> int:
    return int(next(iter(self.chips.values()))['image'].shape[0])


def restore_ema_params(config: ml_collections.ConfigDict, workdir: str) -> tuple[int, Any]:
  """(step, EMA params) of the latest checkpoint in `workdir/checkpoints`."""
  from jaisp_jax.train import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  from jaisp_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  directory = os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(directory):
    raise UserError(f'{directory}: no checkpoints; train first (same command without '
                    f'--mode=evaluate)')
  ckpt = ckpt_lib.Checkpointer(workdir, save_every=1, keep=1_000_000, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f'{directory}: no finished checkpoint; train first')
    abstract, _ = trainer_lib.Trainer(config).abstract_state()
    state = ckpt.restore(abstract, None, step)
  finally:
    ckpt.close()
  return int(step), jax.device_get(state.ema_params)


def _pixel_properties(chips: dict, registry: bands_lib.BandRegistry, band: str) -> dict:
  """Per-chip image statistics, for colouring maps of data without truth."""
  inst, idx = registry[band].instrument, registry[band].index
  img = chips[inst]['image'][:, idx]
  mask = chips[inst]['mask'][:, idx] > 0
  pos = np.where(mask & (img > 3.0), img, 0.0)
  return {'log_snr_sum': np.log10(1.0 + pos.sum(axis=(1, 2))),
          'bright_fraction': np.mean(mask & (img > 3.0), axis=(1, 2))}


def load_heldout(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                 max_chips: int) -> HeldOutData:
  """Held-out chips of the config's data, with truth where it has some.

  `jaisp_jax.evaluate.heldout.load_heldout`: the TFDS validation split (sky regions
  never used in training; truth when the dataset was built with `build --simulate`),
  or, for on-the-fly configs, a freshly simulated field of another seed.
  """
  from jaisp_jax.evaluate import heldout  # pylint: disable=import-outside-toplevel
  h = heldout.load_heldout(config, registry, max_chips=max_chips)
  return from_heldout(h, config.eval.query_band)


def from_heldout(heldout, query_band: str, min_snr: float = 5.0) -> HeldOutData:
  """`HeldOutData` of a `jaisp_jax.evaluate.heldout.HeldOut` (read by attribute only).

  Pixels go to noise units (divided by the chip's median rms per band, as the input
  pipeline does). Per-source truth keeps the sources inside their chip detected at
  S/N >= `min_snr` in `query_band` (a token cannot describe what it cannot see), with
  properties mag (query band), colour (g - i where both exist), size (half-light
  radius, arcsec; 0 for stars), is_star and redshift.
  """
  reg = heldout.registry
  chips = {}
  for inst in heldout.instruments:
    scale = np.asarray(heldout.rms_scale[inst], np.float32)[:, :, None, None]
    ids = [reg.band_id(b.name) for b in reg.instrument_bands(inst)]
    chips[inst] = {'image': np.asarray(heldout.images[inst], np.float32) / scale,
                   'rms': np.asarray(heldout.rms[inst], np.float32) / scale,
                   'mask': np.asarray(heldout.mask[inst], np.float32),
                   'band_valid': np.asarray(heldout.band_valid)[:, ids]}
  props = _pixel_properties(chips, reg, query_band)
  sources = None
  t = heldout.truth
  if t is not None:
    q = reg.band_id(query_band)
    sel = np.asarray(t.in_chip, bool) & (np.asarray(t.snr)[:, q] >= min_snr) & np.isfinite(
        np.asarray(t.mag)[:, q])
    is_star = (np.asarray(t.type) == 'star')
    sources = {'chip': np.asarray(t.chip)[sel], 'x': np.asarray(t.x)[sel],
               'y': np.asarray(t.y)[sel], 'mag': np.asarray(t.mag)[sel, q]}
    if 'rubin_g' in reg and 'rubin_i' in reg:
      colour = t.colour(reg.band_id('rubin_g'), reg.band_id('rubin_i'))[sel]
      sources['colour'] = np.where(np.isfinite(colour), colour, np.nan)
    sources.update(size=np.asarray(t.size_arcsec)[sel], is_star=is_star[sel].astype(float),
                   redshift=np.asarray(t.redshift)[sel])
    n = heldout.n_chips
    chip_of = sources['chip']
    props['n_sources'] = np.bincount(chip_of, minlength=n).astype(float)
    brightest = np.full(n, np.nan)
    np.fmin.at(brightest, chip_of, sources['mag'])
    props['mag_brightest'] = brightest
    stars = np.bincount(chip_of, weights=sources['is_star'], minlength=n)
    props['star_fraction'] = np.where(props['n_sources'] > 0,
                                      stars / np.maximum(props['n_sources'], 1), np.nan)
  return HeldOutData(chips=chips, sources=sources, chip_properties=props,
                     description=heldout.source, notes=list(heldout.notes), raw=heldout)


def _init_params(config: ml_collections.ConfigDict):
  return _init_params_cached(config.to_json_best_effort(sort_keys=True))


@functools.lru_cache(maxsize=2)
def _init_params_cached(config_json: str):
  # Initialising compiles the whole model (seconds); evaluating the same config again
  # in one process (tests, compare_objectives' helper) reuses it.
  return inference.init_params(ml_collections.ConfigDict(json.loads(config_json)))


# -- embedding -----------------------------------------------------------------------


@dataclasses.dataclass
class Embedded:
  """One model's embeddings of every band of the held-out chips."""
  globals: dict     # band -> (N, D)
  tokens: dict      # band -> (N, T, D)
  token_weights: dict  # band -> (N, T)
  pixel_weights: dict  # band -> (k, H, W) of the first k chips
  grid: dict        # band -> (rows, cols) of the token grid


def embed_chips(rep, chips: dict, registry: bands_lib.BandRegistry, bands, *,
                batch_size: int = 32) -> Embedded:
  """Embeds every band of the chips with `rep` (anything with `get_representation`).

  The last batch is padded to `batch_size` so every call has the same shape (one
  compilation per instrument).
  """
  out = Embedded({}, {}, {}, {}, {})
  for band in bands:
    inst, idx = registry[band].instrument, registry[band].index
    image = chips[inst]['image'][:, idx:idx + 1]                        # (N, 1, H, W)
    rms = chips[inst]['rms'][:, idx:idx + 1] * (chips[inst]['mask'][:, idx:idx + 1] > 0)
    n = image.shape[0]
    parts = []
    for s in range(0, n, batch_size):
      img, sig = image[s:s + batch_size], rms[s:s + batch_size]
      pad = batch_size - img.shape[0] if n > batch_size else 0
      if pad:
        img = np.concatenate([img, np.repeat(img[-1:], pad, axis=0)])
        sig = np.concatenate([sig, np.repeat(sig[-1:], pad, axis=0)])
      r = rep.get_representation(img, sig, band)
      m = img.shape[0] - pad
      parts.append({k: np.asarray(r[k])[:m] for k in ('tokens', 'global', 'token_weights')})
      if s == 0:
        out.pixel_weights[band] = np.asarray(r['weights'])[:_WEIGHT_CHIPS, 0]
    out.globals[band] = np.concatenate([p['global'] for p in parts]).astype(np.float32)
    out.tokens[band] = np.concatenate([p['tokens'] for p in parts]).astype(np.float32)
    out.token_weights[band] = np.concatenate([p['token_weights'] for p in parts])
    stride = registry.stride(band, _token_arcsec(rep))
    out.grid[band] = (image.shape[2] // stride, image.shape[3] // stride)
  return out


def complete_instruments(chips: dict, registry: bands_lib.BandRegistry) -> list[str]:
  """Adds all-masked, invalid chips for instruments the data lacks; returns their names.

  Their bands then drop out of every statistic through `band_valid`, and the code
  needs no special case for single-instrument data.
  """
  present = [i for i in registry.instruments if i in chips]
  if not present:
    raise UserError('held-out data has no chips of any registry instrument '
                    f'({", ".join(registry.instruments)})')
  ref = present[0]
  n, _, h, w = chips[ref]['image'].shape
  missing = [i for i in registry.instruments if i not in chips]
  for inst in missing:
    f = registry.pixel_scale(ref) / registry.pixel_scale(inst)
    nb = registry.n_bands(inst)
    zeros = np.zeros((n, nb, int(round(h * f)), int(round(w * f))), np.float32)
    chips[inst] = {'image': zeros, 'rms': zeros, 'mask': zeros,
                   'band_valid': np.zeros((n, nb), bool)}
  return missing


def _token_arcsec(rep) -> float:
  return float(rep.config.model.token_arcsec) if hasattr(rep, 'config') else rep.token_arcsec


def _valid(chips: dict, registry: bands_lib.BandRegistry, band: str) -> np.ndarray:
  inst, idx = registry[band].instrument, registry[band].index
  return np.asarray(chips[inst]['band_valid'][:, idx], bool)


# -- sections ------------------------------------------------------------------------


def diagnostics_section(emb: Embedded, data: HeldOutData, registry: bands_lib.BandRegistry,
                        query: str, gallery: str, bands, rank_fraction: float) -> dict:
  """Collapse diagnostics of one model (see diagnostics.py)."""
  chips = data.chips
  valid = {b: _valid(chips, registry, b) for b in bands}
  ok = valid[query] & valid[gallery]
  if ok.sum() >= 2:
    out = diagnostics.token_similarity_pair(
        emb.tokens[query][ok], emb.tokens[gallery][ok], emb.token_weights[query][ok],
        emb.token_weights[gallery][ok])
  else:
    out = dict.fromkeys(('token_similarity', 'token_similarity_unweighted',
                         'token_similarity_shuffled'))
  pooled = np.concatenate([emb.globals[b][valid[b]] for b in bands])
  if pooled.shape[0] < 2:
    raise UserError('held-out data: fewer than two valid band images; nothing to evaluate')
  out.update(diagnostics.collapse_stats(pooled))
  out['per_band'] = diagnostics.per_band_collapse(emb.globals, valid, rank_fraction)
  out['n_collapsed_bands'] = int(sum(v['collapsed'] for v in out['per_band'].values()))
  cross = diagnostics.cross_band_similarity(emb.globals, bands, valid)
  con = np.asarray(cross['contrast'], float)
  off = con[~np.eye(len(bands), dtype=bool)]
  cross['mean_contrast'] = float(np.nanmean(off)) if np.isfinite(off).any() else None
  out['cross_band'] = cross
  toks = np.concatenate([emb.tokens[b][valid[b]].reshape(-1, emb.tokens[b].shape[-1])
                         for b in bands])
  tw = np.concatenate([emb.token_weights[b][valid[b]].ravel() for b in bands])
  out['activation_weight'] = diagnostics.activation_weight_correlation(toks[None], tw[None])
  return out


def retrieval_section(embedded: Mapping[str, Embedded], data: HeldOutData,
                      registry: bands_lib.BandRegistry, query: str, gallery: str) -> dict:
  """Cross-instrument retrieval by global embedding and by token-grid matching."""
  ok = _valid(data.chips, registry, query) & _valid(data.chips, registry, gallery)
  n = int(ok.sum())
  out = {'query_band': query, 'gallery_band': gallery, 'n': n,
         'chance_top1': 1.0 / max(n, 1), 'chance_top5': min(5, n) / max(n, 1),
         'models': {}, 'band_pairs': {}}
  q_inst, g_inst = registry[query].instrument, registry[gallery].instrument
  for name, emb in embedded.items():
    if n < 2:
      out['models'][name] = None
      continue
    g = embeddings.retrieval_figures(embeddings.global_scores(emb.globals[query][ok],
                                                              emb.globals[gallery][ok]))
    t = embeddings.retrieval_figures(embeddings.token_grid_scores(
        emb.tokens[query][ok], emb.tokens[gallery][ok], emb.token_weights[query][ok]))
    out['models'][name] = {'global': {k: g[k] for k in ('top1', 'top5')},
                           'tokens': {k: t[k] for k in ('top1', 'top5')}}
    pairs = {}
    for qb in registry.instrument_bands(q_inst):
      for gb in registry.instrument_bands(g_inst):
        both = _valid(data.chips, registry, qb.name) & _valid(data.chips, registry, gb.name)
        if both.sum() >= 2:
          s = embeddings.global_scores(emb.globals[qb.name][both], emb.globals[gb.name][both])
          pairs[f'{qb.name}->{gb.name}'] = embeddings.top_k_from_scores(s, 1)
    out['band_pairs'][name] = pairs
  return out


def _source_properties(sources: dict) -> dict:
  return {k: np.asarray(v, float) for k, v in sources.items() if k not in ('chip', 'x', 'y')}


def embedding_section(embedded: Mapping[str, Embedded], data: HeldOutData,
                      registry: bands_lib.BandRegistry, band: str, method: str, seed: int,
                      out_dir: str, images: dict) -> dict:
  """2-D maps and Spearman tables of global (and per-source) embeddings; comparison."""
  ok = _valid(data.chips, registry, band)
  out = {'method': None, 'band': band, 'properties': [], 'global': {}, 'sources': None,
         'comparison': None}
  if ok.sum() < 3:
    return out
  props = {k: np.asarray(v, float)[ok] for k, v in data.chip_properties.items()}
  out['properties'] = embeddings.property_columns(list(props))
  maps = {}
  for name, emb in embedded.items():
    z = emb.globals[band][ok]
    out['global'][name] = embeddings.spearman_table(z, props, seed=seed)
    maps[name], out['method'] = embeddings.reduce_2d(z, method, seed)
  for prop in out['properties']:
    images[f'embedding_global_{prop}'] = plots.embedding_map(
        maps, props[prop], prop, f'global embeddings of {band} ({out["method"]}), '
        f'coloured by {prop}', os.path.join(out_dir, f'embedding_global_{prop}.png'),
        categorical=prop == 'is_star')
  if props:
    images['spearman_global'] = plots.spearman_heatmap(
        out['global'], os.path.join(out_dir, 'spearman_global.png'))
  # All bands pooled, coloured by wavelength: a band-agnostic embedding mixes them.
  pooled_maps = {}
  wl = []
  for name, emb in embedded.items():
    zs = [emb.globals[b][_valid(data.chips, registry, b)] for b in registry.names]
    pooled_maps[name], _ = embeddings.reduce_2d(np.concatenate(zs), method, seed)
  for b in registry.names:
    wl.append(np.full(int(_valid(data.chips, registry, b).sum()), registry[b].wavelength_nm))
  images['embedding_bands'] = plots.embedding_map(
      pooled_maps, np.concatenate(wl), 'wavelength (nm)',
      'global embeddings of every band (a band-agnostic encoder mixes the colours)',
      os.path.join(out_dir, 'embedding_bands.png'))
  out['comparison'] = embeddings.compare({n: e.globals[band][ok] for n, e in embedded.items()})
  if data.sources is not None and len(data.sources['chip']) >= 5:
    out['sources'] = {}
    inst = registry[band].instrument
    src = data.sources
    props = _source_properties(src)
    smaps = {}
    chip_h = data.chips[inst]['image'].shape[2]
    for name, emb in embedded.items():
      token_px = chip_h / emb.grid[band][0]   # every model's grid covers the same chip
      b = registry.band_id(band)
      z = embeddings.source_tokens(emb.tokens[band], emb.grid[band], src['chip'],
                                   src['x'][:, b], src['y'][:, b], token_px)
      out['sources'][name] = embeddings.spearman_table(z, props, seed=seed)
      smaps[name], _ = embeddings.reduce_2d(z, method, seed)
    for prop in embeddings.property_columns(list(props)):
      images[f'embedding_sources_{prop}'] = plots.embedding_map(
          smaps, props[prop], prop, f'per-source tokens of {band} ({out["method"]}), '
          f'coloured by {prop}', os.path.join(out_dir, f'embedding_sources_{prop}.png'),
          categorical=prop == 'is_star')
    images['spearman_sources'] = plots.spearman_heatmap(
        out['sources'], os.path.join(out_dir, 'spearman_sources.png'))
  return out


def probes_section(models: dict, data: HeldOutData, overrides: Mapping | None,
                   log: Callable[[str], None]) -> dict:
  """The probes scored against truth (`jaisp_jax.evaluate.probes.run_probes`).

  Args:
    overrides: `ProbesConfig.from_dict` overrides (e.g. {'probes': ['detection']});
      {'probes': []} skips them all.
  """
  if data.raw is None:
    return {'status': 'skipped', 'note': 'held-out chips were given as arrays without a '
            'HeldOut object; the probes need one', 'results': None}
  if overrides is not None and not overrides.get('probes', True):
    return {'status': 'skipped', 'note': 'probes disabled (probes_config)', 'results': None}
  from jaisp_jax.evaluate import probes  # pylint: disable=import-outside-toplevel
  cfg = probes.ProbesConfig.from_dict(dict(overrides or {}))
  results = probes.run_probes(models, data.raw, cfg, log=log)
  skipped = results.get('skipped') or {}
  note = '; '.join(f'{k}: {v}' for k, v in skipped.items())
  return {'status': 'ok', 'note': note, 'results': results}


def _write_tensorboard(workdir: str, step: int, report: dict, images: dict):
  from jaisp_jax.train import reporting  # pylint: disable=import-outside-toplevel
  writer = reporting.create_writer(workdir)
  scalars = {}
  for row in report['table']:
    for m in MODELS:
      if isinstance(row[m], (int, float)) and not isinstance(row[m], bool):
        scalars[f'eval/{row["metric"]}/{m}'] = float(row[m])
  writer.write_scalars(step, scalars)
  writer.write_images(step, {f'eval/{k}': v[None] for k, v in images.items()})
  writer.write_texts(step, {'eval/summary': '\n'.join(report['summary'])})
  writer.flush()
  writer.close()


# -- the suite -----------------------------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str, *, max_chips: int | None = None,
             embedding_method: str = 'umap', seed: int = 0, data: HeldOutData | None = None,
             params: Any = None, step: int | None = None,
             probes_config: Mapping | None = None,
             print_fn: Callable[[str], None] | None = None) -> dict:
  """Evaluates the latest checkpoint of `workdir`; writes W/eval/ and returns the report.

  Args:
    config: the run's config (as for training).
    max_chips: held-out chips to use (default `config.eval.max_chips`).
    embedding_method: 'umap' (falls back to PCA without umap-learn) or 'pca'.
    seed: seed of everything random in the suite (2-D maps, shuffled controls).
    data: held-out chips to use instead of the config's validation split (e.g. user
      tiles without truth).
    params, step: evaluate these EMA params instead of the latest checkpoint's.
    probes_config: overrides of the probes' settings (`probes.ProbesConfig.from_dict`);
      {'probes': []} skips them.
  """
  t0 = time.time()
  print_fn = print_fn or (lambda s: print(s, flush=True))
  registry = bands_lib.BandRegistry.from_config(config.bands)
  bands = list(registry.names)
  query, gallery = config.eval.query_band, config.eval.gallery_band
  for b in (query, gallery):
    if b not in registry:
      raise UserError(f'config.eval: band {b!r} is not in the registry ({", ".join(bands)})')
  if params is None:
    step, params = restore_ema_params(config, workdir)
  step = int(step or 0)
  out_dir = os.path.join(workdir, 'eval')
  os.makedirs(out_dir, exist_ok=True)
  if data is not None:
    split = 'given'
  else:
    data = load_heldout(config, registry, max_chips or int(config.eval.max_chips))
    split = config.data.eval_split if config.data.data_dir else 'fresh simulated field'
  missing = complete_instruments(data.chips, registry)
  models = {'trained': inference.from_params(params, config, registry),
            'init': inference.from_params(_init_params(config), config, registry)}
  classical = embeddings.PixelBaseline(registry, config.model.token_arcsec,
                                       config.model.infomap.snr_threshold,
                                       config.model.infomap.softness)
  embedded = {name: embed_chips(rep, data.chips, registry, bands)
              for name, rep in {**models, 'classical': classical}.items()}
  notes = list(data.notes)
  if missing:
    notes.append(f'no {", ".join(missing)} chips: their bands are treated as invalid '
                 '(cross-instrument retrieval needs both instruments)')
  images: dict[str, np.ndarray] = {}

  report: dict[str, Any] = {
      'schema_version': SCHEMA_VERSION,
      'run': {'workdir': os.path.abspath(workdir), 'variant': config.model.variant,
              'step': step, 'seed': int(config.seed),
              'embed_dim': int(embedded['trained'].globals[query].shape[1])},
      'data': {'split': split, 'n_chips': data.n,
               'has_truth': data.sources is not None,
               'n_sources': None if data.sources is None else int(len(data.sources['chip'])),
               'source': data.description, 'bands': bands, 'query_band': query,
               'gallery_band': gallery,
               'crop_px': {i: int(data.chips[i]['image'].shape[-1]) for i in data.chips}},
      'models': {'trained': f'EMA target parameters of checkpoint {step}',
                 'init': f'the same architecture at initialisation (seed {config.seed})',
                 'classical': 'pixels in noise units at the coarsest pixel scale (no learning)'},
  }
  report['diagnostics'] = {
      name: diagnostics_section(emb, data, registry, query, gallery, bands,
                                config.eval.collapse_rank_fraction)
      for name, emb in embedded.items()}
  report['retrieval'] = retrieval_section(embedded, data, registry, query, gallery)
  # Maps of the query band, or of the first band with enough valid chips (user data
  # may lack the query band's instrument).
  counts = {b: int(_valid(data.chips, registry, b).sum()) for b in bands}
  map_band = query if counts[query] >= 3 else max(bands, key=lambda b: counts[b])
  if not data.chip_properties:
    data.chip_properties = _pixel_properties(data.chips, registry, map_band)
  report['embeddings'] = embedding_section(embedded, data, registry, map_band, embedding_method,
                                           seed, out_dir, images)
  if report['embeddings']['method'] == 'pca' and embedding_method == 'umap':
    notes.append('2-D maps use PCA: umap-learn is not installed or there are < 10 chips')
  if data.sources is None:
    notes.append('no truth catalog: per-source maps and truth-scored probes skipped; '
                 'global maps are coloured by image statistics')
  report['probes'] = probes_section(models, data, probes_config, print_fn)
  _diagnostic_plots(report, embedded, data, registry, bands, query, out_dir, images)
  report['table'] = report_lib.headline_table(report)
  report['plots'] = sorted(f'{k}.png' for k in images)
  report['notes'] = notes
  report['report_path'] = os.path.join(out_dir, 'report.json')
  report['summary'] = report_lib.summary_lines(report)
  report['seconds'] = round(time.time() - t0, 1)
  report = report_lib.clean(report)
  if jax.process_index() == 0:
    report_lib.write_json(report['report_path'], report)
    _write_tensorboard(workdir, step, report, images)
    print_fn('\n'.join(report['summary']))
  return report


def _diagnostic_plots(report, embedded, data, registry, bands, query, out_dir, images):
  d = report['diagnostics']
  images['cross_band_similarity'] = plots.band_matrix(
      {m: np.asarray(d[m]['cross_band']['matrix'], float) for m in embedded}, bands,
      'same chip, band i vs band j: mean cosine of global embeddings',
      os.path.join(out_dir, 'cross_band_similarity.png'))
  images['cross_band_contrast'] = plots.band_matrix(
      {m: np.asarray(d[m]['cross_band']['contrast'], float) for m in embedded}, bands,
      'same-chip minus other-chip cosine (0 = no chip information)',
      os.path.join(out_dir, 'cross_band_contrast.png'))
  show = bands[::max(1, len(bands) // 4)][:4]
  imgs, ws, titles = [], [], []
  for b in show:
    i_inst, idx = registry[b].instrument, registry[b].index
    imgs.append(data.chips[i_inst]['image'][0, idx])
    ws.append(embedded['trained'].pixel_weights[b][0])
    titles.append(f'chip 0, {b}')
  images['infomap_overlay'] = plots.infomap_overlay(imgs, ws, titles,
                                                    os.path.join(out_dir, 'infomap_overlay.png'))
  scatter = {}
  for m, emb in embedded.items():
    scatter[m] = (emb.token_weights[query].ravel(),
                  diagnostics.token_activation(emb.tokens[query]).ravel(),
                  d[m]['activation_weight']['pearson_centred'] or 0.0)
  images['activation_vs_weight'] = plots.activation_vs_weight(
      scatter, os.path.join(out_dir, 'activation_vs_weight.png'))
  images['per_band_collapse'] = plots.per_band_bars(
      {m: d[m]['per_band'] for m in embedded}, bands, ('effective_dim', 'rankme', 'var_mean'),
      os.path.join(out_dir, 'per_band_collapse.png'))
  r = report['retrieval']
  if all(r['models'].get(m) for m in embedded):
    images['retrieval'] = plots.retrieval_bars(
        r['models'], r['chance_top1'], r['chance_top5'],
        f'retrieval {r["query_band"]} -> {r["gallery_band"]} among {r["n"]} held-out chips',
        os.path.join(out_dir, 'retrieval.png'))


def main(argv=None) -> int:
  """`python -m jaisp_jax.evaluate.suite W`: prints the summary of W/eval/report.json."""
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 1:
    raise UserError('usage: python -m jaisp_jax.evaluate.suite WORKDIR')
  path = os.path.join(argv[0], 'eval', 'report.json')
  if not os.path.exists(path):
    raise UserError(f'{path}: no report; run --mode=evaluate first')
  summary = read_json(path).get('summary')
  if not isinstance(summary, list):
    raise UserError(f'{path}: not an evaluation report (no "summary" list)')
  print('\n'.join(map(str, summary)))
  return 0


if __name__ == '__main__':
  from jaisp_jax import cli  # pylint: disable=import-outside-toplevel
  sys.exit(cli.run(main, prog='jaisp_jax.evaluate.suite'))
