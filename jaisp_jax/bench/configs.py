"""Experiment configs for the harness: `configs/<exp>.py[:<size>]` plus overrides.

The same spelling as `python -m jaisp_jax.main --config=...`: the file's
`get_config(arg)` builds the (locked) config, and `--config.<field>=<value>` arguments
override fields, parsed with the type of the field they replace (a misspelt field
fails with the valid keys, as in main).
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError
from jaisp_jax.data import pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/jepa.py:smoke' -> ('configs/jepa.py', 'smoke')."""
  path, _, arg = spec.partition(':')
  return path, (arg or None)


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Builds the config of `spec` ('path.py[:arg]') and applies `--config.k=v` overrides."""
  path, arg = split_spec(spec)
  if not os.path.exists(path) and os.path.exists(os.path.join(_REPO, path)):
    path = os.path.join(_REPO, path)
  if not os.path.exists(path):
    raise UserError(f'--config: no config file {path!r} (expected e.g. configs/jepa.py:smoke)')
  module_spec = importlib.util.spec_from_file_location('_bench_config', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    config = module.get_config(arg)
  except ValueError as e:
    raise UserError(f'--config={spec}: {e}') from None
  for item in overrides:
    apply_override(config, item)
  return config


def apply_override(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one '--config.a.b=value' (value parsed as the current field's type)."""
  if not item.startswith('--config.') or '=' not in item:
    raise UserError(f'unexpected argument {item!r}; overrides read --config.<field>=<value>')
  key, value = item[len('--config.'):].split('=', 1)
  *parents, leaf = key.split('.')
  node = config
  try:
    for p in parents:
      node = node[p]
    current = node[leaf]
  except (KeyError, AttributeError, TypeError):  # TypeError: indexing into a leaf value
    raise UserError(f'--config.{key}: no such field ({_fields_near(config, key)})') from None
  node[leaf] = _parse_like(value, current, key)


def _fields_near(config: ml_collections.ConfigDict, key: str) -> str:
  """'config.model has ...' for the deepest existing parent of `key`, closest name first."""
  node, path = config, 'config'
  for part in key.split('.')[:-1]:
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      break
    node, path = node[part], f'{path}.{part}'
  if not isinstance(node, ml_collections.ConfigDict):
    return f'{path} holds a value ({type(node).__name__}), not a group of fields'
  names = sorted(node.keys())
  missing = key.split('.')[len(path.split('.')) - 1]
  close = difflib.get_close_matches(missing, names, n=1)
  hint = f'did you mean {path}.{close[0]}? ' if close else ''
  return f'{hint}{path} has: {", ".join(names)}'


_KIND = {int: 'an integer', float: 'a number'}


def _parse_like(value: str, current, key: str):
  if isinstance(current, bool):
    if value.lower() in ('1', 'true', 'yes'):
      return True
    if value.lower() in ('0', 'false', 'no'):
      return False
    raise UserError(f'--config.{key}={value}: expected true or false')
  if isinstance(current, (int, float)) and not isinstance(current, bool):
    try:
      return type(current)(float(value) if isinstance(current, float) else int(value))
    except ValueError:
      raise UserError(f'--config.{key}={value}: expected {_KIND[type(current)]}') from None
  if isinstance(current, str):
    return value
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    raise UserError(f'--config.{key}={value}: not a Python literal') from None


def parse_quotas(text: str) -> dict[str, int]:
  """'rubin-rubin=16,rubin-euclid=8' -> {'rubin-rubin': 16, 'rubin-euclid': 8}."""
  out = {}
  for part in filter(None, text.split(',')):
    combo, _, n = part.partition('=')
    try:
      out[combo.strip()] = int(n)
    except ValueError:
      raise UserError(f'--quotas: {part!r} is not combo=count') from None
  return out


def bench_quotas(config: ml_collections.ConfigDict, registry: bands_lib.BandRegistry,
                 data_parallel: int, explicit: str | None = None) -> dict[str, int]:
  """Pairs per instrument combination of the benchmark batch.

  `explicit` ('combo=n,...') wins; otherwise the training pipeline's quotas (for the
  `torch_ref` size, whose registry is Rubin's: all pairs rubin-rubin, 128 x 128 px,
  the PyTorch reference's work per step).
  """
  if explicit:
    quotas = parse_quotas(explicit)
  else:
    quotas = pipeline.batch_quotas(config.data, registry, data_parallel)
  bad = [c for c, n in quotas.items() if n % data_parallel]
  if bad:
    raise UserError(f'quotas {quotas}: {bad} not a multiple of the {data_parallel} batch shards')
  return {c: n for c, n in quotas.items() if n > 0}
