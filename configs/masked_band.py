r"""Masked-band reconstruction: hide one band of a chip and reconstruct its pixels from the
other bands through stems -> shared trunk -> pixel decoder; information-weighted Charbonnier
loss in noise units. The control for whether latent objectives keep sub-pixel information.

    python -m jaisp_jax.main --config=configs/masked_band.py:smoke --workdir=runs/masked_smoke

Sizes: smoke, base, pod. Expect the reconstruction loss to fall steadily (it has no collapse
mode); the hybrid is configs/jepa.py with --config.model.recon.enabled=True.
"""

from jaisp_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.sized(config_lib.base_config(), arg or 'base')
  c.model.variant = 'masked_band'
  c.model.recon.enabled = True
  c.data.chips_per_batch = c.data.pairs_per_batch
  return config_lib.lock(c)
