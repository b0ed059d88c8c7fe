"""Train-step benchmark: the exact jitted step of training, timed on synthetic batches.

The step is the one `train_and_evaluate` runs (`Trainer.jitted_step`: explicit
shardings, donated state), lowered and compiled once ahead of time so that compile
time is reported apart from step time. Batches are synthetic (`data.batch`: Gaussian
sources on unit noise) with the benchmark's quotas, `n_batches` distinct ones cycled
through, already on the devices (the input pipeline is timed separately: `pipeline`).

Figures (`run_step` returns them; the CLI prints them and saves JSON):
  compile: lower_s, compile_s (and init_s of the sharded state); compilation_cache_dir
    where JAX's persistent compilation cache is on (compile_s may then be a cache read);
  cost (from `compiled.cost_analysis()`, per device = per SPMD program):
    flops_per_step_device, bytes_per_step_device, flops_per_step (x devices); XLA
    counts a loop body once, so when the step loops (the CPU per-sample stem
    convolutions, models/sample_conv.py) the FLOPs are counted on the same step
    compiled with the matmul form of those convolutions (`flops_counted_on`); off the
    CPU, where XLA's analysis leaves out library calls (cuBLAS, cuDNN), flops_* are the
    matmul FLOPs counted on the step's jaxpr (bench/flops.py), which
    matmul_flops_per_step_device reports on every platform;
  time: warm-up steps excluded; every timed step is blocked on and timed alone:
    step_median_s, step_min_s, step_max_s, step_p25_s, step_p75_s (spread),
    steps_per_s = steps / total timed seconds (as the PyTorch reference computes it),
    samples_per_s, tokens_per_s;
  throughput: flops_per_s (global, at the median step), flops_per_s_device,
    mfu = flops_per_s_device / the device's peak (`hardware.device_peak`); on
    accelerators also pipelined_steps_per_s / pipelined_mfu (steps dispatched back to
    back, blocked on once);
  memory: peak_rss_mb (host), device_peak_mb (accelerators), compiled temp/argument
    bytes per device (`compiled.memory_analysis()`).
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from jaisp_jax.bench import flops as flops_lib
from jaisp_jax.bench import hardware
from jaisp_jax.cli import UserError
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.models import sample_conv
from jaisp_jax.train import trainer as trainer_lib
from jaisp_jax.train import sharding

PAIR_VARIANTS = ('jepa', 'two_view', 'detr_jepa')


def make_batch(config: ml_collections.ConfigDict, registry, quotas: dict[str, int],
               seed: int) -> dict:
  """One synthetic host batch in the training format (pairs, plus chips if configured)."""
  batch = {'pairs': batch_lib.synthetic_pairs_batch(seed, registry, quotas,
                                                     config.data.crop_arcsec)}
  if config.data.chips_per_batch > 0:
    batch['chips'] = batch_lib.synthetic_chips_batch(
        seed, registry, int(config.data.chips_per_batch), config.data.crop_arcsec)
  return batch


def work_per_step(config: ml_collections.ConfigDict, registry,
                  quotas: dict[str, int]) -> tuple[int, int]:
  """(samples, trunk tokens) per step: pairs for the pair variants, chips otherwise."""
  side = config.data.crop_arcsec / config.model.token_arcsec
  n_tokens = int(round(side)) ** 2
  if config.model.variant in PAIR_VARIANTS:
    pairs = sum(quotas.values())
    return pairs, 2 * pairs * n_tokens
  chips = int(config.data.chips_per_batch)
  per_chip = len(registry.instruments) if config.model.variant == 'clip' else 1
  return chips, chips * per_chip * n_tokens


def cost_figures(compiled) -> dict[str, float]:
  """FLOPs and bytes accessed per device of a compiled program (XLA cost analysis)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0]
  cost = cost or {}
  out = {'flops_per_step_device': float(cost.get('flops', float('nan'))),
         'bytes_per_step_device': float(cost.get('bytes accessed', float('nan')))}
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # not every backend implements it
    mem = None
  if mem is not None:
    for name in ('temp_size_in_bytes', 'argument_size_in_bytes', 'output_size_in_bytes',
                 'alias_size_in_bytes'):
      if hasattr(mem, name):
        out[f'compiled_{name[:-len("_size_in_bytes")]}_mb_device'] = getattr(mem, name) / 2 ** 20
  return out


