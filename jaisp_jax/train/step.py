"""The train step: pure, module level, jitted with explicit shardings by the loop.

    state, metrics = train_step(state, batch, loss_fn=..., tx=..., schedule=..., ema=..., total_steps=...)

`loss_fn(params, ema_params, batch, rng) -> (loss, metrics)` computes the configured
objective(s): the online branch with `params`, the target branch with
`ema_params` (which the loss must wrap in `stop_gradient`; gradients are only
taken with respect to `params` anyway). Everything else is bound with
`functools.partial` before `jax.jit`, so the step has no hidden state.

Non-finite loss or gradients: the update is skipped (state unchanged except the
step counter and `skipped`), the step is reported in `metrics['skipped']`, and the
host loop stops the run after `max_consecutive_skips` in a row. The step counter
still advances so a skipped batch is not retried forever.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaisp_jax.train import state as state_lib

LossFn = Callable[[Any, Any, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def train_step(state: state_lib.TrainState, batch: Any, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, schedule: optax.Schedule,
               ema: ml_collections.ConfigDict, total_steps: int
               ) -> tuple[state_lib.TrainState, dict[str, jax.Array]]:
  """One optimizer update plus the EMA target update. Pure; see module docstring."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.ema_params, batch, rng)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  momentum = state_lib.ema_momentum(ema, state.step, total_steps)
  new_ema = state_lib.ema_update(state.ema_params, new_params, momentum)

  finite = jnp.isfinite(loss) & _all_finite(grads)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(new_params, state.params),
      ema_params=keep(new_ema, state.ema_params),
      opt_state=keep(new_opt_state, state.opt_state),
      skipped=jnp.where(finite, 0, state.skipped + 1).astype(jnp.int32))
  metrics = dict(metrics)
  metrics.update(
      loss=loss,
      grad_norm=optax.tree.norm(grads),
      param_norm=optax.tree.norm(state.params),
      update_norm=optax.tree.norm(updates),
      learning_rate=schedule(state.step),
      ema_momentum=momentum,
      skipped=(~finite).astype(jnp.int32),
      consecutive_skips=new_state.skipped)
  return new_state, metrics
