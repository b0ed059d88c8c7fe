"""Inference: load an exported bundle and embed images of any band.

    from jaisp_jax import inference
    model = inference.load('runs/smoke/export')
    out = model.get_representation(image, rms, 'rubin_r')   # image, rms: (B, 1, H, W)
    out['tokens']   # (B, N, D) sky-aligned token grid (N = H/s * W/s, s = band stride)
    out['global']   # (B, D) global embedding
    out['weights']  # (B, 1, H, W) information map (where the sources are)

`image` and `rms` are real-valued arrays (NumPy of any float or int dtype and byte
order, JAX arrays or nested lists) in any consistent flux unit: each sample is divided
by its median valid rms on the host, in float64, before the float32 model sees it, so
units whose values lie outside float32's range work too. NaN/Inf pixels and
non-positive rms are masked (weight 0). H and W must be multiples of the band's
stride (token size / pixel scale, e.g. 16 px for Rubin at 3.2", 32 px for Euclid);
other sizes raise ValueError (crop or pad them). `band` is a registry name such as
'rubin_r' or 'euclid_vis' (exact; an unknown name raises ValueError listing the known
ones). Each sample's result does not depend on the others in the batch.
"""

from __future__ import annotations

import os
from typing import Any

import flax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax import numpy as jnp

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
    """{'tokens' (B, N, D), 'global' (B, D), 'weights' (B, 1, H, W)} of one band's images.

    N = (H / s) * (W / s) with s the band's stride; float32 NumPy arrays (see the
    module docstring for the inputs). Also 'token_weights' (B, N), and the variant's
    extras ('objects' for detr_jepa, 'embedding' for clip).
    """
    names = self.registry.names
    if not isinstance(band, str):
      raise TypeError(f'band must be a band name (str) such as {names[0]!r}, got '
                      f'{type(band).__name__} {band!r}')
    if band not in self.registry:
      key = band.strip().lower()
      near = [n for n in names if key in (n.lower(), n.lower().split('_', 1)[-1])]
      hint = f' (did you mean {" or ".join(map(repr, near))}?)' if near else ''
      raise ValueError(f'unknown band {band!r}{hint}; this model knows {", ".join(names)}')
    image, rms = _real_array(image, 'image'), _real_array(rms, 'rms')
    if image.ndim != 4 or image.shape[1] != 1 or rms.shape != image.shape:
      raise ValueError(f'image and rms must both be (B, 1, H, W); got {image.shape} and '
                       f'{rms.shape}')
    image, rms = _noise_units(image, rms)
    try:
      out = jaisp.get_representation({'params': self.params}, image, rms, band,
                                     self.model_config, self.registry)
    except flax.errors.ScopeParamShapeError as e:  # config.json edited apart from params
      raise ValueError(f'the bundle\'s config does not match its parameters: '
                       f'{str(e).splitlines()[0]}') from None
    return _to_numpy(out)


def _real_array(x: Any, what: str) -> np.ndarray:
  """`x` as a float64 NumPy array, or a clear error naming `what`."""
  try:
    a = np.asarray(x)
  except (TypeError, ValueError) as e:  # e.g. ragged nested lists
    raise ValueError(f'{what} must be a (B, 1, H, W) array of numbers: {e}') from None
  if not (jnp.issubdtype(a.dtype, jnp.floating) or jnp.issubdtype(a.dtype, jnp.integer)
          or a.dtype == np.bool_):
    raise TypeError(f'{what} must hold real numbers (float or int), got dtype {a.dtype}')
  return a.astype(np.float64)


def _noise_units(image: np.ndarray, rms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(B, 1, H, W) float64 image and rms divided by each sample's median valid rms, as float32.

  The model divides by the median valid rms too (in float32, on the device); doing it
  here first, in float64, keeps units whose values float32 cannot hold (or holds only
  as denormals, which XLA flushes to zero) from being masked or lost. Invalid pixels
  stay invalid (NaN/Inf or rms <= 0), so the model masks the same pixels.
  """
  valid = np.isfinite(image) & np.isfinite(rms) & (rms > 0)
  med = np.array([np.median(r[v]) if v.any() else 1.0 for r, v in zip(rms, valid)])
  med = med.reshape(-1, 1, 1, 1)
  with np.errstate(over='ignore', under='ignore'):  # beyond float32: inf / 0, masked
    return (image / med).astype(np.float32), (rms / med).astype(np.float32)


def _to_numpy(tree: dict) -> dict:
  return {k: _to_numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


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
  from jaisp_jax.train.export import FORMAT_VERSION  # pylint: disable=g-import-not-at-top
  version = manifest.get('format_version', FORMAT_VERSION)
  if (not isinstance(version, int) or isinstance(version, bool)
      or not 1 <= version <= FORMAT_VERSION):
    # A newer layout may hold the same file names with another meaning: refuse it
    # rather than load something that only looks right.
    raise UserError(f'{export_dir}/manifest.json: bundle format_version {version!r}; this '
                    f'jaisp-jax reads format_version 1 to {FORMAT_VERSION} (upgrade '
                    'jaisp-jax, or export the run again with this one)')
  try:
    params = ocp.StandardCheckpointer().restore(os.path.join(export_dir, 'params'))
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{export_dir}/params: cannot restore the parameters '
                    f'({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""})') from None
  return Representation(params, config, registry, manifest)
