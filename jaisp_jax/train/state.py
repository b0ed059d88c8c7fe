"""The train state (one pytree), the optimizer and the EMA target update.

`TrainState` holds everything a step reads and writes, so that a checkpoint of it
(plus the data iterator's state) is a complete description of a run:

  step        int32 scalar, number of optimizer updates applied so far
  params      online parameters (trained by the optimizer)
  ema_params  target parameters: an exponential moving average of `params`; the
              target branch is evaluated with these and receives no gradient
  opt_state   optax state
  rng         base PRNG key; step keys are `fold_in(rng, step)`, so a resumed run
              draws exactly the numbers an uninterrupted one would
  skipped     int32 scalar, consecutive non-finite steps skipped (the host stops
              the run when it reaches `config.max_consecutive_skips`)
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `optim.lr`, then cosine decay to `lr * min_lr_ratio`."""
  warmup = int(min(optim.warmup_steps, max(total_steps - 1, 0)))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.min_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: matrices and kernels, not biases/norms.

  Stacked per-band stem biases are 2-D ((n_bands, C)) yet are biases: the rule
  therefore looks at the leaf's name as well as its rank.
  """
  def rule(path, x):
    name = str(getattr(path[-1], 'key', path[-1])) if path else ''
    if name in ('bias', 'scale') or 'pos_embed' in name or name.endswith('_bias'):
      return False
    return x.ndim > 1

  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """AdamW with warmup + cosine, global-norm clipping, no decay on biases/norms."""
  schedule = learning_rate_schedule(optim, total_steps)
  return optax.chain(
      optax.clip_by_global_norm(optim.clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))


def ema_momentum(ema: ml_collections.ConfigDict, step: jax.Array, total_steps: int) -> jax.Array:
  """Target momentum at `step`: rises from `ema.momentum` to `ema.momentum_end`.

  I-JEPA raises it linearly (0.996 -> 1.0 over training); BYOL/DINO use a cosine.
  A rising momentum freezes the target as the online network converges.
  """
  t = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  if ema.schedule == 'linear':
    frac = t
  elif ema.schedule == 'cosine':
    frac = 0.5 * (1.0 - jnp.cos(jnp.pi * t))
  elif ema.schedule == 'constant':
    frac = jnp.zeros_like(t)
  else:
    raise ValueError(f'config.ema.schedule={ema.schedule!r}: expected linear, cosine or constant')
  return ema.momentum + (ema.momentum_end - ema.momentum) * frac


def ema_update(ema_params: Any, params: Any, momentum: jax.Array) -> Any:
  """ema <- m * ema + (1 - m) * params (leafwise, in the parameters' dtype)."""
  return jax.tree.map(lambda e, p: (momentum * e + (1.0 - momentum) * p).astype(e.dtype),
                      ema_params, params)


def create_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """A fresh state: the target starts as a copy of the online parameters."""
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params), rng=rng,
      skipped=jnp.zeros((), jnp.int32))
