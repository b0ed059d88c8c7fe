"""Held-out evaluation run by the train loop: is the representation learning anything?

A JEPA loss is only a proxy (it can fall while the model collapses), so every
`config.eval.every` steps the loop embeds held-out chips with the EMA target and
measures two things that a collapsed or untrained encoder cannot fake:

  retrieval_top1  cross-instrument retrieval: for each held-out chip, the global
                  embedding of `eval.query_band` (Rubin r) must find the same chip's
                  `eval.gallery_band` (Euclid VIS) embedding among all held-out chips
                  (cosine similarity). Chance is 1 / N.
  rankme          effective rank of the embeddings (RankMe, Garrido et al. 2023:
                  exp of the entropy of the normalised singular values), out of D.
  effective_dim   participation ratio of the embedding covariance, (sum l)^2 / sum l^2.

A collapse warning is printed when RankMe falls below `eval.collapse_rank_fraction`
of D. Chips are taken from the validation split, which is spatially disjoint from
the training split.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.data import pipeline
from jaisp_jax.models import jaisp
from jaisp_jax.objectives import vicreg


def eval_data_config(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The data config of evaluation: every sample also carries its all-band chip."""
  c = copy.deepcopy(data)
  with c.unlocked():
    c.chips_per_batch = c.pairs_per_batch
    c.num_workers = 0
  return c


def collect_chips(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                  sharding) -> dict[str, dict[str, np.ndarray]]:
  """Up to `config.eval.max_chips` held-out chips on the host: {instrument: arrays}."""
  it = pipeline.make_eval_iterator(eval_data_config(config.data), registry, sharding)
  parts: list[dict] = []
  n = 0
  for batch in it:
    # Global arrays span every process's devices: gather them (a no-op on one host).
    chips = multihost_utils.process_allgather(batch['chips'], tiled=True)
    parts.append(chips)
    n += next(iter(chips.values()))['image'].shape[0]
    if n >= config.eval.max_chips:
      break
  if not parts:
    raise ValueError('the evaluation split yielded no batch')
  out = jax.tree.map(lambda *xs: np.concatenate(xs)[:config.eval.max_chips], *parts)
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
  return {
      'retrieval_top1': retrieval_top_k(q, g, 1),
      'retrieval_top5': retrieval_top_k(q, g, 5),
      'chance_top1': 1.0 / n,
      'n_chips': float(n),
      'rankme': float(vicreg.rankme(z)),
      'effective_dim': float(vicreg.effective_dim(z)),
      'embed_dim': float(z.shape[1]),
  }


def collapse_warning(figures: dict[str, float], fraction: float) -> str | None:
  """A warning line when the effective rank is below `fraction` of D, else None."""
  if figures['rankme'] < fraction * figures['embed_dim']:
    return (f'WARNING: possible representation collapse: RankMe {figures["rankme"]:.1f} < '
            f'{fraction:g} x D = {fraction * figures["embed_dim"]:.1f} on held-out chips')
  return None
