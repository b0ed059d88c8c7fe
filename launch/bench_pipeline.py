"""Benchmark of the grain input pipeline: samples/s, bytes/s read, peak worker memory.

    python launch/bench_pipeline.py [--workers 0 2] [--batches 30] [--n-tiles 48]
    python launch/bench_pipeline.py --data-dir D --name NAME      # an existing dataset

Without --data-dir it first builds a dataset like the seeds' training set (tile pairs
of 128x128 Rubin / 256x256 Euclid pixels, one 128 px chip each; pure noise, since
pixel values do not change the cost) in a temporary folder. It then times the
training pipeline of `default_data_config()` (crop 12.8": Rubin 64 px, Euclid
128 px; 32 pairs per batch) with each worker count, after `--warmup` batches (worker
start-up excluded), reading from disk through `tfds.data_source`.

Figures per worker count: samples/s (pairs), batches/s, MB/s of array_record bytes
read (one record per pair), and the peak resident memory (VmHWM) of the main process
and of the largest worker. The last line reads
`workers=<k> samples_per_s=<f> read_mb_per_s=<f> peak_worker_rss_mb=<f> ...` for the
last worker count.
"""

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np


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


def _build(root: pathlib.Path, n_tiles: int, size: int) -> tuple[str, str]:
  from jaisp_jax import bands
  from jaisp_jax.data import tfds_builder
  reg = bands.default_registry()
  rng = np.random.default_rng(0)
  dirs = {}
  for inst in reg.instruments:
    f = int(round(max(reg.pixel_scale(i) for i in reg.instruments) / reg.pixel_scale(inst)))
    d = root / 'tiles' / inst
    d.mkdir(parents=True)
    dirs[inst] = str(d)
    shape = (reg.n_bands(inst), size * f, size * f)
    for t in range(n_tiles):
      np.savez(d / f'tile_{t:04d}.npz', image=rng.standard_normal(shape, np.float32),
               rms=np.ones(shape, np.float32))
  tfds_builder.build_dataset(dirs, root / 'd', 'bench', reg,
                             tfds_builder.ChipOptions(chip_px=size, val_fraction=0.1),
                             progress=False)
  return str(root / 'd'), 'bench'


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  parser.add_argument('--batches', type=int, default=30, help='timed batches per run')
  parser.add_argument('--warmup', type=int, default=3, help='untimed batches per run')
  parser.add_argument('--n-tiles', type=int, default=48)
  parser.add_argument('--size', type=int, default=128, help='tile and chip side, Rubin px')
  parser.add_argument('--data-dir', default=None)
  parser.add_argument('--name', default='jaisp_chips')
  parser.add_argument('--pairs-per-batch', type=int, default=None)
  args = parser.parse_args()

  from jaisp_jax import bands
  from jaisp_jax.data import pipeline
  reg = bands.default_registry()
  tmp = None
  if args.data_dir is None:
    tmp = tempfile.TemporaryDirectory(prefix='bench_pipeline_')
    t0 = time.perf_counter()
    data_dir, name = _build(pathlib.Path(tmp.name), args.n_tiles, args.size)
    print(f'built {args.n_tiles} tile pairs into {data_dir} in {time.perf_counter() - t0:.1f} s',
          flush=True)
  else:
    data_dir, name = args.data_dir, args.name

  split_dir = pathlib.Path(data_dir) / name / '1.0.0'
  files = list(split_dir.glob(f'{name}-train.array_record-*'))
  config = pipeline.default_data_config()
  config.data_dir, config.name = data_dir, name
  if args.pairs_per_batch:
    config.pairs_per_batch = args.pairs_per_batch
  n_records = len(pipeline.open_source(config, 'train', reg))
  record_bytes = sum(f.stat().st_size for f in files) / n_records
  print(f'dataset: {n_records} train records, {record_bytes / 1e6:.2f} MB per record on disk; '
        f'crop {config.crop_arcsec}", {config.pairs_per_batch} pairs per batch; '
        f'{os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f}', flush=True)

  line = ''
  for workers in args.workers:
    config.num_workers = workers
    it = iter(pipeline.make_dataset(config, reg, data_parallel=1))
    for _ in range(args.warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    seconds = time.perf_counter() - start
    worker_mb = max([_vm_hwm_mb(p) for p in _children(os.getpid())] or [float('nan')])
    main_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    it.close()
    samples = args.batches * config.pairs_per_batch
    sps = samples / seconds
    line = (f'workers={workers} samples_per_s={sps:.1f} batches_per_s={args.batches / seconds:.2f} '
            f'read_mb_per_s={sps * record_bytes / 1e6:.1f} peak_main_rss_mb={main_mb:.0f} '
            f'peak_worker_rss_mb={worker_mb:.0f}')
    print(line, flush=True)
  if tmp is not None:
    tmp.cleanup()
  print(line)


if __name__ == '__main__':
  sys.exit(main())
