"""Test-wide settings: 8 simulated CPU devices, strict rank promotion, quiet TF."""

import os

# Must be set before jax is imported anywhere: sharding tests build meshes of up to 8
# CPU devices; tests that want one device use jax.devices()[:1] explicitly.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('TF_ENABLE_ONEDNN_OPTS', '0')

# JAX's persistent compilation cache, one fresh folder per pytest run shared by its xdist
# workers (they inherit the controller's environment): the many tests that build the same
# tiny model compile its programs once. With `--dist loadscope` (setup.cfg) the suite went
# from 1075 s to 708-781 s on a 2-core Intel Xeon (session 12). Set
# JAX_COMPILATION_CACHE_DIR yourself to keep a cache between runs, or to '' for none.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ and 'PYTEST_XDIST_WORKER' not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  _cache = tempfile.mkdtemp(prefix='jaisp-test-jax-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
  # No size limit: with one, JAX takes a file lock and scans every entry on each write
  # (3000 writes took 213 s), which slowed the suite by 150-200 s. Without the lock a
  # process may read an entry another is still writing; that entry then fails to
  # decompress, and JAX warns and compiles again (never a wrong program).

import jax  # noqa: E402

jax.config.update('jax_numpy_rank_promotion', 'raise')
