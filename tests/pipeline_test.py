"""grain pipeline over a real TFDS dataset: static batches, determinism, resume, sharding."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from scipy import stats

from jaisp_jax import bands
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.data import pairing
from jaisp_jax.data import pipeline
from jaisp_jax.data import tfds_builder

REG = bands.default_registry()


def _tiles(root, n=4, size=48, seed=0):
  rng = np.random.default_rng(seed)
  dirs = {}
  for inst, f in (('rubin', 1), ('euclid', 2)):
    d = root / inst
    d.mkdir(parents=True)
    dirs[inst] = str(d)
  for t in range(n):
    for inst, f in (('rubin', 1), ('euclid', 2)):
      nb = REG.n_bands(inst)
      rms = np.broadcast_to(rng.uniform(0.1, 10, (nb, 1, 1)), (nb, size * f, size * f))
      image = rms * rng.standard_normal(rms.shape)
      if inst == 'euclid':
        rms = rms.copy()
        rms[2] = 0.0  # euclid_j masked in every tile: must never be drawn
      np.savez(f'{dirs[inst]}/tile_{t}.npz', image=image.astype(np.float32),
               rms=rms.astype(np.float32))
  return dirs


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipe')
  dirs = _tiles(root / 'tiles')
  tfds_builder.build_dataset(dirs, root / 'd', 'pipe', REG,
                             tfds_builder.ChipOptions(chip_px=24, val_fraction=0.25),
                             progress=False)
  return str(root / 'd')


def _config(data_dir, **kw):
  c = pipeline.default_data_config()
  c.data_dir, c.name = data_dir, 'pipe'
  c.crop_arcsec = 3.2        # Rubin 16 px, Euclid 32 px
  c.pairs_per_batch = 16
  c.min_pairs_per_combo = 4  # every combination present, to exercise all three groups
  c.chips_per_batch = 4
  c.noise_prob, c.noise_max_alpha = 0.3, 0.5
  c.update(kw)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(xs, ys):
  for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys)):
    np.testing.assert_array_equal(x, y)


def test_batches_have_static_composition_and_valid_bands(data_dir):
  c = _config(data_dir)
  quotas = pipeline.batch_quotas(c, REG, data_parallel=4)
  assert quotas == {'rubin-rubin': 4, 'rubin-euclid': 8, 'euclid-euclid': 4}
  it = iter(pipeline.make_dataset(c, REG, data_parallel=4))
  j_band = REG.band_id('euclid_j')
  for b in _take(it, 10):
    assert set(b['pairs']) == set(quotas)
    for combo, g in b['pairs'].items():
      inst_a, inst_b = combo.split('-')
      ha = 16 if inst_a == 'rubin' else 32
      hb = 16 if inst_b == 'rubin' else 32
      assert g['a']['image'].shape == (quotas[combo], ha, ha)
      assert g['b']['rms'].shape == (quotas[combo], hb, hb)
      assert g['kind'].shape == (quotas[combo],) and g['kind'].dtype == np.int32
      assert all(REG.bands[i].instrument == inst_a for i in g['a']['band'])
      assert all(REG.bands[i].instrument == inst_b for i in g['b']['band'])
      assert (g['a']['band'] != g['b']['band']).all()
      assert j_band not in g['a']['band'] and j_band not in g['b']['band']
      for v in (g['a'], g['b']):
        assert all(np.isfinite(v[k]).all() for k in ('image', 'rms', 'mask'))
    assert b['chips']['rubin']['image'].shape == (4, 6, 16, 16)
    assert b['chips']['euclid']['image'].shape == (4, 4, 32, 32)
    assert not b['chips']['euclid']['band_valid'][:, 2].any()
  it.close()


def test_pair_fractions_match_the_effective_mixture(data_dir):
  c = _config(data_dir, min_pairs_per_combo=0, chips_per_batch=0, pairs_per_batch=32,
              noise_prob=0.0, crop_arcsec=1.6)
  sampler = pipeline.make_sampler(c, REG)
  quotas = pipeline.batch_quotas(c, REG, data_parallel=1)
  it = iter(pipeline.make_dataset(c, REG, data_parallel=1))
  usage = pairing.BandUsage(REG)
  idx = []
  for b in _take(it, 40):
    usage.update(b['pairs'])
    for g in b['pairs'].values():
      idx += [sampler.pair_index(a, b_) for a, b_ in zip(g['a']['band'], g['b']['band'])]
  it.close()
  # The dataset masks euclid_j everywhere: the expected mixture is the effective one
  # restricted to pairs without it, renormalised within each combination.
  j = REG.band_id('euclid_j')
  probs = sampler.effective_pair_probs(quotas).copy()
  ok = (sampler.pair_a != j) & (sampler.pair_b != j)
  for ci, combo in enumerate(sampler.combo_names):
    sel = sampler.pair_combo == ci
    if probs[sel].sum() > 0:
      probs[sel] = np.where(ok[sel], probs[sel], 0) / probs[sel & ok].sum() * probs[sel].sum()
  counts = np.bincount(idx, minlength=sampler.n_pairs)
  assert counts[probs == 0].sum() == 0
  expected = probs[probs > 0] * len(idx)
  assert stats.chisquare(counts[probs > 0], expected).pvalue > 1e-4
  frac = usage.metrics()
  assert all(frac[f'data/band_frac/{n}'] > 0 for n in REG.names if n != 'euclid_j')
  assert frac['data/band_frac/euclid_j'] == 0


def test_same_seed_same_batches_and_resume_mid_epoch(data_dir):
  c = _config(data_dir)
  it = iter(pipeline.make_dataset(c, REG, data_parallel=4))
  first = _take(it, 3)
  state = it.get_state()
  rest = _take(it, 4)  # 16 slots per batch, 12 train chips: every batch spans an epoch end
  again = iter(pipeline.make_dataset(c, REG, data_parallel=4))
  _assert_same(first, _take(again, 3))
  restored = iter(pipeline.make_dataset(c, REG, data_parallel=4))
  restored.set_state(state)
  _assert_same(rest, _take(restored, 4))
  other = iter(pipeline.make_dataset(_config(data_dir, seed=1), REG, data_parallel=4))
  assert not np.array_equal(first[0]['pairs']['rubin-euclid']['a']['image'],
                            _take(other, 1)[0]['pairs']['rubin-euclid']['a']['image'])
  for i in (it, again, restored, other):
    i.close()


class _Recording:
  """A source that records which chips were read."""

  def __init__(self, source):
    self.source, self.read = source, []

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.read.append(int(i))
    return self.source[i]


def test_shards_are_disjoint_and_epochs_reshuffle(data_dir):
  # No chip cache: the recording source must see every read of the stream's order.
  c = _config(data_dir, chips_per_batch=0, cache_mb=0)
  base = pipeline.open_source(c, 'train', REG)
  n = len(base)
  reads = []
  for p in range(2):
    src = _Recording(base)
    it = iter(pipeline.make_dataset(c, REG, data_parallel=4, shard_index=p, shard_count=2,
                                    source=src))
    _take(it, 2)  # 2 x 8 local slots: more than two epochs of a shard of n // 2 chips
    it.close()
    reads.append(src.read)
  per_epoch = n // 2
  for e in range(2):
    a, b = (set(r[e * per_epoch:(e + 1) * per_epoch]) for r in reads)
    assert not a & b and len(a) == per_epoch == len(b)  # disjoint shards, no repeats
  assert reads[0][:per_epoch] != reads[0][per_epoch:2 * per_epoch]  # a new order each epoch


def test_global_batch_is_sharded_along_the_batch_axis(data_dir):
  c = _config(data_dir)
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ('data', 'fsdp'))
  sharding = NamedSharding(mesh, P(('data', 'fsdp')))
  assert pipeline.data_parallel_size(sharding) == 4
  it = pipeline.make_iterator(c, REG, sharding)
  local = iter(pipeline.make_dataset(c, REG, data_parallel=4))
  g, l = next(it), next(local)
  for x, y in zip(jax.tree.leaves(g), jax.tree.leaves(l)):
    assert isinstance(x, jax.Array) and x.sharding == sharding
    np.testing.assert_array_equal(np.asarray(x), y)
  a = g['pairs']['rubin-euclid']['a']['image']
  assert len(a.addressable_shards) == 4 and a.addressable_shards[0].data.shape[0] == 2
  it.close()
  local.close()


def test_eval_iterator_is_one_ordered_pass(data_dir):
  c = _config(data_dir, pairs_per_batch=4, min_pairs_per_combo=0, chips_per_batch=4)
  n = len(pipeline.open_source(c, 'validation', REG))
  ds = pipeline.make_dataset(c, REG, data_parallel=1, split='validation', num_epochs=1,
                             shuffle=False)
  batches = list(ds)
  assert len(batches) == n // 4
  again = list(pipeline.make_dataset(c, REG, data_parallel=1, split='validation',
                                     num_epochs=1, shuffle=False))
  _assert_same(batches, again)


def test_eval_gives_at_least_one_batch_from_few_chips(data_dir):
  c = _config(data_dir, pairs_per_batch=64, min_pairs_per_combo=0, chips_per_batch=0)
  assert len(pipeline.open_source(c, 'validation', REG)) < 64
  batches = list(pipeline.make_dataset(c, REG, data_parallel=1, split='validation',
                                       num_epochs=1, shuffle=False))
  assert len(batches) == 1


def _distinct_rows(x):
  flat = x.reshape(len(x), -1)
  return len(np.unique(flat, axis=0)) == len(flat)


def test_make_eval_iterator_reads_each_chip_once_in_order(data_dir):
  # The training stream's one epoch repeats chips to fill a batch (test above); the
  # evaluation pass must not: N chips, fewer than a batch, give N chips, each once.
  c = _config(data_dir, pairs_per_batch=64, min_pairs_per_combo=0, chips_per_batch=0)
  n = len(pipeline.open_source(c, 'validation', REG))
  assert 2 <= n < 64
  batches = list(pipeline.make_eval_iterator(c, REG, max_chips=100, batch_size=3))
  assert [len(b['index']) for b in batches] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
  np.testing.assert_array_equal(np.concatenate([b['index'] for b in batches]), np.arange(n))
  for inst in ('rubin', 'euclid'):
    images = np.concatenate([b['chips'][inst]['image'] for b in batches])
    assert images.shape[0] == n and _distinct_rows(images)
  # Deterministic and independent of the batch size; max_chips takes the first chips.
  one = list(pipeline.make_eval_iterator(c, REG, batch_size=64))
  assert len(one) == 1
  _assert_same(one[0]['chips'], jax.tree.map(lambda *x: np.concatenate(x),
                                             *[b['chips'] for b in batches]))
  first = list(pipeline.make_eval_iterator(c, REG, max_chips=n - 1))
  np.testing.assert_array_equal(first[0]['index'], np.arange(n - 1))
  _assert_same(first[0]['chips'], jax.tree.map(lambda x: x[:n - 1], one[0]['chips']))
  # The view is the centred crop (Rubin 16 of 24 px), unflipped: a seed changes nothing.
  _assert_same(one, list(pipeline.make_eval_iterator(_config(data_dir, seed=7), REG)))
  source = pipeline.open_source(c, 'validation', REG)
  for i in range(n):
    for inst, f in (('rubin', 1), ('euclid', 2)):
      raw = np.asarray(source[i]['instruments'][inst]['image'])[0, 4 * f:20 * f, 4 * f:20 * f]
      got = one[0]['chips'][inst]['image'][i, 0]    # = raw crop / the band's noise scale
      assert got.shape == raw.shape
      np.testing.assert_allclose(got * (raw.std() / got.std()), raw, rtol=1e-4, atol=1e-4)
  assert one[0]['chips']['euclid']['band_valid'][:, 2].sum() == 0  # euclid_j masked


def test_a_jitted_consumer_traces_once_whatever_the_pair_mix(data_dir):
  it = iter(pipeline.make_dataset(_config(data_dir), REG, data_parallel=4))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def consume(b):
    return jax.tree.map(lambda x: x.astype(jnp.float32).sum(), b)

  for b in _take(it, 6):
    consume(b)
  it.close()


def test_normalised_views_have_unit_sky_noise(data_dir):
  c = _config(data_dir, noise_prob=0.0, pairs_per_batch=64, min_pairs_per_combo=0,
              chips_per_batch=0)
  it = iter(pipeline.make_dataset(c, REG, data_parallel=1))
  b = next(it)
  it.close()
  snr = []
  for g in b['pairs'].values():
    for v in (g['a'], g['b']):
      ok = v['mask'] > 0
      np.testing.assert_allclose(v['rms'][ok], 1.0, rtol=1e-5)  # flat rms maps
      snr.append(v['image'][ok])
  snr = np.concatenate(snr)
  assert abs(snr.std() - 1) < 5 / np.sqrt(2 * snr.size)


def test_a_dataset_built_for_other_bands_is_refused(data_dir):
  other = bands.BandRegistry.from_dicts(
      [dict(b, name=b['name'] + 'x') for b in bands.DEFAULT_BANDS])
  with pytest.raises(Exception, match='rebuild the dataset'):
    pipeline.open_source(_config(data_dir), 'train', other)


def test_batch_format_kinds_are_the_registered_strategies(data_dir):
  it = iter(pipeline.make_dataset(_config(data_dir), REG, data_parallel=4))
  kinds = np.concatenate([g['kind'] for b in _take(it, 5) for g in b['pairs'].values()])
  it.close()
  assert set(kinds.tolist()) <= set(range(len(batch_lib.PAIR_KINDS)))


def _render(sky_yx, scale, n_px, sigma=0.3):
  centers = (np.arange(n_px) + 0.5) * scale
  gy = np.exp(-(centers - sky_yx[0]) ** 2 / (2 * sigma ** 2))
  gx = np.exp(-(centers - sky_yx[1]) ** 2 / (2 * sigma ** 2))
  return (gy[:, None] * gx[None, :] * scale ** 2).astype(np.float32)  # flux per pixel


def test_every_pair_shows_the_same_sky_after_crop_flip_rot90(tmp_path):
  rng = np.random.default_rng(5)
  dirs = {}
  for inst in ('rubin', 'euclid'):
    (tmp_path / inst).mkdir()
    dirs[inst] = str(tmp_path / inst)
  for t in range(3):
    sky = rng.uniform(2.0, 4.4, size=2)  # arcsec, inside a 6.4" tile
    for inst, scale, n in (('rubin', 0.2, 32), ('euclid', 0.1, 64)):
      img = np.stack([_render(sky, scale, n)] * REG.n_bands(inst))
      np.savez(f'{dirs[inst]}/tile_{t}.npz', image=img, rms=np.full_like(img, 1e-3))
  tfds_builder.build_dataset(dirs, tmp_path / 'd', 'pts', REG,
                             tfds_builder.ChipOptions(chip_px=32, val_fraction=0.0),
                             progress=False)
  c = _config(str(tmp_path / 'd'), noise_prob=0.0, pairs_per_batch=32, chips_per_batch=0)
  c.name = 'pts'
  it = iter(pipeline.make_dataset(c, REG, data_parallel=4))
  token = 0.8
  n_pairs = 0
  for b in _take(it, 4):
    for g in b['pairs'].values():
      for i in range(len(g['kind'])):
        cents = []
        for side in ('a', 'b'):
          img = g[side]['image'][i] / np.float32(REG.bands[g[side]['band'][i]].pixel_scale) ** 2
          scale = REG.bands[g[side]['band'][i]].pixel_scale
          centers = (np.arange(img.shape[0]) + 0.5) * scale
          cents.append(np.array([(img.sum(1) * centers).sum(), (img.sum(0) * centers).sum()])
                       / img.sum())
        side = c.crop_arcsec
        if (cents[0] < 1.0).any() or (cents[0] > side - 1.0).any():
          continue  # source cut by the crop edge: pixel sampling then differs by band
        # Both views are cut, flipped and rotated alike: same centroid, same token.
        np.testing.assert_allclose(cents[0], cents[1], atol=0.01)
        ta, tb = (np.floor(x / token) for x in cents)
        near_edge = np.abs(cents[0] / token - np.round(cents[0] / token)) < 0.02
        assert ((ta == tb) | near_edge).all()
        n_pairs += 1
  it.close()
  assert n_pairs >= 20, n_pairs


def test_empty_data_dir_simulates_a_small_field_on_the_fly():
  c = pipeline.default_data_config()
  c.simulate.update(n_tiles=2, size=64, chip_px=64, val_fraction=0.5)
  c.crop_arcsec = 6.4
  c.pairs_per_batch = 8
  assert c.data_dir == ''
  train = pipeline.open_source(c, 'train', REG)
  val = pipeline.open_source(c, 'validation', REG)
  assert len(train) == len(val) == 1 and train[0]['tile'] != val[0]['tile']
  assert len(train[0]['truth_rows']) > 0 and np.isfinite(train[0]['sky']).all()
  it = iter(pipeline.make_dataset(c, REG, data_parallel=1))
  b = next(it)
  it.close()
  q = pipeline.batch_quotas(c, REG, data_parallel=1)['rubin-euclid']
  g = b['pairs']['rubin-euclid']
  assert g['a']['image'].shape == (q, 32, 32) and g['b']['image'].shape == (q, 64, 64)
  with pytest.raises(Exception, match='no split'):
    pipeline.open_source(c, 'test', REG)
