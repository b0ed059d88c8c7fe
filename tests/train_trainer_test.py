"""Trainer: configs whose objective could not work are refused before anything runs."""

import pytest

from jaisp_jax.cli import UserError
from jaisp_jax.train import config as config_lib
from jaisp_jax.train import loop


def test_reconstruction_without_chips_is_refused_not_silently_off():
  c = config_lib.sized(config_lib.base_config(), 'smoke')
  c.model.recon.enabled = True
  c.data.chips_per_batch = 0
  with pytest.raises(UserError, match='chips_per_batch'):
    loop.Trainer(c)
  c.data.chips_per_batch = c.data.pairs_per_batch  # what the hybrid needs
  trainer = loop.Trainer(c)
  assert 'chips' in trainer._example  # the reconstruction term gets its chips
