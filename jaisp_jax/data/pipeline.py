"""grain input pipeline: chip records -> view pairs -> per-process batches -> global arrays.

Source: the TFDS array_record dataset written by `jaisp_jax.data.build`
(``tfds.data_source(config.name, split, data_dir=config.data_dir)``, random access,
no TensorFlow), or, when ``config.data_dir`` is empty, a small field simulated on the
fly and chipped in memory (the smoke configs).

Order and sharding. Element k of process p's (endless) stream reads chip
``perm_e[(k % n_local) * P + p]``, with ``e = k // n_local`` the epoch, ``perm_e`` a
permutation of all chips drawn from (seed, e) (index shuffling) and
``n_local = n_chips // P``: every epoch is a fresh permutation, the P processes
read disjoint shards of it (at most P - 1 chips per epoch are left out, different
ones each epoch), and the element depends only on (seed, p, k), never on the number
of worker processes. Randomness of the element (pair, crop, flip, rot90, noise)
comes from ``np.random.default_rng([seed, p, k])``.

Static batch composition. A process-local batch has ``L = pairs_per_batch / P``
slots; slot ``k % L`` always holds the same instrument combination (the quotas of
`pairing.PairSampler.quotas`, in combination order), so every batch has exactly
``quota[combo] / P`` pairs of each combination on this process and the same shapes
forever. If the chip drawn for a slot cannot supply its combination (its valid bands
do not allow it), the slot takes the next chip of the stream (k + 1, k + 2, ...),
so the choice is still a function of (seed, p, k).

Chip cache. A record holds every band of a chip but a pair uses two, and decoding
costs more than cropping, so each process keeps up to ``cache_mb`` of decoded chips
(with their band-valid vectors) and decodes a chip again only after eviction
(`records.RecordCache`, least recently used). The cache never changes a value. Chips of a
TFDS source are decoded from the record bytes by `records.ChipDecoder` (only the chip, the
arrays TFDS would return), which is faster than TFDS's generic example parser.

Batches: ``batch['pairs'][combo]`` as in batch.py, plus ``batch['chips']`` when
``chips_per_batch > 0`` (the chips of the first slots, with the pair's geometry).
Workers (`num_workers` > 0) build whole batches in separate processes
(``mp_prefetch``); batches then go to global `jax.Array`s sharded along the batch
axis with ``jax.make_array_from_process_local_data`` (`GlobalBatchIterator`). The
iterator state (grain's, a few integers per worker) is checkpointable with
``grain.checkpoint.CheckpointSave``; a restored iterator yields exactly the batches
the uninterrupted one would have.

Evaluation (`make_eval_iterator`) is not this stream: it reads the first chips of
the evaluation split once each, in order, as centred crops, with the same chips on
every process.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Mapping, Sequence

import grain
import ml_collections
import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError
from jaisp_jax.data import augment
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.data import pairing
from jaisp_jax.data import records

# A stream long enough never to end in practice (grain needs a length).
_ENDLESS = 2 ** 62


def default_data_config() -> ml_collections.ConfigDict:
  """The data part of an experiment config (`config.data`), every field documented."""
  c = ml_collections.ConfigDict()
  c.data_dir = ''                 # TFDS data dir of `build`; '' = simulate a small field now
  c.name = 'jaisp_chips'          # dataset name inside data_dir (`build --name`)
  c.train_split = 'train'         # split read by the training iterator
  c.eval_split = 'validation'     # split read by evaluation (one pass, no shuffle)
  c.crop_arcsec = 12.8            # view side on the sky: Rubin 64 px, Euclid 128 px
  c.pairs_per_batch = 32          # global pairs per batch, all instrument combos together
  c.min_pairs_per_combo = 0       # >0: every combo with P > 0 gets at least this many
  c.chips_per_batch = 0           # global all-band chips per batch (batch['chips']); 0 = none
  c.pairing = ml_collections.ConfigDict(dict(  # strategy mixture (sums to 1), see pairing.py
      cross_instrument=0.5, hard=0.3, random=0.2))
  c.hard_min_gap_nm = 0.0         # hard pair: wavelength gap >= this (nm); 0 = use top fraction
  c.hard_top_fraction = 1 / 3     # hard pair: top fraction of all pairs ranked by gap
  c.flip = True                   # random mirror, identical for all views of a sample
  c.rot90 = True                  # random quarter turns, identical for all views
  c.noise_prob = 0.0              # probability that a view gets extra Gaussian noise
  c.noise_max_alpha = 0.0         # extra noise = U(0, alpha) * rms (view becomes shallower)
  c.seed = 0                      # order, pairs and augmentations derive from it
  c.num_workers = 0               # grain worker processes (0 = build batches in this process)
  c.worker_buffer = 2             # batches buffered per worker
  c.read_threads = 1              # threads building batches when num_workers == 0
  c.prefetch = 2                  # batches prefetched by the reading threads
  c.cache_mb = 1024               # decoded chips kept per process (each worker: its own); 0 = off
  c.simulate = ml_collections.ConfigDict(dict(  # used only when data_dir == ''
      n_tiles=6,                  # simulated tile pairs (about 1 s each on one core)
      size=96,                    # tile side in Rubin pixels (Euclid: twice)
      chip_px=96,                 # chip side in Rubin pixels (>= the crop)
      seed=0,                     # simulator seed
      val_fraction=0.2))          # share of tiles (sky regions) for the validation split
  return c


# -- sources -----------------------------------------------------------------------


def open_source(config: ml_collections.ConfigDict, split: str,
                registry: bands_lib.BandRegistry) -> Sequence[Mapping[str, Any]]:
  """Random-access chip records of one split (TFDS array_record or simulated)."""
  if not config.data_dir:
    return simulated_source(config, split, registry)
  import tensorflow_datasets as tfds
  from jaisp_jax.data import tfds_builder
  meta = tfds_builder.read_metadata(config.data_dir, config.name)
  check_registry(meta, registry, f'{config.data_dir}/{config.name}')
  chip_arcsec = meta.get('chip_arcsec')
  if chip_arcsec is not None and config.crop_arcsec > chip_arcsec + 1e-6:
    # Caught here, once, rather than per element deep in a grain worker.
    raise UserError(f'{config.data_dir}/{config.name}: its chips are {chip_arcsec:g}" on a side '
                    f'({meta.get("chip_px")} px) but config.data.crop_arcsec is '
                    f'{config.crop_arcsec:g}"; lower the crop or build bigger chips')
  try:
    return tfds.data_source(config.name, split=split, data_dir=config.data_dir,
                            download=False)
  except (KeyError, ValueError) as e:
    raise UserError(f'{config.data_dir}/{config.name}: no split {split!r} ({e})') from None


def check_registry(meta: Mapping, registry: bands_lib.BandRegistry, where: str) -> None:
  """The dataset's bands must be the registry's (same order within each instrument)."""
  stored = bands_lib.BandRegistry.from_dicts(meta['registry'])
  for inst in meta['instruments']:
    want = [b.name for b in registry.instrument_bands(inst)] if inst in registry.instruments else []
    got = [b.name for b in stored.instrument_bands(inst)]
    if want != got:
      raise UserError(f'{where}: dataset bands of {inst} are {got} but the config registry '
                      f'has {want}; rebuild the dataset or fix config.bands')


def simulated_source(config: ml_collections.ConfigDict, split: str,
                     registry: bands_lib.BandRegistry) -> list[dict]:
  """Chip records of a small simulated field, in memory (see `config.simulate`).

  The field is simulated once per process and per (simulate config, registry), then
  chipped and split exactly as `build --simulate` would.
  """
  key = (tuple(sorted(config.simulate.items())), tuple(map(tuple, (
      sorted(b.items()) for b in registry.to_dicts()))))
  splits = _simulated_splits(key, registry)
  if split not in splits:
    raise UserError(f'simulated field (config.data.simulate): no split {split!r}; it has '
                    f'{sorted(splits)}; raise simulate.n_tiles or simulate.val_fraction')
  return splits[split]


@functools.lru_cache(maxsize=4)
def _simulated_splits(key, registry: bands_lib.BandRegistry) -> dict[str, list[dict]]:
  import tempfile
  from jaisp_jax.data import tfds_builder
  sim = dict(key[0])
  options = tfds_builder.ChipOptions(chip_px=int(sim['chip_px']),
                                     val_fraction=float(sim['val_fraction']))
  with tempfile.TemporaryDirectory(prefix='jaisp-sim-') as tmp:
    field = tfds_builder.simulate_field(tmp, 'onthefly', int(sim['n_tiles']), int(sim['seed']),
                                        int(sim['size']), registry, workers=1)
    plan = tfds_builder.plan_build(field.dirs, registry, options, truth=field.truth,
                                   wcs=field.wcs)
    return {s: [rec for _, rec in plan.examples(s)] for s in plan.splits}


# -- elements and batches ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static composition of a process-local batch.

  Attributes:
    quotas: global pairs per combination (only combos with > 0).
    slot_combo: (L,) combination of each local slot, grouped in combo order.
    local_chips: chips per local batch (`batch['chips']`).
  """
  quotas: dict[str, int]
  slot_combo: tuple[str, ...]
  local_chips: int

  @property
  def local_pairs(self) -> int:
    return len(self.slot_combo)


