"""Where the step's time goes: a profiler trace of a few steps, summarised per model part.

`trace(bench, logdir, steps)` records `steps` steps with `jax.profiler.trace` (a
TensorBoard / Perfetto trace under `logdir`, plus `step.hlo.txt`, the optimised HLO
the trace's op names refer to). `summarize(logdir, hlo_text, steps)` reads the
Perfetto JSON back and adds up, per step, the time of every compiled op by

  phase   'fwd online' / 'fwd target' (EMA branch) / 'bwd' / 'update' (optimizer,
          EMA, metrics) from the op's JAX name stack (jvp / transpose / encode);
  part    the Flax module path (stems/stem_rubin, trunk/block/attn, predictor, ...;
          block indices dropped);
  kind    'matmul' (dots, convolutions and the library fusions that run them:
          YNNPACK / oneDNN / cuBLAS / cuDNN) or 'other' (elementwise, copies,
          concatenations, reductions).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

import jax

_MATMUL = re.compile(r'dot|conv|gemm|ynn|xnn|onednn|cublas|cudnn|matmul|triton')
_CONTROL = re.compile(r'\s(while|conditional|call)\(')
_SKIP = re.compile(r'^(jit\(|jvp\(|transpose\(|vmap\(|remat|checkpoint|JAISP|pjit|cond$|'
                   r'branch_\d|while$|body$|closed_call|custom_)')


def trace(bench, logdir: str, steps: int = 2) -> str:
  """Traces `steps` more steps of a compiled `StepBench`; returns the trace file path."""
  os.makedirs(logdir, exist_ok=True)
  with open(os.path.join(logdir, 'step.hlo.txt'), 'w') as f:
    f.write(bench.compiled.as_text())
  with jax.profiler.trace(logdir, create_perfetto_trace=True):
    for i in range(steps):
      with jax.profiler.StepTraceAnnotation('train', step_num=i):
        bench.run(1, start=i)
  files = sorted(glob.glob(os.path.join(logdir, '**', '*.trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  return files[-1] if files else ''


def op_names(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> JAX op_name metadata, from optimised HLO text.

  Control-flow ops (while, conditional, call) are left out: their trace events span
  the ops of their bodies, which are counted themselves.
  """
  out = {}
  for m in re.finditer(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?)op_name="([^"]*)"', hlo_text, re.M):
    if not _CONTROL.search(m.group(2)):
      out[m.group(1)] = m.group(3)
  return out


def categorize(instr: str, op_name: str) -> tuple[str, str, str]:
  """(phase, part, kind) of one compiled op (module docstring)."""
  stack = op_name.split('/')
  if any(p.startswith('transpose(') for p in stack):
    phase = 'bwd'
  elif any(p.startswith('jvp(JAISP.encode') for p in stack):
    phase = 'fwd target'
  elif any(p.startswith('jvp(JAISP') for p in stack):
    phase = 'fwd online'
  else:
    phase = 'update'
  parts = [p for p in op_name.split('/')[1:-1] if p and not _SKIP.match(p)]
  parts = [re.sub(r'_\d+$', '', p) for p in parts]
  part = '/'.join(parts[:3]) if parts and phase != 'update' else '(optimizer, EMA, metrics)'
  kind = 'matmul' if _MATMUL.search(instr) or _MATMUL.search(op_name.split('/')[-1]) else 'other'
  return phase, part, kind


def summarize(trace_file: str, hlo_text: str, steps: int) -> list[tuple[str, str, str, float]]:
  """[(phase, part, kind, ms per step)], largest first, from a Perfetto trace."""
  with gzip.open(trace_file) as f:
    events = json.load(f)['traceEvents']
  names = op_names(hlo_text)
  totals: dict[tuple[str, str, str], float] = collections.Counter()
  # XLA:CPU names each op's event after its HLO instruction; on GPUs the device's
  # kernel events are named after the kernel and carry the instruction in args.hlo_op
  # (the host-side launch events are then left out, not counted twice).
  on_device = any('hlo_op' in e.get('args', {}) for e in events if e.get('ph') == 'X')
  for e in events:
    if e.get('ph') != 'X':
      continue
    instr = e.get('args', {}).get('hlo_op') if on_device else e['name']
    if instr not in names:
      continue
    totals[categorize(instr, names[instr])] += e['dur'] / 1e3 / steps
  return sorted(((*k, v) for k, v in totals.items()), key=lambda r: -r[3])


def report(rows: list[tuple[str, str, str, float]], top: int = 25) -> list[str]:
  """Table lines of `summarize` rows, with shares of the traced op time."""
  total = sum(r[3] for r in rows) or 1.0
  by_kind = collections.Counter()
  by_phase = collections.Counter()
  for phase, _, kind, ms in rows:
    by_kind[kind] += ms
    by_phase[phase] += ms
  lines = [f'traced op time {total:.0f} ms per step: ' + ', '.join(
      f'{k} {100 * v / total:.0f}%' for k, v in by_phase.most_common()) + '; ' + ', '.join(
      f'{k} {100 * v / total:.0f}%' for k, v in by_kind.most_common())]
  lines.append(f'{"ms/step":>9} {"share":>6}  {"phase":10} {"kind":6}  part')
  for phase, part, kind, ms in rows[:top]:
    lines.append(f'{ms:9.1f} {100 * ms / total:5.1f}%  {phase:10} {kind:6}  {part}')
  return lines
