"""Mesh construction, partition rules and global batch assembly on 8 CPU devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaisp_jax.train import sharding


def mesh_config(data, fsdp):
  return ml_collections.ConfigDict(dict(mesh=dict(data=data, fsdp=fsdp)))


def test_mesh_shapes():
  assert len(jax.devices()) == 8
  m = sharding.make_mesh(mesh_config(-1, 2))
  assert dict(m.shape) == {'data': 4, 'fsdp': 2}
  assert sharding.data_size(m) == 8
  m1 = sharding.make_mesh(mesh_config(-1, 1), jax.devices()[:1])
  assert sharding.data_size(m1) == 1
  with pytest.raises(ValueError, match='must divide'):
    sharding.make_mesh(mesh_config(-1, 3))
  with pytest.raises(ValueError, match='!= 8 devices'):
    sharding.make_mesh(mesh_config(3, 2))


def test_param_rules_replicate_small_and_shard_large():
  assert sharding.param_spec((256,), 4, 1024) == P()
  assert sharding.param_spec((256, 1024), 4, 1024) == P(None, 'fsdp')
  assert sharding.param_spec((1024, 6), 4, 1024) == P('fsdp', None)
  assert sharding.param_spec((1023, 7), 4, 1024) == P()   # nothing divisible
  assert sharding.param_spec((256, 1024), 1, 1024) == P()  # no fsdp


def test_state_shardings_place_leaves():
  m = sharding.make_mesh(mesh_config(2, 4))
  tree = {'big': jax.ShapeDtypeStruct((512, 256), jnp.float32),
          'small': jax.ShapeDtypeStruct((8,), jnp.float32)}
  sh = sharding.state_shardings(tree, m, min_size=1024)
  x = jax.device_put(jnp.ones((512, 256)), sh['big'])
  # Each device holds 1/4 of the big leaf along its largest dim (fsdp), replicated over data.
  assert x.addressable_shards[0].data.shape == (128, 256)
  assert sh['small'].spec == P()


def test_global_batch_is_sharded_over_all_devices():
  m = sharding.make_mesh(mesh_config(-1, 2))
  local = {'x': np.arange(16 * 3, dtype=np.float32).reshape(16, 3)}
  g = sharding.global_batch(local, m)
  assert g['x'].shape == (16, 3)
  assert {s.data.shape for s in g['x'].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(g['x']), local['x'])
