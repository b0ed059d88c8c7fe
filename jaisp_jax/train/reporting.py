"""Metric reporting for the train loop: clu writers, one-step-late fetches, progress lines.

Device metrics of step t are fetched to the host only after step t+1 has been
dispatched, so reading them never stalls the accelerator. They are averaged over
`log_every` steps, written through a clu `MetricWriter` (TensorBoard event files on
process 0, plain logging elsewhere) and printed as one line a person can follow.
"""

from __future__ import annotations

import collections
import math
import sys
import time
from typing import Any, Callable, Mapping

import jax
import numpy as np
from clu import metric_writers

# Metrics shown on the terminal progress line (all of them go to TensorBoard).
PROGRESS_KEYS = ('loss', 'token_similarity', 'var_min', 'effective_dim', 'grad_norm',
                 'learning_rate')


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  """TensorBoard + logging on process 0; logging only on the other processes."""
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=True)


def _fmt_secs(secs: float) -> str:
  if not math.isfinite(secs):
    return '?'
  secs = int(secs)
  return f'{secs // 3600}h{secs // 60 % 60:02d}m' if secs >= 3600 else f'{secs // 60}m{secs % 60:02d}s'


class MetricsLogger:
  """Accumulates per-step metrics and reports their means every `log_every` steps."""

  def __init__(self, writer: metric_writers.MetricWriter, *, log_every: int,
               total_steps: int, print_fn: Callable[[str], None] | None = None):
    self._writer = writer
    self._log_every = max(1, log_every)
    self._total = total_steps
    self._print = print_fn or (lambda s: print(s, file=sys.stderr, flush=True))
    self._pending: tuple[int, Any] | None = None
    self._sums: dict[str, float] = collections.defaultdict(float)
    self._count = 0
    self._t_last = time.perf_counter()
    self._step_last: int | None = None
    self.last: dict[str, float] = {}   # most recent per-step host metrics

  def push(self, step: int, device_metrics: Mapping[str, Any]) -> dict[str, float] | None:
    """Registers step `step`'s device metrics; returns the previous step's on host."""
    previous = self._pending
    self._pending = (step, device_metrics)
    return self._consume(previous)

  def flush(self) -> dict[str, float] | None:
    """Fetches the pending metrics and writes whatever is accumulated."""
    previous, self._pending = self._pending, None
    host = self._consume(previous)
    if self._count:
      self._write(self._step_last)
    self._writer.flush()
    return host

  def _consume(self, item) -> dict[str, float] | None:
    if item is None:
      return None
    step, metrics = item
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(dict(metrics)).items()
            if np.ndim(v) == 0}
    self.last = host
    for k, v in host.items():
      self._sums[k] += v
    self._count += 1
    self._step_last = step
    if step % self._log_every == 0 or step == self._total:
      self._write(step)
    return host

  def _write(self, step: int):
    means = {f'train/{k}': v / self._count for k, v in self._sums.items()}
    now = time.perf_counter()
    steps_per_s = self._count / max(now - self._t_last, 1e-9)
    means['train/steps_per_s'] = steps_per_s
    self._writer.write_scalars(step, means)
    eta = (self._total - step) / steps_per_s if steps_per_s > 0 else float('inf')
    shown = ' | '.join(f'{k} {means["train/" + k]:.4g}' for k in PROGRESS_KEYS
                       if 'train/' + k in means)
    self._print(f'step {step}/{self._total} | {shown} | {steps_per_s:.2f} steps/s | '
                f'ETA {_fmt_secs(eta)}')
    self._sums.clear()
    self._count = 0
    self._t_last = now
