"""Training objectives: pure, jittable functions of model outputs.

Each module's docstring states its formula. Losses return ``(loss, metrics)`` with
float32 scalars; all batch statistics are global under jit with sharded inputs.

  jepa            information-weighted token JEPA, token_similarity
  vicreg          VICReg variance / covariance, effective_dim, rankme
  ntxent          symmetric NT-Xent (global negatives)
  reconstruction  masked-band Charbonnier loss in rms units
  shift           sub-pixel shift regression (mas)
  matching        jittable, batched linear_sum_assignment (scipy's contract)
  slots           DETR-JEPA matched-slot loss, objectness targets
  losses          total loss per model variant, train-step loss_fn (imports models;
                  import it as jaisp_jax.objectives.losses)
"""

from jaisp_jax.objectives.jepa import cosine_similarity, jepa_loss, token_similarity
from jaisp_jax.objectives.matching import linear_sum_assignment
from jaisp_jax.objectives.ntxent import nt_xent
from jaisp_jax.objectives.reconstruction import masked_band_loss
from jaisp_jax.objectives.shift import shift_loss
from jaisp_jax.objectives.slots import matched_slot_loss
from jaisp_jax.objectives.vicreg import effective_dim, rankme, vicreg_loss

__all__ = [
    'cosine_similarity', 'effective_dim', 'jepa_loss', 'linear_sum_assignment',
    'masked_band_loss', 'matched_slot_loss', 'nt_xent', 'rankme', 'shift_loss',
    'token_similarity', 'vicreg_loss',
]