class StepBench:
  """Trainer, sharded state, compiled step and device batches of one config.

  Args:
    config: experiment config.
    quotas: pairs per instrument combination of the (global) batch.
    mesh: device mesh (default: from `config.mesh` over all devices).
    n_batches: distinct synthetic batches cycled through.
  """

  def __init__(self, config: ml_collections.ConfigDict, quotas: dict[str, int], mesh=None,
               n_batches: int = 4, compiler_options: dict[str, Any] | None = None):
    self.config = config
    self.compiler_options = dict(compiler_options or {})
    self.quotas = dict(quotas)
    self.trainer = trainer_lib.Trainer(config, mesh=mesh)
    self.mesh = self.trainer.mesh
    self.n_devices = self.mesh.size
    _, self.shardings = self.trainer.abstract_state()
    self.host_batches = [make_batch(config, self.trainer.registry, self.quotas, seed)
                         for seed in range(n_batches)]
    self.figures: dict[str, Any] = {}
    self.state = None
    self.compiled = None
    self.batches = None
    self.last_metrics = None

  def init_state(self):
    t0 = time.perf_counter()
    self.state = jax.block_until_ready(self.trainer.fresh_state(self.shardings))
    self.figures['init_s'] = time.perf_counter() - t0
    self.batches = [sharding.global_batch(b, self.mesh) for b in self.host_batches]
    return self.state

  def compile(self):
    """Lowers and compiles the step against the first batch; cost figures."""
    step = self.trainer.jitted_step(self.shardings)
    abstract, _ = self.trainer.abstract_state()
    example = sharding.global_batch(self.host_batches[0], self.mesh)
    t0 = time.perf_counter()
    lowered = step.lower(abstract, example)
    t1 = time.perf_counter()
    self.compiled = compile_with_options(lowered, self.compiler_options)
    t2 = time.perf_counter()
    self.lowered = lowered
    self.figures.update(lower_s=t1 - t0, compile_s=t2 - t1, **cost_figures(self.compiled))
    if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir:
      self.figures['compilation_cache_dir'] = jax.config.jax_compilation_cache_dir
    self.figures['flops_counted_on'] = 'XLA cost analysis of the executed program'
    platform = self.mesh.devices.flat[0].platform
    # Matmul FLOPs on the jaxpr (bench/flops.py), the same on every platform; loops
    # (the CPU per-sample stem) counted in their matmul form.
    impl = sample_conv.current_implementation()
    with sample_conv.implementation(impl if impl in ('im2col', 'grouped') else 'im2col'):
      counted = flops_lib.count(self.trainer.jitted_step(self.shardings), abstract, example)
    self.figures['matmul_flops_per_step_device'] = counted.total / self.n_devices
    if platform != 'cpu':
      # XLA:GPU's cost analysis of the optimised program leaves out the FLOPs of the
      # library calls it makes (cuBLAS GEMMs, cuDNN convolutions): 0.30 of the 0.94
      # TFLOP of the base step on an H200. MFU there is on the matmul count.
      self.figures['flops_executed_program_device'] = self.figures['flops_per_step_device']
      self.figures['flops_per_step_device'] = self.figures['matmul_flops_per_step_device']
      self.figures['flops_counted_on'] = (
          f'the jaxpr, matmul FLOPs (XLA:{platform.upper()} cost analysis leaves out '
          'library calls)')
    elif ' while(' in self.compiled.as_text():
      # XLA's cost analysis counts a loop body once: count the FLOPs on the same step
      # with the per-sample stem convolutions in matmul form (models/sample_conv.py).
      self.figures['flops_executed_program_device'] = self.figures['flops_per_step_device']
      with sample_conv.implementation('im2col'):
        twin = self.trainer.jitted_step(self.shardings).lower(abstract, example).compile()
      self.figures['flops_per_step_device'] = cost_figures(twin)['flops_per_step_device']
      self.figures['flops_counted_on'] = ('XLA cost analysis of the same step with im2col stem '
                                          'convolutions (the executed program loops; XLA '
                                          'counts a loop body once)')
    self.figures['flops_per_step'] = self.figures['flops_per_step_device'] * self.n_devices
    return self.compiled

  def run(self, steps: int, start: int = 0) -> list[float]:
    """Runs `steps` steps, each blocked on and timed; returns the seconds per step."""
    times = []
    for i in range(start, start + steps):
      t0 = time.perf_counter()
      self._dispatch(i)
      jax.block_until_ready((self.state, self.last_metrics))
      times.append(time.perf_counter() - t0)
    return times

  def _dispatch(self, i: int):
    """Dispatches step `i` (batch i mod the cycled batches) without waiting for it."""
    self.state, self.last_metrics = self.compiled(self.state,
                                                  self.batches[i % len(self.batches)])

  def run_pipelined(self, steps: int, start: int = 0) -> float:
    """Runs `steps` steps without blocking in between; returns the total seconds."""
    t0 = time.perf_counter()
    for i in range(start, start + steps):
      self._dispatch(i)
    jax.block_until_ready((self.state, self.last_metrics))
    return time.perf_counter() - t0


