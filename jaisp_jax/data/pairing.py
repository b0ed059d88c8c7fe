"""View-pair sampling: which two bands of a chip form a training pair.

A pair is two different bands of the same sky. The seeds mix three strategies
(``batch.PAIR_KINDS``), each a distribution over unordered band pairs:

  * ``cross_instrument``: uniform over pairs whose bands belong to different
    instruments (Rubin <-> Euclid alignment);
  * ``hard``: uniform over pairs with a large wavelength gap, "large" meaning
    ``gap >= hard_min_gap_nm`` when that is > 0, otherwise the top
    ``hard_top_fraction`` of all pairs ranked by gap (ties included), which adapts
    to any registry (for the default one, 1/3 gives the 15 pairs with gap >= 604 nm,
    e.g. u-H, g-J, VIS-H);
  * ``random``: uniform over all pairs of two different bands.

The configured mixture ``P(pair) = sum_s p_s P(pair | s)`` is what training sees.

Static shapes. The batch holds a fixed number of pairs per instrument combination
(``batch['pairs'][combo]``, see batch.py), because a Rubin view and a Euclid view
cannot share an array. The quota of a combination is its mixture probability
``P(combo) = sum_{pair in combo} P(pair)`` times the number of pairs, rounded to a
multiple of the data-parallel size (largest remainder, so the quotas add up exactly).
Within a group, the band pair is drawn from ``P(pair | combo)`` (the mixture
restricted to the combination) and the strategy label ``kind`` from
``P(s | pair)``. Hence the pair marginal is ``quota(combo) / n * P(pair | combo)``,
equal to the mixture up to the quota rounding (`rounding_report` measures it), the
kind marginal likewise, and the pair mix never changes a shape.

Invalid bands. A band flagged invalid in a chip (``band_valid`` False) is never
drawn there: the draw is restricted to pairs whose two bands are valid and
renormalised. If no such pair exists for the requested combination (e.g. a chip
whose Euclid bands are all masked asked for a rubin-euclid pair), `sample` returns
None and the caller must take the slot from another chip (the pipeline moves on to
the next chip of its shuffled order, deterministically), so shapes never change.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import ConfigError
from jaisp_jax.data import batch as batch_lib

DEFAULT_PROBS = {'cross_instrument': 0.5, 'hard': 0.3, 'random': 0.2}


@dataclasses.dataclass(frozen=True)
class PairDraw:
  """One drawn pair: registry band ids (band_a of the combo's first instrument)."""
  band_a: int
  band_b: int
  kind: int


class PairSampler:
  """Mixture of pairing strategies over the bands of a registry.

  Args:
    registry: the band registry.
    probs: strategy -> probability (keys from `batch.PAIR_KINDS`, missing = 0);
      must be >= 0 and sum to 1.
    hard_min_gap_nm: a pair is hard when its wavelength gap is at least this (nm);
      0 means use `hard_top_fraction` instead.
    hard_top_fraction: fraction of all pairs, ranked by gap, that are hard.
  """

  def __init__(self, registry: bands_lib.BandRegistry,
               probs: Mapping[str, float] | None = None,
               hard_min_gap_nm: float = 0.0, hard_top_fraction: float = 1 / 3):
    self.registry = registry
    probs = dict(DEFAULT_PROBS if probs is None else probs)
    unknown = set(probs) - set(batch_lib.PAIR_KINDS)
    if unknown:
      raise ConfigError(f'unknown pairing strategies {sorted(unknown)}; '
                       f'known: {batch_lib.PAIR_KINDS}')
    p = np.array([float(probs.get(k, 0.0)) for k in batch_lib.PAIR_KINDS])
    if (p < 0).any() or abs(p.sum() - 1.0) > 1e-6:
      raise ConfigError(f'pairing probabilities must be >= 0 and sum to 1, got {probs}')
    if len(registry) < 2:
      raise ValueError('pairing needs a registry with at least two bands')
    self.kind_probs = p  # (K,)

    bands = registry.bands
    inst_order = {name: i for i, name in enumerate(registry.instruments)}
    ia, ib = np.triu_indices(len(bands), k=1)
    # Orient every pair so that `a` belongs to the combo's first instrument.
    swap = np.array([inst_order[bands[i].instrument] > inst_order[bands[j].instrument]
                     for i, j in zip(ia, ib)], bool)
    self.pair_a = np.where(swap, ib, ia).astype(np.int32)  # (P,)
    self.pair_b = np.where(swap, ia, ib).astype(np.int32)  # (P,)
    wl = np.array([b.wavelength_nm for b in bands])
    self.pair_gap = np.abs(wl[self.pair_a] - wl[self.pair_b])  # (P,)
    self.combo_names = [batch_lib.combo_key(a, b) for a, b in batch_lib.combos(registry)]
    self.pair_combo = np.array([
        self.combo_names.index(batch_lib.combo_key(bands[a].instrument, bands[b].instrument))
        for a, b in zip(self.pair_a, self.pair_b)], np.int32)  # (P,)

    cross = np.array([bands[a].instrument != bands[b].instrument
                      for a, b in zip(self.pair_a, self.pair_b)], bool)
    if hard_min_gap_nm > 0:
      self.hard_threshold_nm = float(hard_min_gap_nm)
    else:
      if not 0 < hard_top_fraction <= 1:
        raise ConfigError(f'hard_top_fraction must be in (0, 1], got {hard_top_fraction}')
      k = max(1, int(np.ceil(hard_top_fraction * len(self.pair_gap) - 1e-9)))
      self.hard_threshold_nm = float(np.sort(self.pair_gap)[::-1][k - 1])
    hard = self.pair_gap >= self.hard_threshold_nm
    members = {'cross_instrument': cross, 'hard': hard,
               'random': np.ones_like(cross)}
    cond = np.zeros((len(batch_lib.PAIR_KINDS), len(self.pair_a)))  # (K, P)
    for s, kind in enumerate(batch_lib.PAIR_KINDS):
      m = members[kind]
      if not m.any():
        if p[s] > 0:
          raise ConfigError(f'pairing strategy {kind!r} has probability {p[s]} but no '
                           f'band pair of this registry qualifies')
        continue
      cond[s] = m / m.sum()
    self.members = members
    self.pair_given_kind = cond                          # (K, P) P(pair | s)
    self.pair_probs = p @ cond                           # (P,)   P(pair)
    joint = p[:, None] * cond                            # (K, P) P(s, pair)
    self.kind_given_pair = joint / np.maximum(self.pair_probs, 1e-300)  # (K, P)
    # Per-draw lookups, precomputed: a pair's strategy distribution as a contiguous
    # (K,) row, whether its two bands share an instrument, and (filled lazily) the
    # renormalised within-combo distribution per (combo, valid bands); a chip's valid
    # bands take few distinct values, so that table stays small.
    self._kind_rows = [np.ascontiguousarray(self.kind_given_pair[:, j])
                       for j in range(len(self.pair_a))]
    self._same_instrument = [bands[a].instrument == bands[b].instrument
                             for a, b in zip(self.pair_a, self.pair_b)]
    self._draw_tables: dict[tuple[str, bytes | None], tuple[np.ndarray, np.ndarray] | None] = {}

  # -- distributions ----------------------------------------------------------
  @property
  def n_pairs(self) -> int:
    return len(self.pair_a)

  def combo_probs(self) -> dict[str, float]:
    """P(combo) under the configured mixture, for every instrument combination."""
    totals = np.bincount(self.pair_combo, weights=self.pair_probs,
                         minlength=len(self.combo_names))
    return dict(zip(self.combo_names, totals.tolist()))

  def quotas(self, n_pairs: int, multiple: int = 1, min_per_combo: int = 0) -> dict[str, int]:
    """Pairs per combination in a batch of `n_pairs` (each a multiple of `multiple`).

    `multiple` is the data-parallel size, so that every device gets the same
    number of pairs of every group. Largest-remainder rounding in units of
    `multiple`: the quotas add up to `n_pairs` exactly. A combination with a small
    probability may round to 0 (absent from the batch); `min_per_combo` > 0 gives
    every combination of nonzero probability at least that many pairs (rounded up
    to `multiple`), the others sharing the rest in proportion, which departs from
    the mixture (see `rounding_report`) but keeps every combination in every batch.
    """
    if n_pairs <= 0 or multiple <= 0 or n_pairs % multiple:
      raise ConfigError(f'the number of pairs ({n_pairs}) must be a positive multiple '
                       f'of the data-parallel size ({multiple})')
    units = n_pairs // multiple
    p = np.array(list(self.combo_probs().values()))
    min_units = -(-min_per_combo // multiple)
    fixed = np.zeros(len(p), bool)
    if min_units:
      if min_units * (p > 0).sum() > units:
        raise ConfigError(f'min_per_combo={min_per_combo} for {(p > 0).sum()} combinations '
                         f'does not fit in {n_pairs} pairs')
      # Pin the combinations whose share falls below the minimum, then share the rest.
      while True:
        free = units - min_units * fixed.sum()
        share = np.where(fixed, 0.0, p) / max(np.where(fixed, 0.0, p).sum(), 1e-300)
        low = (~fixed) & (p > 0) & (share * free < min_units)
        if not low.any():
          break
        fixed |= low
    free = units - min_units * fixed.sum()
    rest_p = np.where(fixed, 0.0, p)
    target = rest_p / max(rest_p.sum(), 1e-300) * free
    base = np.floor(target + 1e-9).astype(int)
    order = np.argsort(-(target - base), kind='stable')
    base[order[:free - base.sum()]] += 1
    base[fixed] = min_units
    return {c: int(q) * multiple for c, q in zip(self.combo_names, base)}

  def effective_pair_probs(self, quotas: Mapping[str, int]) -> np.ndarray:
    """(P,) pair marginal actually produced by batches with these quotas."""
    q = np.array([quotas.get(c, 0) for c in self.combo_names], float)
    p_combo = np.array(list(self.combo_probs().values()))
    within = self.pair_probs / np.maximum(p_combo[self.pair_combo], 1e-300)
    return q[self.pair_combo] / q.sum() * within

  def effective_kind_probs(self, quotas: Mapping[str, int]) -> np.ndarray:
    """(K,) strategy marginal actually produced by batches with these quotas."""
    return self.kind_given_pair @ self.effective_pair_probs(quotas)

  def rounding_report(self, quotas: Mapping[str, int]) -> dict:
    """How far quota rounding moves the batch from the configured mixture."""
    n = sum(quotas.values())
    eff = self.effective_pair_probs(quotas)
    return dict(
        combo_target={c: p * n for c, p in self.combo_probs().items()},
        quotas=dict(quotas),
        kind_target=dict(zip(batch_lib.PAIR_KINDS, self.kind_probs.tolist())),
        kind_effective=dict(zip(batch_lib.PAIR_KINDS,
                                self.effective_kind_probs(quotas).tolist())),
        pair_total_variation=float(0.5 * np.abs(eff - self.pair_probs).sum()))

  # -- sampling ---------------------------------------------------------------
  def sample(self, rng: np.random.Generator, combo: str,
             band_valid: np.ndarray | None = None) -> PairDraw | None:
    """Draws one pair of `combo` among bands valid in the chip, or None if none.

    Args:
      rng: numpy generator.
      combo: group name (`batch.combo_key`).
      band_valid: (n_bands,) bool over the registry; None = all valid.
    """
    if band_valid is not None:
      band_valid = np.asarray(band_valid, bool)
    key = (combo, None if band_valid is None else band_valid.tobytes())
    try:
      table = self._draw_tables[key]
    except KeyError:
      table = self._draw_tables[key] = self._draw_table(combo, band_valid)
    if table is None:
      return None
    idx, p = table
    j = idx[rng.choice(len(idx), p=p)]
    kind = int(rng.choice(len(batch_lib.PAIR_KINDS), p=self._kind_rows[j]))
    a, b = int(self.pair_a[j]), int(self.pair_b[j])
    if self._same_instrument[j]:
      if rng.random() < 0.5:  # which band the online branch sees is a fair coin
        a, b = b, a
    return PairDraw(a, b, kind)

  def _draw_table(self, combo: str, band_valid: np.ndarray | None
                  ) -> tuple[np.ndarray, np.ndarray] | None:
    """(pair indices of `combo`, their probabilities among valid pairs) or None."""
    c = self.combo_names.index(combo)
    idx = np.flatnonzero(self.pair_combo == c)
    w = self.pair_probs[idx]
    if band_valid is not None:
      w = w * (band_valid[self.pair_a[idx]] & band_valid[self.pair_b[idx]])
    total = w.sum()
    if total <= 0:
      return None
    return idx, w / total

  def pair_index(self, band_a: int, band_b: int) -> int:
    """Index into the (P,) arrays of the unordered pair {band_a, band_b}."""
    hit = np.flatnonzero(((self.pair_a == band_a) & (self.pair_b == band_b))
                         | ((self.pair_a == band_b) & (self.pair_b == band_a)))
    if len(hit) != 1:
      raise ValueError(f'no pair of bands {band_a}, {band_b}')
    return int(hit[0])


class BandUsage:
  """Counts of views per band and per pairing strategy, for metrics.

  Counts are taken from batches (band and kind travel in the batch), so they are
  right whatever number of grain worker processes produced them. Update with the
  process-local numpy batch before it goes to the devices.
  """

  def __init__(self, registry: bands_lib.BandRegistry):
    self.registry = registry
    self.counts = np.zeros((len(registry), len(batch_lib.PAIR_KINDS)), np.int64)  # (n_bands, K)

  def update(self, pairs: Mapping[str, Mapping]) -> None:
    """Adds the views of a `batch['pairs']` dict."""
    for group in pairs.values():
      kind = np.asarray(group['kind']).reshape(-1)
      for side in ('a', 'b'):
        band = np.asarray(group[side]['band']).reshape(-1)
        np.add.at(self.counts, (band, kind), 1)

  def reset(self) -> None:
    self.counts[:] = 0

  def metrics(self, prefix: str = 'data/') -> dict[str, float]:
    """Fractions of views per band and of pairs per kind, plus the rarest band."""
    total = max(int(self.counts.sum()), 1)
    per_band = self.counts.sum(axis=1) / total
    per_kind = self.counts.sum(axis=0) / total
    out = {f'{prefix}band_frac/{name}': float(f)
           for name, f in zip(self.registry.names, per_band)}
    out.update({f'{prefix}kind_frac/{k}': float(f)
                for k, f in zip(batch_lib.PAIR_KINDS, per_kind)})
    out[f'{prefix}band_frac_min'] = float(per_band.min())
    out[f'{prefix}views_counted'] = float(self.counts.sum())
    return out
