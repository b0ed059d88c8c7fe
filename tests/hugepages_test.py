"""Huge pages for the host heap: when the restart happens, and that it takes effect."""

import json
import os
import subprocess
import sys

from jaisp_jax import hugepages

# A child that restarts itself like the entry points do, then mallocs and touches
# 256 MiB outside numpy (numpy madvises its own large arrays) and reports how much of
# it the kernel backed with huge pages.
_CHILD = r'''
import ctypes, json, os, sys
from jaisp_jax import hugepages
hugepages.reexec()

def anon_huge_kb():
  with open('/proc/self/smaps_rollup') as f:
    for line in f:
      if line.startswith('AnonHugePages:'):
        return int(line.split()[1])
  return 0

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
before = anon_huge_kb()
n = 256 << 20
p = libc.malloc(n)
ctypes.memset(p, 1, n)
print(json.dumps({'tunables': os.environ.get('GLIBC_TUNABLES', ''), 'pid': os.getpid(),
                  'huge_mb': (anon_huge_kb() - before) / 1024}))
'''


def _run_child(extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT)}
  env.update(extra_env)
  out = subprocess.run([sys.executable, '-c', _CHILD], env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_wanted_respects_opt_out_and_an_existing_setting():
  assert not hugepages.wanted({hugepages.OPT_OUT: '0'})
  assert not hugepages.wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'})
  assert not hugepages.wanted({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'})


def test_environment_extends_existing_tunables():
  assert hugepages.environment({})['GLIBC_TUNABLES'] == 'glibc.malloc.hugetlb=1'
  env = hugepages.environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': 'y'})
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1', 'X': 'y',
                 hugepages.ADDED: '1'}


def test_original_environment_removes_only_what_the_restart_added():
  user = {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2', 'X': 'y'}
  assert hugepages.original_environment(hugepages.environment(user)) == user
  assert hugepages.original_environment(hugepages.environment({'X': 'y'})) == {'X': 'y'}
  # A user's own tunable (no marker: we did not restart) is theirs and stays.
  own = {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert hugepages.original_environment(own) == own


def test_thp_mode_parses_the_kernel_file(tmp_path):
  f = tmp_path / 'enabled'
  f.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(f)) == 'madvise'
  f.write_text('[always] madvise never\n')
  assert hugepages.thp_mode(str(f)) == 'always'
  assert hugepages.thp_mode(str(tmp_path / 'missing')) is None


def test_restart_gives_malloc_huge_pages_where_the_system_allows():
  clean = {k: v for k, v in os.environ.items()
           if k not in ('GLIBC_TUNABLES', hugepages.OPT_OUT)}
  on = _run_child({})
  off = _run_child({hugepages.OPT_OUT: '0'})
  assert 'glibc.malloc.hugetlb' not in off['tunables']
  assert off['huge_mb'] < 64  # madvise mode: plain malloc memory stays in 4 KiB pages
  if hugepages.wanted(clean):
    assert on['tunables'] == 'glibc.malloc.hugetlb=1'
    # Most of the 256 MiB is backed by 2 MiB pages (the edges of the mapping are not).
    assert on['huge_mb'] >= 128, on
  else:  # no THP madvise mode or an old glibc: nothing to gain, so no restart
    assert 'glibc.malloc.hugetlb' not in on['tunables']