def make_layout(config: ml_collections.ConfigDict, sampler: pairing.PairSampler,
                data_parallel: int, process_count: int) -> Layout:
  """Quotas rounded to the data-parallel size and split evenly over the processes."""
  if data_parallel % process_count:
    raise ValueError(f'data-parallel size {data_parallel} is not a multiple of the '
                     f'{process_count} processes')
  quotas = sampler.quotas(int(config.pairs_per_batch), data_parallel,
                          int(config.min_pairs_per_combo))
  quotas = {c: q for c, q in quotas.items() if q > 0}
  slots = tuple(c for c, q in quotas.items() for _ in range(q // process_count))
  chips = int(config.chips_per_batch)
  if chips % data_parallel or chips // process_count > len(slots):
    raise ValueError(f'chips_per_batch={chips} must be a multiple of the data-parallel size '
                     f'{data_parallel} and at most pairs_per_batch')
  return Layout(quotas, slots, chips // process_count)


def make_sampler(config: ml_collections.ConfigDict,
                 registry: bands_lib.BandRegistry) -> pairing.PairSampler:
  return pairing.PairSampler(registry, dict(config.pairing), config.hard_min_gap_nm,
                             config.hard_top_fraction)


class PairElement:
  """k -> one batch element: the pair for slot k % L (and its chip for chip slots)."""

  def __init__(self, source, registry: bands_lib.BandRegistry,
               config: ml_collections.ConfigDict, layout: Layout, shard_index: int,
               shard_count: int, shuffle: bool = True):
    self.source = source
    self.registry = registry
    self.sampler = make_sampler(config, registry)
    self.layout = layout
    self.seed = int(config.seed)
    self.shard_index, self.shard_count = shard_index, shard_count
    self.n_local = len(source) // shard_count
    if self.n_local == 0:
      raise UserError(f'{len(source)} chip(s) cannot be shared by {shard_count} processes')
    self.shuffle = shuffle
    self._perm_cache = (-1, None)
    self.crop_arcsec = float(config.crop_arcsec)
    self.flip, self.rot90 = bool(config.flip), bool(config.rot90)
    self.noise_prob, self.noise_max_alpha = float(config.noise_prob), float(config.noise_max_alpha)
    self.cache = records.RecordCache(int(config.cache_mb) * 2 ** 20)
    self.decoder = records.ChipDecoder.for_source(source)

  def _load(self, index: int) -> tuple[Any, np.ndarray]:
    if self.decoder is not None:
      try:
        chip = self.decoder(self.source.data_source[index])
      except (ValueError, IndexError) as e:  # a damaged record: say which, stop loudly
        where = getattr(getattr(self.source, 'dataset_info', None), 'data_dir', 'dataset')
        raise UserError(f'{where}: record {index} is not a readable chip record ({e}); '
                        'rebuild the dataset (python -m jaisp_jax.data.build)') from None
    else:
      chip = self.source[index]['instruments']
    return chip, augment.chip_band_valid(chip, self.registry, None)

  def chip(self, index: int) -> tuple[Any, np.ndarray]:
    """(chip, registry band-valid vector) of record `index`, through the cache."""
    return self.cache.get(index, self._load)

  def record_index(self, k: int) -> int:
    """Chip read by stream position k (see the module docstring)."""
    epoch, j = divmod(k, self.n_local)
    g = j * self.shard_count + self.shard_index
    if not self.shuffle:
      return g
    return int(self._permutation(epoch)[g])

  def _permutation(self, epoch: int) -> np.ndarray:
    # One permutation of all chips per epoch, shared by the processes (same seed), so
    # their strided slices are disjoint; cached, since consecutive k share the epoch.
    # (grain's index_shuffle would avoid the O(n) array but costs ~5 ms per call on
    # datasets of a few chips.) The cache is one tuple, replaced atomically, so
    # reading threads never see an epoch paired with another epoch's permutation.
    cached_epoch, perm = self._perm_cache
    if cached_epoch != epoch:
      perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
      self._perm_cache = (epoch, perm)
    return perm

  def __call__(self, k: int) -> dict:
    slot = k % self.layout.local_pairs
    combo = self.layout.slot_combo[slot]
    rng = np.random.default_rng([self.seed, self.shard_index, k])
    for attempt in range(self.n_local):
      chip, valid = self.chip(self.record_index(k + attempt))
      draw = self.sampler.sample(rng, combo, valid)
      if draw is not None:
        break
    else:
      raise UserError(f'no chip of this shard has valid bands for a {combo} pair; '
                      'set its quota to 0 (pairing probabilities) or fix the dataset')
    geom = augment.sample_geometry(rng, chip, self.registry, self.crop_arcsec,
                                   self.flip, self.rot90)
    element = dict(combo=combo, pair=augment.make_pair(
        chip, self.registry, draw.band_a, draw.band_b, draw.kind, geom, rng,
        self.noise_prob, self.noise_max_alpha))
    if slot < self.layout.local_chips:
      element['chip'] = augment.make_chip_sample(chip, self.registry, geom, None, valid)
    return element


def _stack(items: Sequence[Any]) -> Any:
  first = items[0]
  if isinstance(first, Mapping):
    return {key: _stack([it[key] for it in items]) for key in first}
  return np.stack(items)


class BatchFn:
  """Stacks L elements into {'pairs': {combo: ...}, 'chips': {...}} (fixed shapes)."""

  def __init__(self, layout: Layout):
    self.layout = layout

  def __call__(self, elements: Sequence[dict]) -> dict:
    pairs = {}
    for combo in self.layout.quotas:
      pairs[combo] = _stack([e['pair'] for e in elements if e['combo'] == combo])
    out = {'pairs': pairs}
    if self.layout.local_chips:
      out['chips'] = _stack([e['chip'] for e in elements if 'chip' in e])
    return out


# -- datasets and iterators --------------------------------------------------------


def make_dataset(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry, *,
                 data_parallel: int, shard_index: int = 0, shard_count: int = 1,
                 split: str | None = None, num_epochs: int | None = None,
                 shuffle: bool = True, source=None) -> grain.IterDataset:
  """The grain dataset of process-local batches (numpy) for one shard.

  Args:
    config: `default_data_config()`-like.
    data_parallel: number of batch shards of the mesh (quotas are multiples of it).
    shard_index, shard_count: this process and the number of processes.
    split: defaults to `config.train_split`.
    num_epochs: None = endless (training); n = n passes over this shard's chips,
      the last partial batch dropped (but at least one batch: with fewer chips than
      slots, chips repeat with other crops).
    shuffle: permute chips each epoch (False for evaluation).
    source: a random-access sequence of records (default: `open_source`).
  """
  split = split or config.train_split
  source = open_source(config, split, registry) if source is None else source
  sampler = make_sampler(config, registry)
  layout = make_layout(config, sampler, data_parallel, shard_count)
  element = PairElement(source, registry, config, layout, shard_index, shard_count, shuffle)
  if num_epochs is None:
    n = _ENDLESS
  else:  # at least one batch, even from fewer chips than slots (chips then repeat)
    n = max(element.n_local * int(num_epochs), layout.local_pairs)
  ds = (grain.MapDataset.range(n)
        .map(element)
        .batch(layout.local_pairs, drop_remainder=True, batch_fn=BatchFn(layout)))
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, int(config.read_threads)),
                                            prefetch_buffer_size=max(1, int(config.prefetch))))
  if int(config.num_workers) > 0:
    from absl import flags
    if not flags.FLAGS.is_parsed():
      # grain reads its absl flags when starting workers; outside `absl.app.run`
      # (tests, notebooks) they are unparsed, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.num_workers), per_worker_buffer_size=int(config.worker_buffer)))
  return ds


