"""Input pipeline benchmark: samples/s, bytes/s read, peak worker memory, vs the step.

Without `--data-dir` it first builds a dataset like the training set (tile pairs of
C x C Rubin / 2C x 2C Euclid pixels with C the config's crop in Rubin pixels, one
chip each; pure noise, since pixel values do not change the cost) in a temporary
folder. It then times the training pipeline of the config's `data` section (crop,
pairs per batch, pairing mix) for each worker count, after `--warmup` batches (worker
start-up excluded), reading from disk through `tfds.data_source`.

Figures per worker count: samples/s (pairs), batches/s, CPU time per sample (main
process and workers, all threads: the cost whatever the load), MB/s and MB per sample
read through system calls (page cache included; the chip cache, `data.cache_mb`,
brings it to 0 once every chip is cached), peak resident memory (VmHWM) of the main
process and of the largest worker. Give `--warmup` enough batches for every process
to see the split once if you want the cached steady state (each worker holds its
own cache). With `--step-json` (a `step --out` file of the same config) it also
prints the step's consumption rate and their ratio: the pipeline keeps up when the
ratio is >= 1 (on a machine where the step and the workers do not share cores).
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import tempfile
import time
from typing import Any

import numpy as np

from jaisp_jax import bands as bands_lib


def _children(pid: int) -> list[int]:
  out = []
  for d in pathlib.Path('/proc').iterdir():
    if d.name.isdigit():
      try:
        fields = (d / 'stat').read_text().rsplit(')', 1)[1].split()
      except OSError:
        continue
      if int(fields[1]) == pid:
        out.append(int(d.name))
  return out


def _vm_hwm_mb(pid: int) -> float:
  try:
    for line in pathlib.Path(f'/proc/{pid}/status').read_text().splitlines():
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float('nan')


def _cpu_seconds(pid: int) -> float:
  """User + system CPU time of a process (all its threads) so far."""
  try:
    fields = pathlib.Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()
  except OSError:
    return 0.0
  return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def _read_bytes(pid: int) -> int:
  """Bytes a process has read through system calls so far (rchar; page cache included)."""
  try:
    for line in pathlib.Path(f'/proc/{pid}/io').read_text().splitlines():
      if line.startswith('rchar:'):
        return int(line.split()[1])
  except OSError:
    pass
  return 0


def build_noise_dataset(root: pathlib.Path, registry: bands_lib.BandRegistry, n_tiles: int,
                        size: int) -> tuple[str, str]:
  """Tiles of pure noise (Rubin `size` px, other instruments at their scale) -> TFDS."""
  from jaisp_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  coarsest = max(registry.pixel_scale(i) for i in registry.instruments)
  dirs = {}
  for inst in registry.instruments:
    f = int(round(coarsest / registry.pixel_scale(inst)))
    d = root / 'tiles' / inst
    d.mkdir(parents=True)
    dirs[inst] = str(d)
    shape = (registry.n_bands(inst), size * f, size * f)
    for t in range(n_tiles):
      np.savez(d / f'tile_{t:04d}.npz', image=rng.standard_normal(shape, np.float32),
               rms=np.ones(shape, np.float32))
  tfds_builder.build_dataset(dirs, root / 'd', 'bench', registry,
                             tfds_builder.ChipOptions(chip_px=size, val_fraction=0.1),
                             progress=False)
  return str(root / 'd'), 'bench'


def time_pipeline(config, registry, workers: int, batches: int, warmup: int) -> dict[str, Any]:
  """Times `batches` process-local batches of `make_dataset` with `workers` workers."""
  from jaisp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config.num_workers = workers
  it = iter(pipeline.make_dataset(config, registry, data_parallel=1))
  for _ in range(warmup):
    next(it)
  pids = [os.getpid()] + _children(os.getpid())
  cpu = sum(_cpu_seconds(p) for p in pids)
  read = sum(_read_bytes(p) for p in pids)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  # CPU seconds of this process and the workers: the cost of a sample whatever else
  # runs on the machine (wall-clock rates depend on the load).
  cpu = sum(_cpu_seconds(p) for p in pids) - cpu
  read = sum(_read_bytes(p) for p in pids) - read
  worker_mb = max([_vm_hwm_mb(p) for p in pids[1:]] or [float('nan')])
  main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  it.close()
  samples = batches * config.pairs_per_batch
  return dict(workers=workers, samples_per_s=samples / seconds,
              batches_per_s=batches / seconds, cpu_ms_per_sample=1e3 * cpu / samples,
              samples_per_cpu_s=samples / max(cpu, 1e-9), read_mb_per_s=read / 1e6 / seconds,
              read_mb_per_sample=read / 1e6 / samples, peak_main_rss_mb=main_mb,
              peak_worker_rss_mb=worker_mb)


def main(args, overrides) -> dict[str, Any]:
  """The `pipeline` command (module docstring); returns the figures."""
  from jaisp_jax.bench import configs  # pylint: disable=g-import-not-at-top
  from jaisp_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  if args.config:
    config = configs.load_config(args.config, overrides)
    registry = bands_lib.BandRegistry.from_config(config.bands)
    data = config.data
  else:
    registry = bands_lib.default_registry()
    data = pipeline.default_data_config()
  size = int(round(data.crop_arcsec / max(registry.pixel_scale(i)
                                          for i in registry.instruments)))
  tmp = None
  if args.data_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix='bench_pipeline_')
    t0 = time.perf_counter()
    data_dir, name = build_noise_dataset(pathlib.Path(tmp.name), registry, args.n_tiles, size)
    print(f'built {args.n_tiles} tile pairs ({size} px Rubin) into {data_dir} in '
          f'{time.perf_counter() - t0:.1f} s', flush=True)
  else:
    data_dir, name = args.data_dir, args.name
  data.data_dir, data.name = data_dir, name
  files = list((pathlib.Path(data_dir) / name / '1.0.0').glob(f'{name}-train.array_record-*'))
  n_records = len(pipeline.open_source(data, 'train', registry))
  record_bytes = sum(f.stat().st_size for f in files) / max(n_records, 1)
  print(f'dataset: {n_records} train records, {record_bytes / 1e6:.2f} MB per record; crop '
        f'{data.crop_arcsec}", {data.pairs_per_batch} pairs per batch; {os.cpu_count()} '
        f'CPU(s), load average {os.getloadavg()[0]:.1f}', flush=True)
  out: dict[str, Any] = {'config': args.config, 'record_mb': record_bytes / 1e6, 'runs': []}
  for workers in args.workers:
    r = time_pipeline(data, registry, workers, args.batches, args.warmup)
    out['runs'].append(r)
    print(f'workers={workers} samples_per_s={r["samples_per_s"]:.1f} '
          f'batches_per_s={r["batches_per_s"]:.2f} cpu_ms_per_sample={r["cpu_ms_per_sample"]:.3f} '
          f'samples_per_cpu_s={r["samples_per_cpu_s"]:.0f} read_mb_per_s={r["read_mb_per_s"]:.1f} '
          f'peak_main_rss_mb={r["peak_main_rss_mb"]:.0f} '
          f'peak_worker_rss_mb={r["peak_worker_rss_mb"]:.0f}', flush=True)
  if tmp is not None:
    tmp.cleanup()
  if args.step_json:
    with open(args.step_json) as f:
      step_sps = float(json.load(f)['samples_per_s'])
    best = max(r['samples_per_s'] for r in out['runs'])
    out['step_samples_per_s'] = step_sps
    out['pipeline_over_step'] = best / step_sps
    print(f'step consumes {step_sps:.1f} samples/s; the best pipeline setting delivers '
          f'{best:.1f} samples/s = {best / step_sps:.1f}x the step\'s rate '
          f'({"keeps up" if best >= step_sps else "the pipeline is the bottleneck"})')
  return out
