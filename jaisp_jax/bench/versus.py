"""Ours against the PyTorch reference on the same machine, alternating: the ratio of #7.

    python -m jaisp_jax.bench versus --reference ../shared/bench/torch_ref \
        --reference-python ~/.venv-torch/bin/python [--rounds 2] [--out versus.json]

The two programs are separate processes, so a comparison only means something when
they run back to back on an otherwise idle machine; this command does exactly that and
nothing else. Each round runs three commands -- ours (`python -m jaisp_jax.bench step
--config=configs/jepa.py:torch_ref --steps N --warmup W`), the reference eager
(`bench.py --threads T --steps N --warmup W`) and the reference under torch.compile
(`... --compile`) -- in the order ours, eager, compile in odd rounds and the reverse in
even rounds, so that a drift of the machine within the sitting (the same program moved
by 10% within an hour here, docs/performance.md) weighs on both sides alike. Every
command's last line is the contract line `steps_per_s=<f> samples_per_s=<f>
peak_rss_mb=<f>`; the ratios are ours / reference samples/s per round, and the summary
is their median over the rounds, their range, and whether the goal (>= 1.5x eager,
>= 1x torch.compile) held in every round.

Before every command the machine's CPU use is sampled for a second (/proc/stat) and a
warning printed when more than a quarter of it was busy: such a figure measures the
neighbours too. (The load average cannot tell: it still carries the previous command.)
Nothing here imports torch; the reference runs in its own interpreter.
"""

from __future__ import annotations

import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from jaisp_jax import hugepages
from jaisp_jax.bench import hardware
from jaisp_jax.cli import UserError

CONTRACT = re.compile(r'^steps_per_s=(\S+) samples_per_s=(\S+) peak_rss_mb=(\S+)$')
GOAL_EAGER = 1.5     # ours / eager samples/s, at least (issue #7)
GOAL_COMPILE = 1.0   # ours / torch.compile samples/s, at least
_TAIL = 1500         # characters of a failed command's output in its error


def parse_contract(output: str, what: str) -> dict[str, float]:
  """The figures of the last non-empty line of `output`, which must be the contract line.

  Raises:
    UserError: naming `what` when the last line is not `steps_per_s=<f> samples_per_s=<f>
      peak_rss_mb=<f>` with finite positive rates.
  """
  lines = [line.strip() for line in output.splitlines() if line.strip()]
  last = lines[-1] if lines else ''
  m = CONTRACT.match(last)
  try:
    figures = dict(zip(('steps_per_s', 'samples_per_s', 'peak_rss_mb'),
                       map(float, m.groups()))) if m else None
  except ValueError:
    figures = None
  if figures is None or not all(0 < figures[k] < float('inf')
                                for k in ('steps_per_s', 'samples_per_s')):
    raise UserError(f'{what}: last line of its output is not the contract line '
                    f'"steps_per_s=<float> samples_per_s=<float> peak_rss_mb=<float>": '
                    f'{last[:200]!r}')
  return figures


def schedule(rounds: int, with_compile: bool = True) -> list[tuple[int, str]]:
  """(round, program) in run order: ours, eager[, compile] in odd rounds, reversed in even."""
  names = ['ours', 'eager'] + (['compile'] if with_compile else [])
  order = []
  for r in range(1, rounds + 1):
    order += [(r, n) for n in (names if r % 2 else names[::-1])]
  return order


def _cpu_times() -> tuple[int, int] | None:
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle+iowait


def busy_fraction(seconds: float = 1.0) -> float | None:
  """Share of the machine's CPU time spent busy over the next `seconds` (None off Linux)."""
  before = _cpu_times()
  time.sleep(seconds)
  after = _cpu_times()
  if before is None or after is None or after[0] <= before[0]:
    return None
  return 1.0 - (after[1] - before[1]) / (after[0] - before[0])


def commands(args, overrides: Sequence[str]) -> dict[str, tuple[list[str], str, dict]]:
  """(argv, cwd, environment) of each program from the parsed `versus` arguments.

  Every program gets the environment the user started this command with (not the
  huge-page tunable this command's own restart added, jaisp_jax/hugepages.py): ours sets
  it for itself, the reference runs as shipped unless --reference-hugepages.
  """
  ref = os.path.abspath(args.reference)
  script = os.path.join(ref, 'bench.py')
  if not os.path.isfile(script):
    raise UserError(f'--reference {args.reference}: no bench.py there (expected the '
                    'PyTorch reference folder, e.g. ../shared/bench/torch_ref)')
  python = args.reference_python
  if os.sep in python and not os.access(python, os.X_OK):
    raise UserError(f'--reference-python {python}: not an executable file')
  timing = ['--steps', str(args.steps), '--warmup', str(args.warmup)]
  ours = [sys.executable, '-m', 'jaisp_jax.bench', 'step', f'--config={args.config}', *timing]
  if args.quotas:
    ours += ['--quotas', args.quotas]
  ours += list(overrides)
  eager = [python, script, '--threads', str(args.threads or hardware.cpu_cores()), *timing,
           *shlex.split(args.reference_args or '')]
  env = hugepages.original_environment()
  ref_env = hugepages.environment(env) if args.reference_hugepages else env
  # Ours runs where this command was started, as the user would run it (a relative
  # --config resolves there); the reference in its folder, as its README says.
  out = {'ours': (ours, os.getcwd(), env), 'eager': (eager, ref, ref_env)}
  if not args.no_compile:
    out['compile'] = (eager + ['--compile'], ref, ref_env)
  return out


