r"""DETR-JEPA (seed 002): trunk -> DETR decoder with Q object queries -> object slots of both
views matched by in-graph Hungarian assignment on cosine cost -> JEPA loss on matched slots +
VICReg on slots.

    python -m jaisp_jax.main --config=configs/detr_jepa.py:smoke --workdir=runs/detr_smoke

Sizes: smoke (16 queries), base (100 queries, 3 decoder layers), pod. Watch matched_similarity
(rising) and active_slots (should settle near the number of sources per view, not 0 or Q).
"""

from jaisp_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.sized(config_lib.base_config(), arg or 'base')
  c.model.variant = 'detr_jepa'
  return config_lib.lock(c)
