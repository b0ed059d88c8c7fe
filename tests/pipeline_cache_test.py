"""The pipeline's chip cache and chip decoder: the same batches with them or without."""

import jax
import numpy as np
import pytest

from jaisp_jax import bands
from jaisp_jax.data import pipeline
from jaisp_jax.data import records
from jaisp_jax.data import tfds_builder

REG = bands.default_registry()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('cache')
  rng = np.random.default_rng(3)
  dirs = {}
  for inst, f in (('rubin', 1), ('euclid', 2)):
    d = root / 'tiles' / inst
    d.mkdir(parents=True)
    dirs[inst] = str(d)
    for t in range(3):
      nb, side = REG.n_bands(inst), 96 * f
      rms = np.broadcast_to(rng.uniform(0.5, 4, (nb, 1, 1)), (nb, side, side))
      image = rms * rng.standard_normal(rms.shape)
      image[0, :3] = np.nan  # masked pixels travel through the cache too
      np.savez(f'{d}/tile_{t}.npz', image=image.astype(np.float32),
               rms=rms.astype(np.float32))
  tfds_builder.build_dataset(dirs, root / 'd', 'cache', REG,
                             tfds_builder.ChipOptions(chip_px=48, val_fraction=0.34),
                             progress=False)
  return str(root / 'd')


def _config(data_dir, **kw):
  c = pipeline.default_data_config()
  c.data_dir, c.name = data_dir, 'cache'
  c.crop_arcsec = 3.2  # Rubin 16 px of a 48 px chip: crops differ
  c.pairs_per_batch = 8
  c.min_pairs_per_combo = 2
  c.chips_per_batch = 2
  c.noise_prob, c.noise_max_alpha = 0.5, 0.5
  c.update(kw)
  return c


class _Counting:
  """A source that counts its reads."""

  def __init__(self, source):
    self.source, self.reads = source, 0

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    self.reads += 1
    return self.source[i]


def _batches(config, n, source=None):
  it = iter(pipeline.make_dataset(config, REG, data_parallel=2, source=source))
  out = [next(it) for _ in range(n)]
  it.close()
  return out


def test_batches_are_identical_with_the_cache_on_off_or_evicting(data_dir):
  base = pipeline.open_source(_config(data_dir), 'train', REG)
  chip_mb = records._nbytes(base[0]['instruments']) / 2 ** 20
  n_chips = len(base)
  assert n_chips >= 6 and 0.25 < chip_mb < 0.5  # a 1 MB cache holds 2 or 3 chips
  batches = {}
  reads = {}
  for mb in (0, 1, 1024):
    src = _Counting(base)
    batches[mb] = _batches(_config(data_dir, cache_mb=mb), 6, source=src)  # ~4 epochs
    reads[mb] = src.reads
  # The TFDS source itself: chips decoded by `ChipDecoder` instead of TFDS.
  batches['fast'] = _batches(_config(data_dir), 6)
  # Reading threads share one cache (and a small one evicts under them).
  batches['threads'] = _batches(_config(data_dir, cache_mb=1, read_threads=3), 6)
  for other in (1, 1024, 'fast', 'threads'):
    for x, y in zip(jax.tree.leaves(batches[0]), jax.tree.leaves(batches[other])):
      np.testing.assert_array_equal(x, y)
  assert reads[1024] == n_chips          # every chip decoded once
  assert reads[0] >= 6 * 8               # every element read its chip
  assert n_chips < reads[1] < reads[0]   # a small cache hits sometimes, evicts sometimes


def test_cache_is_bounded_least_recently_used_and_never_altered(data_dir):
  base = pipeline.open_source(_config(data_dir), 'train', REG)
  size = records._nbytes(base[0]['instruments'])
  c = _config(data_dir)
  layout = pipeline.make_layout(c, pipeline.make_sampler(c, REG), 2, 1)
  element = pipeline.PairElement(base, REG, c, layout, 0, 1)
  element.cache = records.RecordCache(2 * size)
  for i in (0, 1, 0, 2):  # 0 was used after 1, so 1 is the one evicted for 2
    element.chip(i)
  assert len(element.cache) == 2 and element.cache.nbytes == 2 * size
  assert (element.cache.hits, element.cache.misses) == (1, 3)
  element.chip(0)
  assert element.cache.hits == 2
  element.chip(1)
  assert element.cache.misses == 4
  # Many elements later, a cached chip still holds the values read from disk.
  element.cache = records.RecordCache(2 ** 30)
  cached, _ = element.chip(0)
  for k in range(40):
    element(k)
  fresh = base[0]['instruments']
  for x, y in zip(jax.tree.leaves(cached), jax.tree.leaves(fresh)):
    np.testing.assert_array_equal(x, y)
  valid = element.chip(0)[1]
  assert valid.shape == (len(REG),) and valid.all()


