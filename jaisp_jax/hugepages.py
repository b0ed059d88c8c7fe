"""Transparent huge pages for the host heap of the command-line programs (Linux, glibc).

XLA:CPU allocates a program's temporary buffers (776 MB for the
`configs/jepa.py:torch_ref` train step) with malloc on every execution, and glibc
serves allocations that large with a fresh mmap that is returned on free, so every
step touches ~200 000 new 4 KiB pages: a page fault and a zeroed page each. glibc
(>= 2.35) can ask the kernel for 2 MiB transparent huge pages instead
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which madvises its mmaps and heap), cutting
the faults 11x. Measured on the 2-core AMD EPYC, train step at torch_ref, two
alternations of 16 steps: 2.44 / 2.48 s -> 2.11 / 2.12 s median, minor faults per
run 4.0 M -> 0.35 M (docs/performance.md).

glibc reads tunables only at process start, so `reexec()` -- called first thing by
the `python -m jaisp_jax...` entry points, never on import -- restarts the same
command line once with the tunable added when it would take effect:

* Linux with glibc >= 2.35, and the kernel's THP mode is `madvise` (with `always` the
  kernel already backs large mappings with huge pages; with `never` nothing helps);
* the tunable is not set already (a user's own GLIBC_TUNABLES value is kept and
  extended, and an explicit `glibc.malloc.hugetlb=...` in it is respected);
* JAISP_HUGEPAGES is not '0' (the opt-out).

The restart keeps the process id, arguments and environment; it costs one Python
start-up (~0.1 s), before anything heavy is imported. It marks the environment
(JAISP_HUGEPAGES_ADDED=1) so that `original_environment()` can give a child program
the environment the user started us with (`bench versus` runs the PyTorch reference so).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb'
OPT_OUT = 'JAISP_HUGEPAGES'
ADDED = 'JAISP_HUGEPAGES_ADDED'  # set by `environment()`: the tunable was ours, not the user's
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never') or None."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def _glibc_at_least(major: int, minor: int) -> bool:
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return False
  try:
    have = tuple(int(p) for p in version.split('.')[:2])
  except ValueError:
    return False
  return have >= (major, minor)


def wanted(environ=None) -> bool:
  """Whether restarting with the tunable would change anything (module docstring)."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, '1') == '0':
    return False
  if TUNABLE in environ.get('GLIBC_TUNABLES', ''):
    return False
  return (sys.platform.startswith('linux') and _glibc_at_least(2, 35)
          and thp_mode() == 'madvise')


def environment(environ=None) -> dict[str, str]:
  """A copy of `environ` with the tunable added to GLIBC_TUNABLES."""
  env = dict(os.environ if environ is None else environ)
  current = env.get('GLIBC_TUNABLES', '')
  env['GLIBC_TUNABLES'] = f'{current}:{TUNABLE}=1' if current else f'{TUNABLE}=1'
  env[ADDED] = '1'
  return env


def original_environment(environ=None) -> dict[str, str]:
  """A copy of `environ` without what `environment()` added (the user's own settings)."""
  env = dict(os.environ if environ is None else environ)
  if env.pop(ADDED, None) == '1':
    parts = env.get('GLIBC_TUNABLES', '').split(':')
    if f'{TUNABLE}=1' in parts:
      parts.remove(f'{TUNABLE}=1')
    if any(parts):
      env['GLIBC_TUNABLES'] = ':'.join(p for p in parts if p)
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env


def reexec() -> None:
  """Restarts this command line with huge pages for malloc, if `wanted()`; else returns."""
  argv = getattr(sys, 'orig_argv', None)
  if not argv or not wanted():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *argv[1:]], environment())
  except OSError:
    return  # could not restart: carry on with the default heap
