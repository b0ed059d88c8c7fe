r"""Two-view (seed 001): one encoder (stems + trunk) per instrument into a shared space,
token alignment + VICReg, EMA target optional (--config.loss.two_view_ema).

    python -m jaisp_jax.main --config=configs/two_view.py:smoke --workdir=runs/two_view_smoke

Sizes: smoke, base, pod (see configs/jepa.py). Expect the same curves as jepa; it has twice the
trunk parameters, so compare at equal steps, not equal parameters.
"""

from jaisp_jax.train import config as config_lib


def get_config(arg=None):
  c = config_lib.sized(config_lib.base_config(), arg or 'base')
  c.model.variant = 'two_view'
  return config_lib.lock(c)