def test_a_worker_gets_an_empty_cache():
  import pickle
  cache = records.RecordCache(2 ** 20)
  cache.get(0, lambda i: ({'x': np.zeros(4)}, np.ones(1, bool)))
  copy = pickle.loads(pickle.dumps(cache))
  assert len(cache) == 1 and len(copy) == 0 and copy.max_bytes == 2 ** 20


def test_chip_decoder_returns_what_tfds_decodes(data_dir):
  source = pipeline.open_source(_config(data_dir), 'train', REG)
  decoder = records.ChipDecoder.for_source(source)
  assert decoder is not None  # a dataset of `build` takes the fast path
  for i in (0, len(source) - 1):
    fast, slow = decoder(source.data_source[i]), source[i]['instruments']
    assert list(fast) == list(slow)  # same instruments in the same order
    for inst in slow:
      assert list(fast[inst]) == list(slow[inst])
      for key, want in slow[inst].items():
        got = fast[inst][key]
        assert type(got) is type(want), (inst, key)
        if isinstance(want, np.ndarray):
          assert (got.dtype, got.shape) == (want.dtype, want.shape), (inst, key)
          assert not got.flags.writeable or want.flags.writeable, (inst, key)
        np.testing.assert_array_equal(got, want)
  # Sources that are not TFDS array_record data sources are decoded by themselves.
  assert records.ChipDecoder.for_source(_Counting(source)) is None
  assert records.ChipDecoder.for_source([source[0]]) is None


def test_chip_decoder_reads_the_wire_format_like_protobuf():
  from tensorflow_datasets.proto import tf_example_pb2
  rng = np.random.default_rng(0)
  image = rng.standard_normal((2, 3, 3)).astype(np.float32)
  ex = tf_example_pb2.Example()
  feats = ex.features.feature
  feats['instruments/x/image'].bytes_list.value.append(image.tobytes())
  feats['instruments/x/band_valid'].int64_list.value.extend([1, 0])
  feats['instruments/x/rms_scale'].float_list.value.extend([0.5, 2.0])
  feats['instruments/x/pixel_scale'].float_list.value.append(0.1)
  feats['instruments/x/band_names'].bytes_list.value.extend([b'a', b'b'])
  feats['id'].bytes_list.value.append(b'x' * 300)  # a long varint length, skipped
  decoder = records.ChipDecoder([
      ('x', 'band_names', 'instruments/x/band_names', np.dtype(object), (2,), False),
      ('x', 'band_valid', 'instruments/x/band_valid', np.dtype(bool), (2,), False),
      ('x', 'image', 'instruments/x/image', np.dtype(np.float32), (2, 3, 3), True),
      ('x', 'pixel_scale', 'instruments/x/pixel_scale', np.dtype(np.float32), (), False),
      ('x', 'rms_scale', 'instruments/x/rms_scale', np.dtype(np.float32), (2,), False)])
  chip = decoder(ex.SerializeToString())['x']
  np.testing.assert_array_equal(chip['image'], image)
  assert not chip['image'].flags.writeable
  np.testing.assert_array_equal(chip['band_valid'], [True, False])
  np.testing.assert_array_equal(chip['rms_scale'], np.float32([0.5, 2.0]))
  assert chip['pixel_scale'] == np.float32(0.1) and list(chip['band_names']) == [b'a', b'b']
  del feats['instruments/x/image']
  with pytest.raises(ValueError, match='no value for instruments/x/image'):
    decoder(ex.SerializeToString())


class _Damaged:
  """The TFDS source with its records cut in half (a damaged array_record file)."""

  def __init__(self, source):
    self.source = source
    self.dataset_info = source.dataset_info
    self.data_source = self

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    raw = self.source.data_source[i]
    return raw[:len(raw) // 2]


def test_a_damaged_record_is_a_clear_error_naming_it(data_dir):
  from jaisp_jax.cli import UserError
  config = _config(data_dir)
  source = pipeline.open_source(config, 'train', REG)
  decoder = records.ChipDecoder.for_source(source)
  raw = source.data_source[0]
  with pytest.raises((ValueError, IndexError)):
    decoder(raw[:len(raw) // 2])
  layout = pipeline.make_layout(config, pipeline.make_sampler(config, REG), 2, 1)
  element = pipeline.PairElement(source, REG, config, layout, 0, 1)
  element.source = _Damaged(source)
  with pytest.raises(UserError, match=r'record 3 is not a readable chip record'):
    element.chip(3)
