"""grain worker processes and two JAX processes (gloo on 127.0.0.1) reading one dataset."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaisp_jax import bands
from jaisp_jax.data import pipeline
from jaisp_jax.data import tfds_builder

REG = bands.default_registry()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('mp')
  rng = np.random.default_rng(0)
  dirs = {}
  for inst, f in (('rubin', 1), ('euclid', 2)):
    d = root / 'tiles' / inst
    d.mkdir(parents=True)
    dirs[inst] = str(d)
    for t in range(5):
      shape = (REG.n_bands(inst), 48 * f, 48 * f)
      np.savez(d / f'tile_{t}.npz', image=rng.standard_normal(shape).astype(np.float32),
               rms=np.ones(shape, np.float32))
  tfds_builder.build_dataset(dirs, root / 'd', 'mp', REG,
                             tfds_builder.ChipOptions(chip_px=24, val_fraction=0.2),
                             progress=False)
  return str(root / 'd')


def _config(data_dir, workers=0):
  c = pipeline.default_data_config()
  c.data_dir, c.name = data_dir, 'mp'
  c.crop_arcsec = 3.2
  c.pairs_per_batch = 16
  c.min_pairs_per_combo = 4
  c.chips_per_batch = 4
  c.noise_prob, c.noise_max_alpha = 0.5, 1.0
  c.num_workers = workers
  return c


def _assert_same(xs, ys):
  assert len(jax.tree.leaves(xs)) == len(jax.tree.leaves(ys))
  for x, y in zip(jax.tree.leaves(xs), jax.tree.leaves(ys)):
    np.testing.assert_array_equal(x, y)


def test_two_workers_give_the_same_batches_and_resume_exactly(data_dir):
  serial = iter(pipeline.make_dataset(_config(data_dir), REG, data_parallel=4))
  want = [next(serial) for _ in range(6)]
  serial.close()
  it = iter(pipeline.make_dataset(_config(data_dir, workers=2), REG, data_parallel=4))
  got = [next(it) for _ in range(3)]
  state = it.get_state()
  got += [next(it) for _ in range(3)]
  it.close()
  _assert_same(want, got)  # the number of workers never changes the data
  resumed = iter(pipeline.make_dataset(_config(data_dir, workers=2), REG, data_parallel=4))
  resumed.set_state(state)
  _assert_same(want[3:], [next(resumed) for _ in range(3)])
  resumed.close()


_CHILD = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    pid, port, data_dir, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=pid)
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from jaisp_jax import bands
    from jaisp_jax.data import pipeline
    sys.path.insert(0, sys.argv[5])
    from pipeline_multiprocess_test import _config

    class Recording:
      def __init__(self, source):
        self.source, self.read = source, []
      def __len__(self):
        return len(self.source)
      def __getitem__(self, i):
        self.read.append(int(i))
        return self.source[i]

    reg = bands.default_registry()
    config = _config(data_dir)
    assert jax.process_count() == 2 and len(jax.devices()) == 4
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2), ('data', 'fsdp'))
    sharding = NamedSharding(mesh, P(('data', 'fsdp')))
    source = Recording(pipeline.open_source(config, 'train', reg))
    it = pipeline.make_iterator(config, reg, sharding, source=source)
    batch = next(it)
    full = multihost_utils.process_allgather(batch, tiled=True)
    flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_flatten_with_path(full)[0]}
    local = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(x.addressable_data(0))
             for path, x in jax.tree_util.tree_flatten_with_path(batch)[0]}
    shapes = {k: np.array(x.shape) for k, x in zip(flat, jax.tree.leaves(batch))}
    np.savez(out, reads=np.array(source.read), n=len(source),
             **{'global/' + k: v for k, v in flat.items()},
             **{'shape/' + k: v for k, v in shapes.items()},
             **{'local0/' + k: v for k, v in local.items()})
    it.close()
    jax.distributed.shutdown()
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_read_disjoint_shards_into_one_global_batch(data_dir, tmp_path):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu')
  here = os.path.dirname(os.path.abspath(__file__))
  outs = [tmp_path / f'p{i}.npz' for i in range(2)]
  procs = [subprocess.Popen([sys.executable, '-c', _CHILD, str(i), str(port), data_dir,
                             str(outs[i]), here], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  logs = []
  for p in procs:
    try:
      logs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  res = [dict(np.load(o)) for o in outs]

  # Disjoint shards: within each epoch the two processes read different chips.
  n = int(res[0]['n'])
  per_epoch = n // 2
  r0, r1 = res[0]['reads'], res[1]['reads']
  assert len(r0) == len(r1) >= per_epoch
  for e in range(min(len(r0), len(r1)) // per_epoch):
    a = set(r0[e * per_epoch:(e + 1) * per_epoch].tolist())
    b = set(r1[e * per_epoch:(e + 1) * per_epoch].tolist())
    assert not a & b and len(a) == len(b) == per_epoch

  # The global batch is complete: every process sees the same global arrays, with the
  # configured number of pairs per combination, made of both processes' local batches.
  quotas = pipeline.batch_quotas(_config(data_dir), REG, data_parallel=4)
  keys = [k[len('global/'):] for k in res[0] if k.startswith('global/')]
  assert keys
  for k in keys:
    np.testing.assert_array_equal(res[0]['global/' + k], res[1]['global/' + k])
    g = res[0]['global/' + k]
    assert tuple(res[0]['shape/' + k]) == g.shape
    if k.startswith('pairs/'):
      assert g.shape[0] == quotas[k.split('/')[1]]
    else:
      assert g.shape[0] == 4
    # Device order: process 0 holds the first half of every global array.
    half = g.shape[0] // 2
    shard = res[0]['local0/' + k]
    np.testing.assert_array_equal(g[:shard.shape[0]], shard)
    shard1 = res[1]['local0/' + k]
    np.testing.assert_array_equal(g[half:half + shard1.shape[0]], shard1)
