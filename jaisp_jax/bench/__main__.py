r"""Benchmark harness: `python -m jaisp_jax.bench <command> ...` (docs/performance.md).

    # the train step at the PyTorch reference's configuration (contract: the last line
    # is `steps_per_s=<f> samples_per_s=<f> peak_rss_mb=<f>`)
    python -m jaisp_jax.bench step --config=configs/jepa.py:torch_ref --steps 10 --warmup 3
    # any experiment / size / override; --profile adds a per-part time breakdown
    python -m jaisp_jax.bench step --config=configs/detr_jepa.py:base --steps 5 --warmup 2 \
        --config.model.dtype=bfloat16 --profile /tmp/trace
    # variants of the step against each other, interleaved in one process (A/B decisions)
    python -m jaisp_jax.bench ab --config=configs/jepa.py:torch_ref --variant base= \
        --variant ynn=--config.cpu_convolutions=ynnpack [--rounds 6 --steps 4]
    #   (on a GPU: --variant lt=--xla=xla_gpu_enable_cublaslt=true --pipelined)
    python -m jaisp_jax.bench pipeline --config=configs/jepa.py:torch_ref [--step-json step.json]
    python -m jaisp_jax.bench matching [--batch 64 --size 100]
    python -m jaisp_jax.bench scaling --config=configs/jepa.py:torch_ref [--devices 1,2,4,8]
    python -m jaisp_jax.bench memory --config=configs/jepa.py:pod [--devices 8]
    python -m jaisp_jax.bench models [--variants jepa --combos rubin-rubin]
    # ours against the PyTorch reference, alternating on this machine: the #7 ratios
    python -m jaisp_jax.bench versus --reference ../shared/bench/torch_ref \
        --reference-python ~/.venv-torch/bin/python [--rounds 2]

Every command prints its figures and, with --out FILE, saves them as JSON.
`scaling` and `memory` simulate CPU devices (jax_num_cpu_devices) when the platform
is the CPU and fewer devices exist than asked for.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TFDS / grain import TensorFlow

if __name__ == '__main__':
  # Huge pages for the host heap: restarts this command once, before the heavy imports
  # (jaisp_jax/hugepages.py).
  from jaisp_jax import hugepages  # pylint: disable=g-import-not-at-top
  hugepages.reexec()

from jaisp_jax import cli  # pylint: disable=g-import-not-at-top


def _config_args(p: argparse.ArgumentParser, required: bool = True):
  p.add_argument('--config', required=required,
                 help='experiment config file[:size], e.g. configs/jepa.py:torch_ref; '
                      '--config.<field>=<value> overrides fields')
  p.add_argument('--quotas', default=None,
                 help="pairs per combination of the global batch, e.g. 'rubin-rubin=16' "
                      "(default: the training pipeline's quotas of the config)")
  p.add_argument('--out', default=None, help='save the figures as JSON here')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='python -m jaisp_jax.bench',
                                   description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser('step', help='time the jitted train step of a config')
  _config_args(p)
  p.add_argument('--steps', type=int, default=10, help='timed steps')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps first')
  p.add_argument('--batches', type=int, default=4, help='distinct synthetic batches cycled')
  p.add_argument('--peak-tflops', type=float, default=None,
                 help='peak TFLOP/s per device for MFU (default: hardware.py table)')
  p.add_argument('--profile', default=None, metavar='DIR',
                 help='trace 2 more steps into DIR and print where the time goes')
  p.add_argument('--stem-conv', default='auto',
                 choices=('auto', 'loop', 'im2col', 'grouped', 'shift', 'pallas'),
                 help="per-sample stem convolution form (models/sample_conv.py); 'auto': "
                      "'loop' on CPU, 'pallas' on CUDA GPUs, 'im2col' elsewhere")
  p.add_argument('--stem-embed', default='matmul', choices=('matmul', 'conv'),
                 help="patch embedding of the XLA stem forms: patchify + matmul, or a "
                      "stride-s convolution (models/sample_conv.py)")
  p.add_argument('--xla', action='append', default=[], metavar='NAME=VALUE',
                 help='an XLA option for this compile (repeatable), e.g. '
                      'xla_gpu_enable_cublaslt=true; unlike XLA_FLAGS it applies to the '
                      'step alone')
  p.add_argument('--dump', default=None, metavar='DIR',
                 help='write the lowered (StableHLO) and optimised HLO of the step into DIR')

  p = sub.add_parser('ab', help='variants of the train step, interleaved in one process')
  _config_args(p)
  p.add_argument('--variant', action='append', required=True, metavar='NAME=FLAGS',
                 help="a variant: a name and flags on top of the common ones "
                      "(--config.<field>=<value>, --stem-conv=<form>, --stem-embed=<form>, "
                      "--xla=<option>=<value>), e.g. 'base=' or "
                      "'ynn=--config.cpu_convolutions=ynnpack'; give two or more, the first "
                      "is the baseline")
  p.add_argument('--rounds', type=int, default=6,
                 help='rounds over the variants (order reversed every other round)')
  p.add_argument('--steps', type=int, default=4, help='timed steps per variant per round')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per variant first')
  p.add_argument('--pipelined', action='store_true',
                 help="time each round's steps dispatched back to back and blocked on once "
                      '(as the training loop runs; for accelerators), not one by one')
  p.add_argument('--peak-tflops', type=float, default=None,
                 help='peak TFLOP/s per device for MFU (default: hardware.py table)')

  p = sub.add_parser('pipeline', help='input pipeline samples/s beside the step rate')
  _config_args(p, required=False)
  p.add_argument('--workers', type=int, nargs='+', default=[0, 2])
  p.add_argument('--batches', type=int, default=20, help='timed batches per worker count')
  p.add_argument('--warmup', type=int, default=3)
  p.add_argument('--n-tiles', type=int, default=24, help='tiles of the temporary dataset')
  p.add_argument('--data-dir', default=None, help='an existing dataset instead')
  p.add_argument('--name', default='jaisp_chips')
  p.add_argument('--step-json', default=None,
                 help="a `step --out` file: compare with the step's samples/s")

  p = sub.add_parser('matching', help='batched assignment: in-graph JAX vs scipy')
  p.add_argument('--batch', type=int, default=64)
  p.add_argument('--size', type=int, default=100)
  p.add_argument('--reps', type=int, default=9)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=None)

  p = sub.add_parser('scaling', help='weak scaling over 1, 2, 4, 8 (simulated) devices')
  _config_args(p)
  p.add_argument('--devices', default='1,2,4,8')
  p.add_argument('--steps', type=int, default=0,
                 help='also time this many steps per mesh (simulated devices share the '
                      'host cores: times do not show scaling)')

  p = sub.add_parser('memory', help='parameter + optimizer bytes per device, fsdp on/off')
  _config_args(p)
  p.add_argument('--devices', type=int, default=8)
  p.add_argument('--compile', action='store_true',
                 help='also compile the step per setting for XLA\'s per-device temp bytes')

  p = sub.add_parser('models', help='parameters and compiled FLOPs per sample per variant')
  p.add_argument('--variants', default='jepa,two_view,detr_jepa,clip,masked_band')
  p.add_argument('--combos', default='rubin-rubin,rubin-euclid,euclid-euclid')
  p.add_argument('--crop-arcsec', type=float, default=25.6)
  p.add_argument('--batch', type=int, default=2)
  p.add_argument('--out', default=None)

  p = sub.add_parser('versus', help='ours vs the PyTorch reference, alternating: the ratios')
  p.add_argument('--reference', required=True, metavar='DIR',
                 help='the PyTorch reference folder (its bench.py), e.g. ../shared/bench/torch_ref')
  p.add_argument('--reference-python', default='python3', metavar='PYTHON',
                 help='the interpreter with torch installed that runs the reference')
  p.add_argument('--reference-args', default='', metavar='ARGS',
                 help="extra arguments for the reference's bench.py (e.g. '--size 64 --batch 8' "
                      "beside the matching --config overrides)")
  p.add_argument('--config', default='configs/jepa.py:torch_ref',
                 help='our config (default: the reference\'s configuration); --config.<field>='
                      '<value> overrides fields')
  p.add_argument('--quotas', default=None, help='as for `step`')
  p.add_argument('--rounds', type=int, default=2,
                 help='rounds of ours, eager, compile (reversed in even rounds)')
  p.add_argument('--steps', type=int, default=10, help='timed steps per run (both programs)')
  p.add_argument('--warmup', type=int, default=3, help='untimed steps per run (both programs)')
  p.add_argument('--threads', type=int, default=0,
                 help="the reference's --threads (default: the CPUs this process may use)")
  p.add_argument('--no-compile', action='store_true', help='skip the torch.compile runs')
  p.add_argument('--reference-hugepages', action='store_true',
                 help='run the reference with glibc.malloc.hugetlb=1 too (what ours sets for '
                      'itself, jaisp_jax/hugepages.py); default: as shipped')
  p.add_argument('--timeout', type=float, default=3600, help='seconds per run at most')
  p.add_argument('--out', default=None, help='save the runs and ratios as JSON here')
  return parser


def _save(path: str | None, figures: Any):
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(figures, f, indent=2, sort_keys=True, default=_json_default)
  print(f'saved {path}', flush=True)


def _json_default(x):
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return str(x)


def _ensure_cpu_devices(n: int):
  """Simulates `n` CPU devices if JAX has not started yet (scaling, memory)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    if jax.config.jax_platforms in (None, '', 'cpu') and jax.config.jax_num_cpu_devices < n:
      jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:
    pass  # backend already initialised: use the devices that exist