def data_parallel_size(sharding) -> int:
  """Number of shards of a sharding's leading axis."""
  spec = sharding.spec
  axes = spec[0] if len(spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


class GlobalBatchIterator(grain.DatasetIterator):
  """Turns process-local numpy batches into global jax.Arrays sharded on the batch axis.

  A grain `DatasetIterator`, so `grain.checkpoint.CheckpointSave(it)` saves (and
  restores) the position of the underlying pipeline.
  """

  def __init__(self, parent: grain.DatasetIterator, sharding):
    super().__init__(parent)
    self._sharding = sharding

  def __next__(self):
    import jax
    local = next(self._parent)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self._sharding, np.asarray(x)), local)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


def make_iterator(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                  sharding, *, split: str | None = None, num_epochs: int | None = None,
                  shuffle: bool = True, source=None) -> GlobalBatchIterator:
  """Iterator of global batches for this process (jax.process_index / process_count).

  Args:
    sharding: a NamedSharding whose leading axis is the batch axis (e.g.
      `jaisp_jax.train.sharding.batch_sharding(mesh)`).
    split, num_epochs, shuffle, source: as in `make_dataset`.
  """
  import jax
  ds = make_dataset(config, registry, data_parallel=data_parallel_size(sharding),
                    shard_index=jax.process_index(), shard_count=jax.process_count(),
                    split=split, num_epochs=num_epochs, shuffle=shuffle, source=source)
  return GlobalBatchIterator(iter(ds), sharding)


