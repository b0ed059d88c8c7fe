"""Benchmark of the GalSim simulator: prints tiles/s (one tile = one Rubin + Euclid pair).

    python launch/bench_simulate.py [--n-tiles 144] [--workers 2] [--size 128]

The default is the seeds' training set: 144 tile pairs of 128x128 Rubin / 256x256 Euclid
pixels, on 2 worker processes (goal: under 2 minutes). The time includes process start,
imports, colour tables and writing the npz files and truth, i.e. what
`python -m jaisp_jax.data.simulate` costs; the last line reads
`tiles=<n> workers=<k> seconds=<f> tiles_per_s=<f> cpu_s_per_tile=<f>`; the CPU time
(of all worker processes) per tile does not depend on how busy a shared machine is.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--n-tiles', type=int, default=144)
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--size', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='output folder (default: a temporary one, '
                      'deleted afterwards)')
  args = parser.parse_args()
  out = args.out or tempfile.mkdtemp(prefix='bench_simulate_')
  cmd = [sys.executable, '-m', 'jaisp_jax.data.simulate', '--out', out, '--field', 'bench',
         '--n-tiles', str(args.n_tiles), '--seed', str(args.seed), '--size', str(args.size),
         '--workers', str(args.workers)]
  print('running:', ' '.join(cmd), flush=True)
  start = time.perf_counter()
  subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
  seconds = time.perf_counter() - start
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)     # waited-for descendants
  cpu = usage.ru_utime + usage.ru_stime
  if args.out is None:
    shutil.rmtree(out)
  load = os.getloadavg()[0]
  print(f'(load average before the end: {load:.1f} on {os.cpu_count()} CPUs; '
        'timings are noisy on a shared machine)')
  print(f'tiles={args.n_tiles} workers={args.workers} seconds={seconds:.1f} '
        f'tiles_per_s={args.n_tiles / seconds:.2f} cpu_s_per_tile={cpu / args.n_tiles:.2f}')


if __name__ == '__main__':
  main()
