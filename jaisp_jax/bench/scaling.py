"""Weak scaling over device meshes and per-device state memory with fsdp on vs off.

Weak scaling (`weak_scaling`): for each device count n (the first n devices; on CPU,
simulated with `jax_num_cpu_devices`), a ('data', 'fsdp') mesh of n devices (fsdp =
the config's, where it divides n), the global batch n times the one-device batch, the
step compiled ONCE for that mesh (ahead of time; the timed steps, if any, run that
executable on batches of different band mixes), and XLA's cost analysis of the partitioned program:
FLOPs and bytes accessed per device, which should stay flat as n grows (the
collectives add a little). Simulated devices share the host's cores, so step times
(optional, `--steps`) do not show scaling; on real hardware they do.

Memory (`memory`): bytes per device of the parameters, the EMA target and the
optimizer state under the config's sharding rules (`train.sharding`), for fsdp = 1
(replicated: every device holds everything) and fsdp = n (large leaves split n ways).
Computed from the abstract state (`jax.eval_shape`), so even pod-sized configs cost
nothing; `--compile` adds XLA's compiled per-device temp and argument bytes of the step.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from jaisp_jax import bands as bands_lib
from jaisp_jax.bench import configs
from jaisp_jax.bench import step as step_lib
from jaisp_jax.cli import UserError
from jaisp_jax.train import trainer as trainer_lib


def make_mesh(n: int, fsdp: int) -> Mesh:
  """('data', 'fsdp') mesh over the first `n` devices."""
  devices = jax.devices()
  if n > len(devices):
    raise UserError(f'{n} devices asked for, {len(devices)} available')
  if n % fsdp:
    raise UserError(f'fsdp={fsdp} does not divide {n} devices')
  return Mesh(np.asarray(devices[:n]).reshape(n // fsdp, fsdp), ('data', 'fsdp'))


def weak_scaling(args, overrides, counts: list[int], log=print) -> dict[str, Any]:
  """The `scaling` command: one compile per mesh, per-device cost figures (docstring)."""
  config = configs.load_config(args.config, overrides)
  registry = bands_lib.BandRegistry.from_config(config.bands)
  per_device = configs.bench_quotas(config, registry, 1, args.quotas)
  log(f'weak scaling of {args.config}: {per_device} pairs per device; '
      f'{jax.device_count()} {jax.devices()[0].platform} devices available')
  rows = []
  for n in counts:
    fsdp = math.gcd(int(config.mesh.fsdp), n)
    quotas = {c: q * n for c, q in per_device.items()}
    bench = step_lib.StepBench(config, quotas, mesh=make_mesh(n, fsdp), n_batches=2)
    bench.compile()
    f = bench.figures
    row = dict(devices=n, fsdp=fsdp, global_pairs=sum(quotas.values()),
               pairs_per_device=sum(per_device.values()),
               gflop_per_device=f['flops_per_step_device'] / 1e9,
               gb_per_device=f['bytes_per_step_device'] / 1e9, compile_s=f['compile_s'])
    if args.steps > 0:
      # The AOT-compiled step serves every batch (different band mixes): an input that
      # needed a new compile would raise instead of recompiling.
      bench.init_state()
      bench.run(1)
      row['step_s'] = statistics.median(bench.run(args.steps, start=1))
    rows.append(row)
    log(f'  {n} device(s): compiled in {f["compile_s"]:.1f} s')
  base = rows[0]['gflop_per_device']
  for r in rows:
    r['flops_per_device_vs_first'] = r['gflop_per_device'] / base
  for line in scaling_table(rows):
    log(line)
  return {'config': args.config, 'overrides': list(overrides), 'rows': rows}


def scaling_table(rows: list[dict[str, Any]]) -> list[str]:
  timed = 'step_s' in rows[0]
  head = ('| devices | fsdp | global pairs | pairs/device | GFLOP/step/device | '
          'GB accessed/device | vs 1st | compile s |' + (' step s (median) |' if timed else ''))
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    line = (f'| {r["devices"]} | {r["fsdp"]} | {r["global_pairs"]} | {r["pairs_per_device"]} | '
            f'{r["gflop_per_device"]:.2f} | {r["gb_per_device"]:.2f} | '
            f'{r["flops_per_device_vs_first"]:.3f} | {r["compile_s"]:.1f} |')
    if timed:
      line += f' {r["step_s"]:.3f} |'
    lines.append(line)
  return lines


def state_bytes_per_device(trainer: trainer_lib.Trainer) -> dict[str, float]:
  """Bytes per device of params / ema_params / opt_state (and unsharded totals)."""
  abstract, shardings = trainer.abstract_state()
  out = {}
  for part in ('params', 'ema_params', 'opt_state'):
    leaves = jax.tree.leaves(getattr(abstract, part))
    shs = jax.tree.leaves(getattr(shardings, part))
    per_dev = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
                  for x, s in zip(leaves, shs))
    total = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves)
    out[f'{part}_mb_device'] = per_dev / 2 ** 20
    out[f'{part}_mb_total'] = total / 2 ** 20
  return out


def memory(args, overrides, n: int, log=print) -> dict[str, Any]:
  """The `memory` command: state bytes per device, fsdp off (1) vs on (n)."""
  config = configs.load_config(args.config, overrides)
  registry = bands_lib.BandRegistry.from_config(config.bands)
  rows = []
  for fsdp in sorted({1, n}):
    mesh = make_mesh(n, fsdp)
    trainer = trainer_lib.Trainer(config, mesh=mesh)
    row = dict(devices=n, fsdp=fsdp, **state_bytes_per_device(trainer))
    if args.compile:
      quotas = configs.bench_quotas(config, registry,
                                    mesh.shape['data'] * mesh.shape['fsdp'], args.quotas)
      bench = step_lib.StepBench(config, quotas, mesh=mesh, n_batches=1)
      bench.compile()
      row.update({k: v for k, v in bench.figures.items() if k.startswith('compiled_')})
    rows.append(row)
  log(f'state memory per device of {args.config} on {n} devices '
      f'(min_shard_size {config.mesh.min_shard_size} elements; smaller leaves replicated)')
  head = '| fsdp | params MB/device | EMA MB/device | optimizer MB/device | total MB/device |'
  if args.compile:
    head += ' compiled temp MB/device |'
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in rows:
    tot = r['params_mb_device'] + r['ema_params_mb_device'] + r['opt_state_mb_device']
    line = (f'| {r["fsdp"]} | {r["params_mb_device"]:.1f} | {r["ema_params_mb_device"]:.1f} | '
            f'{r["opt_state_mb_device"]:.1f} | {tot:.1f} |')
    if args.compile:
      line += f' {r.get("compiled_temp_mb_device", float("nan")):.0f} |'
    lines.append(line)
  for line in lines:
    log(line)
  r0 = rows[0]
  log(f'unsharded: params {r0["params_mb_total"]:.1f} MB, EMA {r0["ema_params_mb_total"]:.1f} '
      f'MB, optimizer {r0["opt_state_mb_total"]:.1f} MB')
  return {'config': args.config, 'overrides': list(overrides), 'rows': rows}
