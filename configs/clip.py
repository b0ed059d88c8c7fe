r"""CLIP-style (seed 003): one multi-band encoder per instrument (all bands as channels),
CLS -> projection head -> symmetric NT-Xent with negatives over the global batch.

    python -m jaisp_jax.main --config=configs/clip.py:smoke --workdir=runs/clip_smoke

Sizes: smoke, base (6 layers, 6 heads, 384 dim as in the seed), pod. Uses all-band chips
(config.data.chips_per_batch) rather than view pairs. Expect the NT-Xent loss to fall below
log(batch) and retrieval top-1 to rise fast; it learns global, not sub-pixel, information.
"""

from jaisp_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.sized(config_lib.base_config(), arg or 'base')
  c.model.variant = 'clip'
  c.data.chips_per_batch = c.data.pairs_per_batch
  return config_lib.lock(c)
