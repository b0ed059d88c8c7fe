"""Trainer: the model, loss, optimizer, train state and jitted step of a config.

The pieces of a run that depend only on the config, shared by training
(`loop.train_and_evaluate`), evaluation, export, inference and the benchmark. This
module imports no TensorFlow and no clu (those come with the training loop's
TensorBoard writing), so the step can be built and timed on an accelerator host that
has only the JAX stack, grain and ml_collections (`python -m jaisp_jax.bench step`).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import ml_collections

from jaisp_jax import bands as bands_lib
from jaisp_jax import xla_options
from jaisp_jax.cli import ConfigError, UserError, first_line
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.data import pipeline
from jaisp_jax.models import jaisp
from jaisp_jax.objectives import losses
from jaisp_jax.train import sharding
from jaisp_jax.train import state as state_lib
from jaisp_jax.train import step as step_lib


def example_batch(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                  data_parallel: int) -> dict:
  """A small batch with the structure (not the size) of the training batches, for init."""
  quotas = pipeline.batch_quotas(config.data, registry, data_parallel)
  batch = {'pairs': batch_lib.synthetic_pairs_batch(
      0, registry, {k: 1 for k, v in quotas.items() if v > 0}, config.data.crop_arcsec)}
  if config.data.chips_per_batch > 0:
    batch['chips'] = batch_lib.synthetic_chips_batch(0, registry, 1, config.data.crop_arcsec)
  return batch


@contextlib.contextmanager
def config_errors(what: str):
  """A ValueError raised while tracing `what` (the model or the step) for a config, such as an
  unknown stem kind, a width its heads do not divide or a crop that is no whole number of
  tokens, as a ConfigError: one line on the command line, not a traceback from inside the
  trace. The ValueError stays chained as the cause for library callers."""
  try:
    yield
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(f'the config cannot build {what}: '
                      f'{first_line(e) or type(e).__name__}') from e


class Trainer:
  """The pieces of a run that depend only on the config (shared by train, eval, export)."""

  def __init__(self, config: ml_collections.ConfigDict, mesh=None):
    if config.model.recon.enabled and config.data.chips_per_batch <= 0:
      # The reconstruction term needs all-band chips (batch['chips']); without them it
      # would silently be off and the run would be plain JEPA under another name.
      raise UserError('model.recon.enabled=True reconstructs hidden bands of all-band chips: '
                      'set data.chips_per_batch > 0 (e.g. --config.data.chips_per_batch='
                      f'{config.data.pairs_per_batch})')
    self.config = config
    self.registry = bands_lib.BandRegistry.from_config(config.bands)
    self.mesh = sharding.make_mesh(config) if mesh is None else mesh
    self.batch_sharding = sharding.batch_sharding(self.mesh)
    self.model = jaisp.JAISP(config.model, self.registry)
    self.tx = state_lib.make_optimizer(config.optim, config.total_steps)
    self.schedule = state_lib.learning_rate_schedule(config.optim, config.total_steps)
    self._example = example_batch(config, self.registry, sharding.data_size(self.mesh))

  def init_state(self, rng: jax.Array) -> state_lib.TrainState:
    """A fresh train state from a PRNG key (pure; jitted with output shardings)."""
    k_params, k_mask, k_state = jax.random.split(rng, 3)
    params = self.model.init({'params': k_params, 'mask': k_mask}, self._example)['params']
    return state_lib.create_state(params, self.tx, jax.random.key_data(k_state))

  def abstract_state(self):
    """(abstract state with shardings, shardings) without allocating anything."""
    with config_errors('the model'):
      abstract = jax.eval_shape(self.init_state, jax.random.key(0))
    shardings = sharding.state_shardings(abstract, self.mesh, self.config.mesh.min_shard_size)
    with_sh = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           abstract, shardings)
    return with_sh, shardings

  def fresh_state(self, shardings) -> state_lib.TrainState:
    init = self.jit(self.init_state, out_shardings=shardings)
    return init(jax.random.key(self.config.seed))

  def jitted_step(self, shardings):
    step = functools.partial(
        step_lib.train_step, loss_fn=losses.make_loss_fn(self.model, self.config, self.registry),
        tx=self.tx, schedule=self.schedule, ema=self.config.ema,
        total_steps=self.config.total_steps)
    return self.jit(step, in_shardings=(shardings, self.batch_sharding),
                    out_shardings=(shardings, sharding.replicated(self.mesh)),
                    donate_argnums=0)

  def jit(self, fn, **kwargs):
    """`jax.jit` with the compiler options of the mesh's platform (jaisp_jax.xla_options)."""
    return xla_options.jit(fn, platform=xla_options.mesh_platform(self.mesh),
                           cpu_convolutions=self.config.cpu_convolutions, **kwargs)
