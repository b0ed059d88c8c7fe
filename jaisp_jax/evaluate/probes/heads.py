"""Small probe heads on frozen features: linear or 2-layer MLP, trained in seconds with optax.

Inputs are standardised with the training set's mean and std; training is full-batch
AdamW from a fixed seed with early stopping: a held-out share of the training examples
(`val_fraction`, split by `groups` when given, e.g. by chip, so that correlated examples
never straddle the split) is scored every `eval_every` steps and the parameters with the
lowest validation loss are kept. So a head is a deterministic function of (features,
labels, config), and a head on features that carry nothing stops early and predicts
about the mean instead of fitting noise. `shuffle_labels` permutes the labels across
training examples before fitting: the control that a probe which always "succeeds"
fails (it should land at chance).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """How a probe head is fitted.

  Attributes:
    hidden: hidden width of the 2-layer MLP; 0 = linear.
    steps: at most this many full-batch optimiser steps.
    lr: AdamW learning rate.
    weight_decay: AdamW decoupled weight decay.
    val_fraction: share of the examples (or groups) held out for early stopping.
    eval_every: validation interval (steps).
    seed: parameter init, validation split and label shuffle seed.
  """
  hidden: int = 64
  steps: int = 300
  lr: float = 3e-3
  weight_decay: float = 1e-4
  val_fraction: float = 0.2
  eval_every: int = 10
  seed: int = 0


def _init(key, d_in: int, d_out: int, hidden: int):
  # The output layer starts at zero: an untrained (or early-stopped at step 0) head
  # predicts the training mean, i.e. chance, never random noise.
  if hidden <= 0:
    return {'w': jnp.zeros((d_in, d_out)), 'b': jnp.zeros((1, d_out))}
  return {'w1': jax.random.normal(key, (d_in, hidden)) * np.sqrt(2.0 / d_in),
          'b1': jnp.zeros((1, hidden)),
          'w2': jnp.zeros((hidden, d_out)),
          'b2': jnp.zeros((1, d_out))}


def _apply(params, x):
  if 'w' in params:
    return x @ params['w'] + params['b']
  h = jax.nn.gelu(x @ params['w1'] + params['b1'])
  return h @ params['w2'] + params['b2']


# A loss is a module-level function loss(prediction, target, *loss_args) -> scalar, so
# that the compiled training loop is reused across heads (see `_trainer`).
Loss = Callable[..., jax.Array]


def mse(pred, target):
  """Mean squared error."""
  return jnp.mean(jnp.square(pred - target))


def weighted_bce(logits, target, pos_weight):
  """Binary cross-entropy on logits with positives weighted by `pos_weight` (a loss arg)."""
  per = optax.sigmoid_binary_cross_entropy(logits, target)
  return jnp.mean(per * (1.0 + (pos_weight - 1.0) * target))


@functools.lru_cache(maxsize=32)
def _trainer(loss: Loss, lr: float, weight_decay: float, every: int):
  """(optimizer, jitted chunk of `every` steps, jitted validation loss), cached: heads
  with the same loss and settings (e.g. a head and its shuffled-label control, or the
  trained and the untrained model) compile once per input shape."""
  tx = optax.adamw(lr, weight_decay=weight_decay)

  def chunk(params, opt_state, xs, ys, loss_args):
    def step(carry, _):
      p, s = carry
      value, grads = jax.value_and_grad(lambda q: loss(_apply(q, xs), ys, *loss_args))(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), value
    return jax.lax.scan(step, (params, opt_state), None, length=every)

  def val_loss(params, xv, yv, loss_args):
    return loss(_apply(params, xv), yv, *loss_args)

  return tx, jax.jit(chunk), jax.jit(val_loss)


@dataclasses.dataclass
class Head:
  """A fitted head: `predict(x)` -> (n, d_out) outputs (logits for classification)."""
  params: dict
  mean: np.ndarray
  std: np.ndarray
  y_mean: np.ndarray
  y_std: np.ndarray
  final_loss: float
  # Optimiser steps of the kept parameters: 0 = validation never improved on the
  # initial head (a constant prediction: the training mean), whatever the features.
  best_step: int = -1

  def predict(self, x: np.ndarray) -> np.ndarray:
    xs = (np.asarray(x, np.float32) - self.mean) / self.std
    out = np.asarray(_predict(self.params, jnp.asarray(xs)))
    return out * self.y_std + self.y_mean


@jax.jit
def _predict(params, x):
  return _apply(params, x)


def _val_split(n: int, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
  """Boolean (n,) mask of validation examples (whole groups), never all or none."""
  rng = np.random.default_rng(seed + 2)
  if fraction <= 0 or n < 5:
    return np.zeros(n, bool)
  if groups is None:
    groups = np.arange(n)
  uniq = np.unique(groups)
  if len(uniq) < 2:
    uniq, groups = np.arange(n), np.arange(n)
  n_val = min(max(1, int(round(fraction * len(uniq)))), len(uniq) - 1)
  return np.isin(groups, rng.permutation(uniq)[:n_val])


def fit(x: np.ndarray, y: np.ndarray, config: HeadConfig = HeadConfig(), *,
        loss: Loss = mse, loss_args: tuple = (), standardise_y: bool = True,
        shuffle_labels: bool = False, groups: np.ndarray | None = None) -> Head:
  """Fits a head mapping x (n, d_in) -> y (n, d_out) (module docstring).

  Args:
    loss: module-level loss(prediction, target, *loss_args) in standardised target units.
    loss_args: extra (dynamic) arguments of the loss, e.g. (pos_weight,).
    standardise_y: regress (y - mean) / std (regression); False for 0/1 targets.
    shuffle_labels: permute y across examples first (the chance control).
    groups: (n,) group of each example (e.g. its chip) for the validation split.
  """
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  if y.ndim == 1:
    y = y[:, None]
  if x.shape[0] != y.shape[0] or x.shape[0] == 0:
    raise ValueError(f'need matching, non-empty x and y; got {x.shape} and {y.shape}')
  if shuffle_labels:
    y = y[np.random.default_rng(config.seed + 1).permutation(y.shape[0])]
  val = _val_split(x.shape[0], None if groups is None else np.asarray(groups),
                   config.val_fraction, config.seed)
  fit_x, fit_y = x[~val], y[~val]
  mean = fit_x.mean(axis=0)
  std = np.maximum(fit_x.std(axis=0), 1e-6)
  if standardise_y:
    y_mean, y_std = fit_y.mean(axis=0), np.maximum(fit_y.std(axis=0), 1e-6)
  else:
    y_mean, y_std = np.zeros(y.shape[1], np.float32), np.ones(y.shape[1], np.float32)

  def norm(a, b):
    return jnp.asarray((a - mean) / std), jnp.asarray((b - y_mean) / y_std)

  xs, ys = norm(fit_x, fit_y)
  xv, yv = norm(x[val], y[val])
  every = max(1, min(config.eval_every, config.steps))
  tx, chunk, val_loss = _trainer(loss, float(config.lr), float(config.weight_decay), every)
  args = tuple(jnp.asarray(a, jnp.float32) for a in loss_args)
  params = _init(jax.random.key(config.seed), x.shape[1], y.shape[1], config.hidden)
  opt_state = tx.init(params)
  has_val = bool(val.any())
  best = (float(val_loss(params, xv, yv, args)) if has_val else np.inf, params, 0)
  train_loss = np.nan
  n_chunks = max(1, config.steps // every)
  for c in range(n_chunks):
    (params, opt_state), losses = chunk(params, opt_state, xs, ys, args)
    train_loss = float(losses[-1])
    if has_val:
      v = float(val_loss(params, xv, yv, args))
      if v < best[0]:
        best = (v, params, (c + 1) * every)
  best_step = n_chunks * every
  if has_val:
    params, best_step = best[1], best[2]
  return Head(jax.device_get(params), mean, std, y_mean, y_std, train_loss, best_step)
