"""inference: bundles written before a config field existed still load, with its default."""

import json

import pytest

from jaisp_jax import inference
from jaisp_jax.cli import UserError
from jaisp_jax.train import config as config_lib


def test_old_bundle_config_gets_new_fields_defaults_and_keeps_its_values():
  saved = json.loads(config_lib.sized(config_lib.base_config(), 'smoke').to_json_best_effort())
  del saved['model']['global_pool']          # written before the field existed
  saved['model']['trunk']['embed_dim'] = 48  # a value that differs from the default
  c = inference._with_defaults(saved)
  assert c.model.global_pool == 'mean'       # the old behaviour
  assert c.model.trunk.embed_dim == 48
  assert c.model.trunk.depth == 2            # the bundle's smoke value, not base's 6


def test_missing_bundle_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='not an exported jaisp-jax bundle'):
    inference.load(str(tmp_path))
