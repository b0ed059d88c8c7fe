"""Inference: load an exported bundle and embed images of any band.

    from jaisp_jax import inference
    model = inference.load('runs/smoke/export')
    out = model.get_representation(image, rms, 'rubin_r')   # image, rms: (B, 1, H, W)
    out['tokens']   # (B, N, D) sky-aligned token grid (N = H/s * W/s, s = band stride)
    out['global']   # (B, D) global embedding
    out['weights']  # (B, 1, H, W) information map (where the sources are)

`image` and `rms` are in any consistent flux unit (they are divided by the median
rms); NaN/Inf pixels and non-positive rms are masked. H and W must be multiples of
the band's stride (token size / pixel scale, e.g. 16 px for Rubin at 3.2").
"""

from __future__ import annotations

import os
from typing import Any

import flax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError, read_json
from jaisp_jax.models import jaisp

_FILES = ('params', 'config.json', 'bands.json', 'manifest.json')


class Representation:
  """A loaded bundle: the EMA target encoder with its config and band registry."""

  def __init__(self, params: Any, config: ml_collections.ConfigDict,
               registry: bands_lib.BandRegistry, manifest: dict):
    self.params = params
    self.config = config
    self.registry = registry
    self.manifest = manifest
    self.model_config = ml_collections.FrozenConfigDict(config.model)

  def get_representation(self, image, rms, band: str) -> dict[str, np.ndarray]:
    """{'tokens' (B, N, D), 'global' (B, D), 'weights' (B, 1, H, W)} of one band's images."""
    if band not in self.registry:
      raise ValueError(f'unknown band {band!r}; this model knows {", ".join(self.registry.names)}')
    try:
      out = jaisp.get_representation({'params': self.params}, np.asarray(image, np.float32),
                                     np.asarray(rms, np.float32), band, self.model_config,
                                     self.registry)
    except flax.errors.ScopeParamShapeError as e:  # config.json edited apart from params
      raise ValueError(f'the bundle\'s config does not match its parameters: '
                       f'{str(e).splitlines()[0]}') from None
    return {k: (np.asarray(v) if not isinstance(v, dict) else v) for k, v in out.items()}


def from_params(params: Any, config: ml_collections.ConfigDict,
                registry: bands_lib.BandRegistry | None = None) -> Representation:
  """A `Representation` of in-memory parameters (e.g. a model at initialisation)."""
  registry = registry or bands_lib.BandRegistry.from_config(config.bands)
  return Representation(params, config, registry, {'variant': config.model.variant})


def init_params(config: ml_collections.ConfigDict, seed: int | None = None) -> Any:
  """Parameters of `config`'s architecture at initialisation (the untrained baseline)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaisp_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  trainer = trainer_lib.Trainer(config)
  seed = config.seed if seed is None else seed
  return jax.device_get(trainer.jit(trainer.init_state)(jax.random.key(seed)).ema_params)


def _merge(into: dict, saved: dict) -> dict:
  for k, v in saved.items():
    if isinstance(v, dict) and isinstance(into.get(k), dict):
      _merge(into[k], v)
    else:
      into[k] = v
  return into


def _with_defaults(saved: dict) -> ml_collections.ConfigDict:
  """A bundle's config over today's defaults.

  Fields added to the package after the bundle was written take their defaults, which
  reproduce the behaviour of the version that wrote it (new options default to the
  old behaviour, e.g. model.global_pool 'mean'), so old bundles keep loading.
  """
  from jaisp_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(_merge(config_lib.base_config().to_dict(), saved))


def load(export_dir: str) -> Representation:
  """Loads a bundle written by `--mode=export` (see jaisp_jax.train.export)."""
  export_dir = os.path.abspath(export_dir)
  missing = [f for f in _FILES if not os.path.exists(os.path.join(export_dir, f))]
  if missing:
    raise UserError(f'{export_dir}: not an exported jaisp-jax bundle (missing '
                    f'{", ".join(missing)})')
  config = _with_defaults(read_json(os.path.join(export_dir, 'config.json')))
  bands = read_json(os.path.join(export_dir, 'bands.json'), list)
  try:
    registry = bands_lib.BandRegistry.from_dicts(bands)
  except Exception as e:  # pylint: disable=broad-except  # malformed entries
    raise UserError(f'{export_dir}/bands.json: not a band registry ({type(e).__name__}: '
                    f'{e})') from None
  manifest = read_json(os.path.join(export_dir, 'manifest.json'))
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(export_dir, 'params'))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{export_dir}/params: cannot restore the parameters '
                    f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
  return Representation(params, config, registry, manifest)
