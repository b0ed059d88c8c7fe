"""XLA compiler options the project compiles its programs with, per platform.

Every jitted program that runs the model (the train step and state init through
`Trainer.jit`, the inference / evaluation forward passes through `jit`) takes these
options, so that a platform-specific choice is made in one place and recorded in the
config (`config.cpu_convolutions`). Small host-side helpers without convolutions
(probe heads, metrics) keep plain `jax.jit`.

CPU convolutions. jaxlib (0.10) hands convolutions to YNNPACK by default. On the CPUs
measured here XLA's own multi-threaded convolution kernels are faster for the band
stems' 3x3 convolutions (2 -> 32 -> 64 channels at full resolution, the bulk of a
step's FLOPs): 11 ms against 15 ms for two samples' 32 -> 64 layer, and the
`configs/jepa.py:torch_ref` train step 2.28 s against 2.56 s (median of 24 steps each,
interleaved in one process on a 2-core AMD EPYC; docs/performance.md). So
`cpu_convolutions='xla'` (the default) keeps YNNPACK for dots and reductions and
leaves convolutions to XLA; 'ynnpack' is jaxlib's default. Dots stay on YNNPACK: XLA's
own dots and XNNPACK's were slower (6.98 and 6.66 against 7.45 samples/s, one sitting).

A jaxlib that does not know the option (it is experimental and may be renamed) gets
jaxlib's defaults and one warning, never a failed compile: `compiler_options` checks
the options once per process on a tiny program first.
"""

from __future__ import annotations

import functools

from absl import logging
import jax

from jaisp_jax.cli import UserError

CPU_CONVOLUTIONS = ('xla', 'ynnpack')
DEFAULT_CPU_CONVOLUTIONS = 'xla'

_YNN_FUSION_TYPE = 'xla_cpu_experimental_ynn_fusion_type'
# jaxlib 0.10's default is INDIVIDUAL_DOT, INDIVIDUAL_CONVOLUTION, REDUCE.
_YNN_WITHOUT_CONVOLUTIONS = 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'


def _platform(platform: str | None) -> str:
  return platform or jax.default_backend()


@functools.cache
def _supported(items: tuple[tuple[str, str], ...]) -> bool:
  """Whether this jaxlib compiles a small convolution with these CPU options."""
  try:
    x = jax.ShapeDtypeStruct((1, 8, 8, 2), 'float32')
    k = jax.ShapeDtypeStruct((3, 3, 2, 4), 'float32')
    conv = lambda x, k: jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')).sum()
    jax.jit(conv, compiler_options=dict(items)).trace(x, k).lower(
        lowering_platforms=('cpu',)).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except  # any failure: use the defaults
    logging.warning('this jaxlib does not take the CPU compiler options %s (%s); using its '
                    'defaults', dict(items), str(e).splitlines()[0][:200])
    return False


def compiler_options(platform: str | None = None,
                     cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS) -> dict[str, str] | None:
  """Compiler options for a program compiled for `platform` (default: JAX's backend).

  Args:
    platform: 'cpu', 'gpu', 'tpu', ... (the devices the program runs on).
    cpu_convolutions: 'xla' or 'ynnpack' (module docstring); ignored off CPU.
  Returns:
    The options for `jax.jit(..., compiler_options=...)`, or None for XLA's defaults.
  """
  if cpu_convolutions not in CPU_CONVOLUTIONS:
    raise UserError(f'config.cpu_convolutions must be one of {CPU_CONVOLUTIONS}, got '
                    f'{cpu_convolutions!r}')
  if _platform(platform) != 'cpu' or cpu_convolutions == 'ynnpack':
    return None
  options = {_YNN_FUSION_TYPE: _YNN_WITHOUT_CONVOLUTIONS}
  return options if _supported(tuple(sorted(options.items()))) else None


def mesh_platform(mesh) -> str:
  """The platform of a mesh's devices."""
  return mesh.devices.flat[0].platform


def jit(fn, *, platform: str | None = None,
        cpu_convolutions: str = DEFAULT_CPU_CONVOLUTIONS, **kwargs):
  """`jax.jit(fn, **kwargs)` with this module's `compiler_options` for `platform`."""
  return jax.jit(fn, compiler_options=compiler_options(platform, cpu_convolutions), **kwargs)
