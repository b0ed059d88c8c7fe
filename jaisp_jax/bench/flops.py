"""Matmul FLOPs of a traced program, counted on its jaxpr (platform-independent).

MFU counts the FLOPs of the matrix work a step must do: every `dot_general` (2 x batch
x M x N x K) and `conv_general_dilated` (2 x output elements x kernel taps x input
channels per group), nothing else. Counting on the jaxpr, before any compiler has seen
the program, gives the same figure on every platform. XLA's own cost analysis does not:
on GPUs the optimised program's analysis leaves out the cuBLAS / cuDNN library calls
(0.30 of the 0.94 TFLOP of the base step on an H200), and jax 0.11's GPU client
returns no analysis for the unoptimised program at all.

Sub-programs are walked: `pjit`, `custom_jvp_call`, `custom_vjp_call`, `remat`, ... once
each; `scan` bodies times their length; `cond` the costliest branch; `while` bodies once
(their trip count is not static), reported in `Count.while_loops` so a caller can tell
that the figure is a lower bound (the per-sample stem loop on CPU: count with
`sample_conv.implementation('im2col')`, as the harness does).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from jax.extend import core as jex_core


@dataclasses.dataclass
class Count:
  dot: float = 0.0          # dot_general FLOPs
  conv: float = 0.0         # conv_general_dilated FLOPs
  while_loops: int = 0      # while bodies counted once

  @property
  def total(self) -> float:
    return self.dot + self.conv

  def add(self, other: 'Count', times: float = 1.0):
    self.dot += times * other.dot
    self.conv += times * other.conv
    self.while_loops += other.while_loops


def _dot_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  (lc, rc), (lb, rb) = eqn.params['dimension_numbers']
  batch = math.prod(lhs.shape[d] for d in lb)
  contract = math.prod(lhs.shape[d] for d in lc)
  m = math.prod(s for d, s in enumerate(lhs.shape) if d not in lc and d not in lb)
  n = math.prod(s for d, s in enumerate(rhs.shape) if d not in rc and d not in rb)
  return 2.0 * batch * m * n * contract


def _conv_flops(eqn) -> float:
  # Each output element sums kernel taps x the kernel's input features (already per
  # feature group); batch-grouped convolutions (kernel gradients) likewise.
  rhs = eqn.invars[1].aval
  out = eqn.outvars[0].aval
  rhs_spec = eqn.params['dimension_numbers'].rhs_spec  # (out feat, in feat, spatial...)
  # An input dilated by d (the input gradient of a stride-d convolution) puts d - 1
  # zeros between its pixels: a kernel of k taps meets ceil(k / d) real ones.
  dil = eqn.params.get('lhs_dilation') or (1,) * (len(rhs_spec) - 2)
  taps = math.prod(-(-rhs.shape[d] // di) for d, di in zip(rhs_spec[2:], dil))
  return 2.0 * math.prod(out.shape) * taps * rhs.shape[rhs_spec[1]]


def sub_jaxprs(params: dict[str, Any]):
  """The jaxprs (open) among an equation's params: jit, cond branches, custom rules."""
  for v in params.values():
    items = v if isinstance(v, (list, tuple)) else (v,)
    for x in items:
      if isinstance(x, jex_core.ClosedJaxpr):
        yield x.jaxpr
      elif isinstance(x, jex_core.Jaxpr):
        yield x


def count_jaxpr(jaxpr) -> Count:
  """Matmul FLOPs of a (closed) jaxpr, sub-programs included (module docstring)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = Count()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total.dot += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total.conv += _conv_flops(eqn)
    elif name == 'scan':
      total.add(count_jaxpr(eqn.params['jaxpr']), times=eqn.params['length'])
    elif name == 'cond':
      branches = [count_jaxpr(b) for b in eqn.params['branches']]
      total.add(max(branches, key=lambda c: c.total))
    elif name == 'while':
      total.add(count_jaxpr(eqn.params['body_jaxpr']))
      total.add(count_jaxpr(eqn.params['cond_jaxpr']))
      total.while_loops += 1
    else:
      for sub in sub_jaxprs(eqn.params):
        total.add(count_jaxpr(sub))
  return total


def count(fn, *args, **kwargs) -> Count:
  """Matmul FLOPs of `fn(*args, **kwargs)` (a jitted function or plain callable);
  args may be arrays or `jax.ShapeDtypeStruct`s."""
  if hasattr(fn, 'trace'):
    return count_jaxpr(fn.trace(*args, **kwargs).jaxpr)
  return count_jaxpr(jax.make_jaxpr(fn)(*args, **kwargs))