def make_eval_iterator(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                       *, max_chips: int | None = None, batch_size: int = 64,
                       source=None) -> Iterator[dict]:
  """One unshuffled pass over the first `max_chips` chips of `config.eval_split`.

  Every chip is read exactly once, in record order: chips are never repeated to fill
  a batch (the training stream's `make_dataset(num_epochs=1)` does repeat them, which
  made retrieval "find" a chip among other crops of itself), and none is dropped for
  a partial batch. The view of a chip is its centred `config.crop_arcsec` crop, with
  no flip or rotation, so the chips depend only on the split and `max_chips` (not on
  the seed, the batch size or the number of processes).

  Every process reads the same chips itself (no sharding, no gather): evaluation
  embeds the same host arrays on every process, as a jitted function given host
  arrays requires, and an eval set (a few hundred chips) is cheap to decode.

  Yields host numpy batches ``{'index': (B,) record indices, 'chips': {instrument:
  {'image', 'rms', 'mask': (B, n_bands, h, w), 'band_valid': (B, n_bands)}}}`` of
  `batch_size` chips, the last one smaller when the chips do not fill it.

  Args:
    config: `default_data_config()`-like.
    max_chips: at most this many chips (None = the whole split).
    batch_size: chips per yielded batch.
    source: a random-access sequence of records (default: `open_source`).
  """
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  source = open_source(config, config.eval_split, registry) if source is None else source
  n = len(source) if max_chips is None else min(len(source), int(max_chips))
  return _eval_batches(config, registry, source, n, batch_size)


