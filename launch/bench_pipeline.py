"""Benchmark of the grain input pipeline: samples/s, bytes/s read, peak worker memory.

A thin wrapper: the logic lives in jaisp_jax/bench/pipeline.py. Without --config it
times `default_data_config()` (crop 12.8", 32 pairs per batch).

    python launch/bench_pipeline.py [--workers 0 2] [--batches 20] [--n-tiles 24]
    python launch/bench_pipeline.py --data-dir D --name NAME      # an existing dataset
    # same as: python -m jaisp_jax.bench pipeline [...]
"""

import sys

from jaisp_jax import cli
from jaisp_jax.bench import __main__ as bench

if __name__ == '__main__':
  sys.exit(cli.run(lambda argv: bench.main(['pipeline'] + sys.argv[1:]), prog='bench_pipeline'))