def _step(args, overrides):
  from jaisp_jax import bands as bands_lib  # pylint: disable=g-import-not-at-top
  from jaisp_jax.bench import configs, step  # pylint: disable=g-import-not-at-top
  from jaisp_jax.train import sharding  # pylint: disable=g-import-not-at-top
  config = configs.load_config(args.config, overrides)
  registry = bands_lib.BandRegistry.from_config(config.bands)
  data_parallel = sharding.data_size(sharding.make_mesh(config))
  quotas = configs.bench_quotas(config, registry, data_parallel, args.quotas)
  profile_fn = None
  profile_rows = []
  if args.profile:
    from jaisp_jax.bench import profile  # pylint: disable=g-import-not-at-top

    def profile_fn(bench):
      # The timed figures are already taken: a profiler that fails on this platform
      # (no CUPTI, an unreadable trace) costs the breakdown, not the run.
      try:
        path = profile.trace(bench, args.profile, steps=2)
        if path:
          profile_rows.extend(profile.summarize(path, bench.compiled.as_text(), steps=2))
      except Exception as e:  # pylint: disable=broad-except
        print(f'profile: failed ({type(e).__name__}: {e}); figures without the breakdown',
              flush=True)
        return
      print(f'profile: trace in {args.profile} (TensorBoard / Perfetto)', flush=True)

  from jaisp_jax.models import sample_conv  # pylint: disable=g-import-not-at-top
  with sample_conv.implementation(args.stem_conv), sample_conv.embedding(args.stem_embed):
    figures = step.run_step(config, quotas, steps=args.steps, warmup=args.warmup,
                            peak_tflops=args.peak_tflops, n_batches=args.batches,
                            log=lambda m: print(m, flush=True), profile=profile_fn,
                            compiler_options=dict(step.parse_compiler_option(o)
                                                  for o in args.xla))
  figures['stem_conv'] = args.stem_conv
  figures['stem_embed'] = args.stem_embed
  figures['config'] = args.config
  figures['overrides'] = list(overrides)
  if args.dump:
    _dump(args.dump, config, quotas)
  if profile_rows:
    from jaisp_jax.bench import profile  # pylint: disable=g-import-not-at-top
    for line in profile.report(profile_rows):
      print(line)
    figures['profile_ms_per_step'] = [list(r) for r in profile_rows]
  _save(args.out, figures)
  for line in step.report_lines(figures):
    print(line, flush=True)