def parse_compiler_option(spec: str) -> tuple[str, Any]:
  """'NAME=VALUE' -> (NAME, VALUE): an XLA debug option for `Lowered.compile`, e.g.
  'xla_gpu_enable_cublaslt=true'. VALUE true/false -> bool, else int, float or string
  (possibly empty: 'xla_cpu_experimental_ynn_fusion_type=' clears a list option)."""
  name, eq, value = spec.partition('=')
  name = name.strip()
  if not eq or not name.startswith('xla_'):
    raise UserError(f'--xla {spec!r}: expected NAME=VALUE with an XLA option name (xla_...), '
                    'e.g. xla_gpu_enable_cublaslt=true')
  value = value.strip()
  if value.lower() in ('true', 'false'):
    return name, value.lower() == 'true'
  for kind in (int, float):
    try:
      return name, kind(value)
    except ValueError:
      pass
  return name, value


def compile_with_options(lowered, options: dict[str, Any]):
  """`lowered.compile` with XLA options; an option XLA does not know is a UserError."""
  try:
    return lowered.compile(dict(options) or None)
  except Exception as e:  # pylint: disable=broad-except
    if options and 'compile option' in str(e):  # 'No such compile option: ...'
      raise UserError(f'--xla {sorted(options)}: {str(e).splitlines()[0]}') from None
    raise


def _mfu(flops_per_s_device: float, peak: hardware.Peak) -> float:
  return flops_per_s_device / peak.flops_per_s if peak.flops_per_s > 0 else float('nan')


def _percent(x: float) -> str:
  return f'{100 * x:.1f}%' if np.isfinite(x) else 'n/a'


def time_stats(times: Sequence[float]) -> dict[str, float]:
  """median_s, p25_s, p75_s, min_s, max_s of step times."""
  q = np.percentile(times, [25, 75])
  return dict(median_s=statistics.median(times), p25_s=float(q[0]), p75_s=float(q[1]),
              min_s=min(times), max_s=max(times))


def summarize(times: list[float], figures: dict[str, Any], samples: int, tokens: int,
              peak: hardware.Peak, n_devices: int) -> dict[str, Any]:
  """Adds time, throughput and MFU figures of the timed steps to `figures`."""
  stats = time_stats(times)
  med = stats['median_s']
  total = sum(times)
  f = dict(figures)
  f.update({f'step_{k}': v for k, v in stats.items()})
  f.update(steps=len(times), timed_s=total, steps_per_s=len(times) / total,
           samples_per_step=samples, tokens_per_step=tokens)
  f['samples_per_s'] = f['steps_per_s'] * samples
  f['tokens_per_s'] = f['steps_per_s'] * tokens
  f['flops_per_s'] = f['flops_per_step'] / med
  f['flops_per_s_device'] = f['flops_per_step_device'] / med
  f['peak_flops_per_s_device'] = peak.flops_per_s
  f['peak_how'] = peak.how
  f['mfu'] = _mfu(f['flops_per_s_device'], peak)
  return f


