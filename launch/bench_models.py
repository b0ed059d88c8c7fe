"""Parameter counts and FLOPs per sample of every model variant (no timing).

A thin wrapper: the logic lives in jaisp_jax/bench/models.py.

    python launch/bench_models.py [--variants jepa --combos rubin-rubin]
    # same as: python -m jaisp_jax.bench models [...]
"""

import sys

from jaisp_jax import cli
from jaisp_jax.bench import __main__ as bench

if __name__ == '__main__':
  sys.exit(cli.run(lambda argv: bench.main(['models'] + sys.argv[1:]), prog='bench_models'))