def _dump(directory: str, config, quotas):
  from jaisp_jax.bench import step  # pylint: disable=g-import-not-at-top
  bench = step.StepBench(config, quotas, n_batches=1)
  bench.compile()
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, 'step.stablehlo.txt'), 'w') as f:
    f.write(bench.lowered.as_text())
  with open(os.path.join(directory, 'step.hlo.txt'), 'w') as f:
    f.write(bench.compiled.as_text())
  print(f'dump: lowered and optimised HLO of the step in {directory}', flush=True)


def main(argv: Sequence[str] | None = None) -> int:
  args, rest = _parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith('--config.')]
  unknown = [a for a in rest if not a.startswith('--config.')]
  if unknown:
    raise cli.UserError(f'unexpected arguments: {" ".join(unknown)}')
  if args.command == 'step':
    _step(args, overrides)
  elif args.command == 'ab':
    from jaisp_jax.bench import ab  # pylint: disable=g-import-not-at-top
    variants = ab.parse_variants(args.variant)
    figures = ab.run(args.config, overrides, variants, quotas_arg=args.quotas,
                     rounds=args.rounds, steps=args.steps, warmup=args.warmup,
                     pipelined=args.pipelined, peak_tflops=args.peak_tflops,
                     log=lambda m: print(m, flush=True))
    _save(args.out, figures)
    for line in ab.report_lines(figures):
      print(line, flush=True)
  elif args.command == 'pipeline':
    from jaisp_jax.bench import pipeline  # pylint: disable=g-import-not-at-top
    _save(args.out, pipeline.main(args, overrides))
  elif args.command == 'matching':
    from jaisp_jax.bench import matching  # pylint: disable=g-import-not-at-top
    _save(args.out, matching.run(args.batch, args.size, args.reps, args.seed))
  elif args.command in ('scaling', 'memory'):
    wanted = [int(d) for d in str(args.devices).split(',')]
    _ensure_cpu_devices(max(wanted))
    from jaisp_jax.bench import scaling  # pylint: disable=g-import-not-at-top
    if args.command == 'scaling':
      _save(args.out, scaling.weak_scaling(args, overrides, wanted))
    else:
      _save(args.out, scaling.memory(args, overrides, wanted[0]))
  elif args.command == 'models':
    from jaisp_jax.bench import models  # pylint: disable=g-import-not-at-top
    _save(args.out, models.run(args.variants.split(','), args.combos.split(','),
                               args.crop_arcsec, args.batch))
  elif args.command == 'versus':
    from jaisp_jax.bench import versus  # pylint: disable=g-import-not-at-top
    _save(args.out, versus.run(args, overrides, log=lambda m: print(m, flush=True)))
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main, prog='jaisp_jax.bench'))