def run_step(config: ml_collections.ConfigDict, quotas: dict[str, int], *, steps: int,
             warmup: int, peak_tflops: float | None = None, mesh=None, n_batches: int = 4,
             log=print, profile=None, compiler_options: dict[str, Any] | None = None
             ) -> dict[str, Any]:
  """Compiles and times the train step (module docstring); returns the figures.

  `profile(bench)`, if given, is called after the timed steps (e.g. to trace a few
  more steps with the profiler).
  """
  if steps < 1 or warmup < 0:
    raise UserError(f'--steps must be >= 1 and --warmup >= 0 (got {steps}, {warmup})')
  bench = StepBench(config, quotas, mesh=mesh, n_batches=n_batches,
                    compiler_options=compiler_options)
  samples, tokens = work_per_step(config, bench.trainer.registry, quotas)
  device = bench.mesh.devices.flat[0]
  log(f'jax {jax.__version__} on {device.platform} ({device.device_kind}), '
      f'{bench.n_devices} device(s), mesh {dict(bench.mesh.shape)}; variant '
      f'{config.model.variant}, dtype {config.model.dtype}, stem {config.model.stem.kind}, '
      f'D {config.model.trunk.embed_dim}, depth {config.model.trunk.depth}, '
      f'remat {config.model.trunk.remat}; batch {quotas} ({samples} samples, '
      f'{tokens} trunk tokens per step), crop {config.data.crop_arcsec}"'
      + (f'; XLA options {bench.compiler_options}' if bench.compiler_options else ''))
  bench.compile()
  f = bench.figures
  log(f'compile: lower {f["lower_s"]:.1f} s, compile {f["compile_s"]:.1f} s; '
      f'{f["flops_per_step_device"] / 1e9:.1f} GFLOP per step per device '
      f'({f["flops_counted_on"]}); '
      f'{f["bytes_per_step_device"] / 1e9:.1f} GB accessed (XLA); matmul FLOPs on the jaxpr '
      f'{f["matmul_flops_per_step_device"] / 1e9:.1f} GFLOP')
  if f.get('compilation_cache_dir'):
    log(f'note: JAX\'s persistent compilation cache is on ({f["compilation_cache_dir"]}): '
        'the compile time may be a read from that cache')
  bench.init_state()
  t0 = time.perf_counter()
  warm = bench.run(warmup)
  f['warmup_s'] = time.perf_counter() - t0
  if warm:
    log(f'warm-up: {warmup} steps, first {warm[0]:.2f} s, last {warm[-1]:.2f} s (excluded)')
  times = bench.run(steps, start=warmup)
  pipelined = None
  if device.platform != 'cpu':
    # Accelerators: the same steps dispatched back to back and blocked on once, as the
    # training loop runs them (it fetches metrics a step late), so host dispatch
    # overlaps device work; the per-step figures above each include one host round trip.
    pipelined = bench.run_pipelined(steps, start=warmup + steps)
  loss = float(jax.device_get(bench.last_metrics['loss']))
  if not np.isfinite(loss):
    raise RuntimeError(f'non-finite loss {loss} after {warmup + steps} steps')
  peak = hardware.device_peak(device, config.model.dtype, peak_tflops)
  out = summarize(times, f, samples, tokens, peak, bench.n_devices)
  out.update(final_loss=loss, n_devices=bench.n_devices, platform=device.platform,
             compiler_options=bench.compiler_options,
             device_kind=device.device_kind, quotas=quotas, jax_version=jax.__version__,
             peak_rss_mb=hardware.peak_rss_mb(),
             device_peak_mb=hardware.device_memory_peak_mb(device))
  if pipelined is not None:
    out['pipelined_steps_per_s'] = steps / pipelined
    out['pipelined_mfu'] = _mfu(out['flops_per_step_device'] * steps / pipelined, peak)
  if profile is not None:
    profile(bench)
  return out


def report_lines(f: dict[str, Any]) -> list[str]:
  """Human-readable lines of `run_step` figures; the last is the contract line."""
  lines = [
      f'step: median {f["step_median_s"]:.3f} s (p25 {f["step_p25_s"]:.3f}, p75 '
      f'{f["step_p75_s"]:.3f}, min {f["step_min_s"]:.3f}, max {f["step_max_s"]:.3f}) over '
      f'{f["steps"]} timed steps; final loss {f["final_loss"]:.4f}',
      f'throughput: {f["samples_per_s"]:.2f} samples/s, {f["tokens_per_s"]:.0f} tokens/s; '
      f'{f["flops_per_s"] / 1e9:.1f} GFLOP/s achieved ({f["flops_per_s_device"] / 1e9:.1f} '
      f'per device)',
      f'MFU {_percent(f["mfu"])} of {f["peak_flops_per_s_device"] / 1e9:.0f} GFLOP/s per '
      f'device [{f["peak_how"]}]',
  ]
  if 'pipelined_steps_per_s' in f:
    lines.append(f'pipelined (no host sync between steps): {f["pipelined_steps_per_s"]:.2f} '
                 f'steps/s, {f["pipelined_steps_per_s"] * f["samples_per_step"]:.1f} samples/s, '
                 f'MFU {_percent(f["pipelined_mfu"])}')
  mem = f'memory: peak host RSS {f["peak_rss_mb"]:.0f} MB'
  if f.get('device_peak_mb') is not None:
    mem += f', peak device memory {f["device_peak_mb"]:.0f} MB'
  if 'compiled_temp_mb_device' in f:
    mem += (f', compiled temp {f["compiled_temp_mb_device"]:.0f} MB + arguments '
            f'{f.get("compiled_argument_mb_device", float("nan")):.0f} MB per device')
  lines.append(mem)
  lines.append(f'steps_per_s={f["steps_per_s"]:.4f} samples_per_s={f["samples_per_s"]:.4f} '
               f'peak_rss_mb={f["peak_rss_mb"]:.1f}')
  return lines


def flops_per_step(config: ml_collections.ConfigDict, quotas: dict[str, int],
                   mesh=None) -> float:
  """Compiled FLOPs per step per device (no execution): for tests and scaling."""
  bench = StepBench(config, quotas, mesh=mesh, n_batches=1)
  bench.compile()
  return bench.figures['flops_per_step_device']