def run_one(name: str, argv: list[str], cwd: str, env: dict[str, str] | None,
            timeout: float) -> dict[str, Any]:
  """Runs one program to completion; its contract figures, wall time and the CPU
  use just before it."""
  busy = busy_fraction()
  start = time.time()
  try:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
  except FileNotFoundError as e:
    raise UserError(f'{name}: cannot run {argv[0]!r}: {e.strerror}') from None
  except subprocess.TimeoutExpired:
    raise UserError(f'{name}: `{shlex.join(argv)}` ran past --timeout {timeout:g} s') from None
  wall = time.time() - start
  if proc.returncode != 0:
    tail = (proc.stderr or proc.stdout)[-_TAIL:].strip()
    raise UserError(f'{name}: `{shlex.join(argv)}` (in {cwd}) exited with status '
                    f'{proc.returncode}:\n{tail}')
  figures = parse_contract(proc.stdout, f'{name} (`{shlex.join(argv)}`)')
  return dict(figures, program=name, argv=argv, busy_before=busy, wall_s=wall,
              started=time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start)))


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per-round ratios (ours / reference samples/s) and their summary over the rounds."""
  by_round: dict[int, dict[str, float]] = {}
  for run in runs:
    by_round.setdefault(run['round'], {})[run['program']] = run['samples_per_s']
  rounds = []
  for r in sorted(by_round):
    sps = by_round[r]
    row = {'round': r, **{f'{k}_samples_per_s': v for k, v in sps.items()}}
    for ref in ('eager', 'compile'):
      if 'ours' in sps and ref in sps:
        row[f'vs_{ref}'] = sps['ours'] / sps[ref]
    rounds.append(row)
  summary: dict[str, Any] = {'rounds': rounds}
  for ref, goal in (('eager', GOAL_EAGER), ('compile', GOAL_COMPILE)):
    ratios = [row[f'vs_{ref}'] for row in rounds if f'vs_{ref}' in row]
    if ratios:
      summary[f'vs_{ref}'] = {
          'median': statistics.median(ratios), 'min': min(ratios), 'max': max(ratios),
          'goal': goal, 'met_every_round': all(x >= goal for x in ratios),
          'met_rounds': sum(x >= goal for x in ratios), 'rounds': len(ratios)}
  return summary


def report_lines(summary: dict[str, Any]) -> list[str]:
  """The summary as a table and one verdict line per reference."""
  lines = ['round | ours samples/s | eager | compile | ours/eager | ours/compile']
  fmt = lambda x, spec: format(x, spec) if x is not None else '-'
  for row in summary['rounds']:
    lines.append(' | '.join([
        str(row['round']), fmt(row.get('ours_samples_per_s'), '.2f'),
        fmt(row.get('eager_samples_per_s'), '.2f'), fmt(row.get('compile_samples_per_s'), '.2f'),
        fmt(row.get('vs_eager'), '.2f'), fmt(row.get('vs_compile'), '.2f')]))
  for ref in ('eager', 'compile'):
    s = summary.get(f'vs_{ref}')
    if s:
      lines.append(
          f'ours / {ref}: median {s["median"]:.2f}x (range {s["min"]:.2f}-{s["max"]:.2f}) over '
          f'{s["rounds"]} round(s); goal >= {s["goal"]:g}x met in {s["met_rounds"]} of '
          f'{s["rounds"]}')
  return lines


def run(args, overrides: Sequence[str], log: Callable[[str], None] = print) -> dict[str, Any]:
  """The sitting: every command of `schedule`, then the summary (also returned)."""
  if args.rounds < 1:
    raise UserError(f'--rounds must be at least 1, got {args.rounds}')
  cmds = commands(args, overrides)
  runs = []
  for r, name in schedule(args.rounds, 'compile' in cmds):
    argv, cwd, env = cmds[name]
    log(f'round {r}: {name}: {shlex.join(argv)}')
    res = run_one(name, argv, cwd, env, args.timeout)
    res['round'] = r
    busy = res['busy_before']
    log(f'  samples_per_s={res["samples_per_s"]:.3f} steps_per_s={res["steps_per_s"]:.4f} '
        f'peak_rss_mb={res["peak_rss_mb"]:.0f} ({res["wall_s"]:.0f} s; CPU busy before: '
        + ('n/a' if busy is None else f'{busy:.0%}')
        + ('; NOT IDLE: this figure measures the neighbours too' if busy and busy > 0.25
           else '') + ')')
    runs.append(res)
  summary = summarize(runs)
  cores = hardware.cpu_cores()
  summary.update(runs=runs, cpus=cores, threads=args.threads or cores,
                 reference_hugepages=bool(args.reference_hugepages))
  for line in report_lines(summary):
    log(line)
  return summary
