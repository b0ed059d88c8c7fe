r"""JEPA (seed 000, the default): per-band stems -> shared ViT trunk -> predictor vs EMA target,
information-weighted token loss + VICReg, cross-instrument / hard / random view pairs.

    python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir=runs/jepa_smoke

Sizes (the part after ':'): smoke (CPU, simulated sky, ~3 min on 2 cores), base (the seeds'
sizes: D 256, depth 6, 8 x 8 tokens), pod (ViT-B, bf16, fsdp), torch_ref (the PyTorch reference
benchmark's configuration, for `python -m jaisp_jax.bench step`). What to expect from smoke:
the loss falls from ~1.0, token_similarity rises above ~0.3 without jumping to ~1 (collapse),
and the held-out Rubin r -> Euclid VIS retrieval top-1 ends well above chance (eval/ in
TensorBoard). Variations: --config.model.shift.enabled=True (sub-pixel shift auxiliary),
--config.model.recon.enabled=True (hybrid JEPA + masked-band reconstruction).
"""

from jaisp_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.sized(config_lib.base_config(), arg or 'base')
  c.model.variant = 'jepa'
  return config_lib.lock(c)
