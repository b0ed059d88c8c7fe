"""Time batched linear assignment: in-graph JAX (ours, optax) vs scipy on the host.

A thin wrapper: the logic lives in jaisp_jax/bench/matching.py.

    python launch/bench_matching.py [--batch 64] [--size 100] [--reps 9] [--seed 0]
    # same as: python -m jaisp_jax.bench matching [...]
"""

import sys

from jaisp_jax import cli
from jaisp_jax.bench import __main__ as bench

if __name__ == '__main__':
  sys.exit(cli.run(lambda argv: bench.main(['matching'] + sys.argv[1:]), prog='bench_matching'))
