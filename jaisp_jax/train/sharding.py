"""Device mesh, parameter partitioning and batch sharding.

The mesh has two axes:
  'data': pure data parallelism (parameters replicated across it);
  'fsdp': fully-sharded data parallelism (large parameters and their optimizer
          moments split across it; the batch is split across it too).

The batch's leading axis is sharded over both axes, so every device sees a
different slice of the global batch. Parameters follow shape-based rules: small
leaves (biases, norms, stems) are replicated, since sharding them costs more in
collectives than it saves in memory; large leaves are split along their largest
dimension that the fsdp size divides. Rules are a function of shapes only, so the
optimizer state (same shapes as the parameters) gets matching shardings for free.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaisp_jax.cli import ConfigError

DATA_AXES = ('data', 'fsdp')  # the batch's leading axis is split over both


def make_mesh(config: ml_collections.ConfigDict,
              devices: list[jax.Device] | None = None) -> Mesh:
  """Builds the ('data', 'fsdp') mesh from `config.mesh`.

  `config.mesh.fsdp` devices per fsdp group (1 = no fsdp); `config.mesh.data`
  data-parallel groups, -1 meaning "all remaining devices".
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = int(config.mesh.fsdp)
  data = int(config.mesh.data)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f'config.mesh.fsdp={fsdp} must divide the {n} available devices')
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ConfigError(f'config.mesh.data={data} x config.mesh.fsdp={fsdp} != {n} devices; '
                     f'use config.mesh.data=-1 to take all remaining devices')
  grid = np.asarray(devices).reshape(data, fsdp)
  return Mesh(grid, ('data', 'fsdp'))


def data_size(mesh: Mesh) -> int:
  """Number of batch shards (the global batch must be a multiple of it)."""
  return mesh.shape['data'] * mesh.shape['fsdp']


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of every batch leaf: leading axis over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """PartitionSpec of one parameter-shaped leaf (see module docstring)."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Largest dimension divisible by the fsdp size; ties go to the last one, which
  # is the output features of a Dense kernel (contiguous in memory).
  best = None
  for axis, dim in enumerate(shape):
    if dim % fsdp == 0 and (best is None or dim >= shape[best]):
      best = axis
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2 ** 16) -> Any:
  """Shardings for a pytree of arrays / ShapeDtypeStructs (the train state)."""
  fsdp = mesh.shape['fsdp']

  def leaf(x):
    shape = tuple(getattr(x, 'shape', ()))
    return NamedSharding(mesh, param_spec(shape, fsdp, min_size))

  return jax.tree.map(leaf, abstract_state)


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
  """Assembles per-process numpy batches into global jax.Arrays on the mesh.

  Every process passes its own slice (leading axis = global batch / process count);
  the result is sharded along the batch sharding, with no cross-host copy.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