def _eval_batches(config, registry, source, n: int, batch_size: int) -> Iterator[dict]:
  if n == 0:
    return
  eval_config = config.copy_and_resolve_references()
  eval_config.cache_mb = 0  # each chip is read once: a cache would only hold memory
  # PairElement only for its record reading (TFDS decoder or simulated records, and
  # its error for a damaged record): the layout is empty, no pair is drawn.
  reader = PairElement(source, registry, eval_config, Layout({}, (), 0), shard_index=0,
                       shard_count=1, shuffle=False)
  crop = float(config.crop_arcsec)
  for start in range(0, n, batch_size):
    index = np.arange(start, min(start + batch_size, n))
    chips = []
    for i in index:
      chip, valid = reader.chip(int(i))
      chips.append(augment.make_chip_sample(chip, registry, _centre_geometry(chip, registry, crop),
                                            None, valid))
    yield {'index': index, 'chips': _stack(chips)}


def _centre_geometry(chip: Mapping, registry: bands_lib.BandRegistry,
                     crop_arcsec: float) -> augment.Geometry:
  """The centred crop of `crop_arcsec`, unflipped and unrotated."""
  # sample_geometry checks the crop (whole pixels, fits the chip); only its origin moves.
  geom = augment.sample_geometry(np.random.default_rng(0), chip, registry, crop_arcsec,
                                 flip=False, rot90=False)
  h, w, _ = augment.chip_geometry(chip, registry)
  return dataclasses.replace(geom, y0=(h - geom.size) // 2, x0=(w - geom.size) // 2)


def batch_quotas(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                 data_parallel: int) -> dict[str, int]:
  """Global pairs per combination of every batch (what the model's shapes are)."""
  return make_layout(config, make_sampler(config, registry), data_parallel, 1).quotas

