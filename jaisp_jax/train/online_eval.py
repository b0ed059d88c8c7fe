"""Held-out evaluation run by the train loop: is the representation learning anything?

A JEPA loss is only a proxy (it can fall while the model collapses), so every
`config.eval.every` steps the loop embeds held-out chips with the EMA target and
measures two things that a collapsed or untrained encoder cannot fake:

  retrieval_top1  cross-instrument retrieval: for each held-out chip, the global
                  embedding of `eval.query_band` (Rubin r) must find the same chip's
                  `eval.gallery_band` (Euclid VIS) embedding among all held-out chips
                  (cosine similarity). Chance is 1 / N, N the number of distinct
                  held-out chips (each chip of the split is used once, at most
                  `eval.max_chips` of them, leaving out chips whose query or
                  gallery band is masked); with N < 2 retrieval is nan.
  rankme          effective rank of the embeddings (RankMe, Garrido et al. 2023:
                  exp of the entropy of the normalised singular values), out of D.
  effective_dim   participation ratio of the embedding covariance, (sum l)^2 / sum l^2.

A collapse warning is printed when RankMe falls below `eval.collapse_rank_fraction`
of D. Chips are taken from the validation split, which is spatially disjoint from
the training split.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError
from jaisp_jax.data import augment
from jaisp_jax.data import pipeline
from jaisp_jax.models import jaisp
from jaisp_jax.objectives import vicreg


def usable(chips: dict[str, dict[str, np.ndarray]], band: str,
           registry: bands_lib.BandRegistry) -> np.ndarray:
  """(N,) bool: `band` is flagged valid and at least `augment.MIN_VALID_FRACTION` of its
  pixels are valid (the training pairs' default, `augment.band_validity`)."""
  b = registry[band]
  if b.instrument not in chips:
    raise UserError(f'held-out evaluation: band {band!r} is a {b.instrument} band, but the '
                    f'held-out chips have no {b.instrument} images (they have '
                    f'{", ".join(sorted(chips))}); set eval.query_band / eval.gallery_band')
  part = chips[b.instrument]
  mask = np.asarray(part['mask'][:, b.index], bool)
  ok = mask.reshape(len(mask), -1).mean(axis=1) >= augment.MIN_VALID_FRACTION
  if 'band_valid' in part:
    ok &= np.asarray(part['band_valid'][:, b.index], bool)
  return ok


def collect_chips(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                  sharding=None, *, source=None) -> dict[str, dict[str, np.ndarray]]:
  """The held-out chips on the host, {instrument: arrays}: each chip of the split once.

  The first min(N, `config.eval.max_chips`) chips, in record order
  (`pipeline.make_eval_iterator`), of the N chips of `config.data.eval_split` in which
  both `eval.query_band` and `eval.gallery_band` are usable (flagged valid, at least
  half of the pixels valid): a chip whose query or gallery band is masked carries no
  signal to retrieve, and counting it would make retrieval measure the masking. The
  chips left out are counted in a note. The same chips on every process and on every
  call with the same config. With a single chip retrieval is undefined, so a warning
  says so and `figures` reports it as nan; with none, a UserError.

  `sharding` is not used (kept for callers): every process reads the chips itself.
  `source` replaces the split's records (`pipeline.open_source`), for tests.
  """
  del sharding
  data, max_chips = config.data, int(config.eval.max_chips)
  if max_chips < 1:
    raise UserError(f'eval.max_chips must be at least 1, got {max_chips}')
  bands = (config.eval.query_band, config.eval.gallery_band)
  for band in bands:
    if band not in registry:
      raise UserError(f'held-out evaluation: eval band {band!r} is not in the band registry '
                      f'({", ".join(b.name for b in registry)})')
  parts, kept, skipped, seen = [], 0, 0, 0
  for batch in pipeline.make_eval_iterator(data, registry, source=source):
    chips = batch['chips']
    seen += len(batch['index'])
    ok = np.flatnonzero(usable(chips, bands[0], registry) & usable(chips, bands[1], registry))
    take = ok[:max_chips - kept]
    kept += len(take)
    # Chips looked at in this batch: all of them, or up to the last one taken when the
    # batch completes the set; those not taken were left out.
    looked_at = take[-1] + 1 if kept >= max_chips else len(batch['index'])
    skipped += looked_at - len(take)
    if len(take):
      parts.append(jax.tree.map(lambda a, t=take: a[t], chips))
    if kept >= max_chips:
      break
  if not parts:
    raise UserError(f'held-out evaluation: split {data.eval_split!r} has no chip with both '
                    f'{bands[0]} and {bands[1]} usable (of {seen} chips read); choose '
                    'eval.query_band / eval.gallery_band present in the data')
  out = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
  n = next(iter(out.values()))['image'].shape[0]
  if jax.process_index() == 0:
    if skipped:
      print(f'note: held-out evaluation: {skipped} chip(s) of split {data.eval_split!r} left '
            f'out, {bands[0]} or {bands[1]} masked in them (under '
            f'{augment.MIN_VALID_FRACTION:.0%} valid pixels)', file=sys.stderr, flush=True)
    if n < 2:
      print(f'WARNING: held-out evaluation: split {data.eval_split!r} has {n} usable chip; '
            'retrieval needs at least 2 and is reported as nan (simulated data: raise '
            'data.simulate.n_tiles or val_fraction)', file=sys.stderr, flush=True)
  return out


EmbedFn = Callable[[np.ndarray, np.ndarray, str], np.ndarray]


def params_embed_fn(params: Any, model_config: ml_collections.ConfigDict,
                    registry: bands_lib.BandRegistry) -> EmbedFn:
  """embed(image, rms, band) -> (B, D) global embeddings with model parameters.

  Inputs are (B, 1, H, W) in the batch contract's noise units (masked pixels 0).
  """
  def embed(image, rms, band):
    rep = jaisp.get_representation({'params': params}, image, rms, band, model_config,
                                   registry, normalise=False)
    return np.asarray(rep['global'], np.float32)
  return embed


def embed_band(embed: EmbedFn, chips: dict, band: str, registry: bands_lib.BandRegistry,
               batch_size: int = 64) -> np.ndarray:
  """(N, D) global embeddings of one band of the chips."""
  inst = registry[band].instrument
  idx = registry[band].index
  image = chips[inst]['image'][:, idx]
  rms = chips[inst]['rms'][:, idx] * (chips[inst]['mask'][:, idx] > 0)
  return np.concatenate([embed(image[s:s + batch_size, None], rms[s:s + batch_size, None], band)
                         for s in range(0, image.shape[0], batch_size)])


def retrieval_top_k(query: np.ndarray, gallery: np.ndarray, k: int = 1) -> float:
  """Fraction of queries whose own row is among the k most cosine-similar gallery rows.

  Ties count against the query: a gallery row as similar as the query's own row
  outranks it. (Counting them in its favour let a collapsed encoder, whose
  embeddings are all equal, score a perfect 1.0.)
  """
  q = query / np.maximum(np.linalg.norm(query, axis=1, keepdims=True), 1e-12)
  g = gallery / np.maximum(np.linalg.norm(gallery, axis=1, keepdims=True), 1e-12)
  sim = q @ g.T                                          # (N, N)
  own = np.diag(sim)[:, None]
  rank = (sim >= own).sum(axis=1) - 1                     # others at least as similar
  return float(np.mean(rank < k))


def evaluate(embed: EmbedFn, chips: dict, config: ml_collections.ConfigDict,
             registry: bands_lib.BandRegistry) -> dict[str, float]:
  """Retrieval and rank figures of an embedding function on held-out `chips`."""
  return figures(embed_band(embed, chips, config.eval.query_band, registry),
                 embed_band(embed, chips, config.eval.gallery_band, registry))


def figures(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
  """Retrieval and rank figures of (N, D) query and gallery embeddings (row i = chip i)."""
  z = jnp.asarray(np.concatenate([q, g]))
  n = q.shape[0]
  # One chip: its own gallery row is the only candidate, a "hit" that measures nothing.
  top1, top5 = ((retrieval_top_k(q, g, 1), retrieval_top_k(q, g, 5)) if n >= 2
                else (float('nan'), float('nan')))
  return {
      'retrieval_top1': top1,
      'retrieval_top5': top5,
      'chance_top1': 1.0 / n,
      'n_chips': float(n),
      'rankme': float(vicreg.rankme(z)),
      'effective_dim': float(vicreg.effective_dim(z)),
      'embed_dim': float(z.shape[1]),
  }


def collapse_warning(figures: dict[str, float], fraction: float) -> str | None:
  """A warning line when the effective rank is below `fraction` of its maximum, else None.

  The maximum is D, or 2N when the N chips' 2N embeddings (query and gallery) are
  fewer: a healthy encoder on 2 chips has RankMe <= 4, which is no sign of collapse.
  """
  d, rows = figures['embed_dim'], 2 * figures['n_chips']
  top, name = (d, 'D') if d <= rows else (rows, '2N')
  if figures['rankme'] < fraction * top:
    return (f'WARNING: possible representation collapse: RankMe {figures["rankme"]:.1f} < '
            f'{fraction:g} x {name} = {fraction * top:.1f} on held-out chips')
  return None
