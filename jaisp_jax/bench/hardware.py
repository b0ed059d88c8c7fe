"""Peak FLOP/s per device kind (the denominator of MFU) and host memory figures.

Accelerators: the vendor's dense peak per chip (no sparsity), per compute dtype.
float32 on GPUs is the TF32 tensor-core peak, because XLA's default matmul precision
on Ampere and later runs float32 dots in TF32; on TPUs float32 dots run as bf16
passes, and the table gives the bf16 peak for both.

CPUs: ``cores x clock x FLOPs per cycle per core``, with the clock read from
/proc/cpuinfo (the nominal clock on a VM; turbo makes the true peak higher, so CPU
MFU figures are upper bounds) and FLOPs per cycle from the vector ISA:

  ==============================================  ==================  =====
  ISA (cpuinfo flags)                             FMA units x lanes   f32
  ==============================================  ==================  =====
  AVX-512, Intel server cores (2 x 512-bit FMA)   2 x 16 x 2          64
  AVX-512, AMD Zen 4 (family 25: 256-bit units)   2 x 8 x 2           32
  AVX-512, AMD Zen 5 (family 26: 512-bit units)   2 x 16 x 2          64
  AVX2 + FMA                                      2 x 8 x 2           32
  anything else (SSE)                             2 x 4 x 1           8
  ==============================================  ==================  =====

bfloat16 on CPUs is counted at the float32 peak (XLA:CPU upcasts most bf16 work).
Pass `--peak-tflops` to the harness to use your own figure.
"""

from __future__ import annotations

import dataclasses
import os
import resource

# Dense peak TFLOP/s per chip: device_kind substring -> {dtype: TFLOP/s}.
ACCELERATOR_PEAKS = {
    'H200': {'bfloat16': 989.0, 'float32': 494.0},     # SXM; same SMs and clocks as H100 SXM
    'H100': {'bfloat16': 989.0, 'float32': 494.0},     # SXM (PCIe: 756 / 378)
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
    'L4': {'bfloat16': 121.0, 'float32': 60.0},
    'TPU v6': {'bfloat16': 918.0, 'float32': 918.0},
    'TPU v5p': {'bfloat16': 459.0, 'float32': 459.0},
    'TPU v5': {'bfloat16': 197.0, 'float32': 197.0},    # v5e / v5 lite
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
}


@dataclasses.dataclass(frozen=True)
class Peak:
  flops_per_s: float   # per device; nan when unknown
  how: str             # how it was derived (printed next to MFU)


def _cpuinfo() -> dict[str, str]:
  info: dict[str, str] = {}
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if ':' in line:
          k, v = line.split(':', 1)
          info.setdefault(k.strip(), v.strip())
  except OSError:
    pass
  return info


def cpu_cores() -> int:
  """Cores this process may run on (affinity), not the machine's count."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def cpu_flops_per_cycle(info: dict[str, str]) -> tuple[int, str]:
  """(float32 FLOPs per cycle per core, ISA name) from /proc/cpuinfo fields."""
  flags = set(info.get('flags', '').split())
  vendor = info.get('vendor_id', '')
  family = int(info.get('cpu family', '0') or 0)
  if 'avx512f' in flags:
    if vendor == 'AuthenticAMD' and family < 26:
      return 32, 'AVX-512 on AMD Zen 4 (256-bit FMA units)'
    return 64, 'AVX-512 (2 x 512-bit FMA units)'
  if 'avx2' in flags and 'fma' in flags:
    return 32, 'AVX2 + FMA'
  return 8, 'SSE'


def cpu_peak(cores: int | None = None) -> Peak:
  """float32 peak of the CPU cores this process may use (see module docstring)."""
  info = _cpuinfo()
  cores = cpu_cores() if cores is None else cores
  per_cycle, isa = cpu_flops_per_cycle(info)
  try:
    ghz = float(info.get('cpu MHz', 'nan')) / 1e3
  except ValueError:
    ghz = float('nan')
  name = info.get('model name', 'unknown CPU')
  return Peak(cores * ghz * 1e9 * per_cycle,
              f'{name}: {cores} cores x {ghz:.2f} GHz x {per_cycle} f32 FLOP/cycle ({isa})')


def device_peak(device, dtype: str = 'float32', override_tflops: float | None = None) -> Peak:
  """Peak FLOP/s of one device for `dtype` compute ('float32' or 'bfloat16')."""
  if override_tflops:
    return Peak(override_tflops * 1e12, f'--peak-tflops {override_tflops}')
  if device.platform == 'cpu':
    # One XLA CPU device uses every core of the process.
    return cpu_peak()
  kind = getattr(device, 'device_kind', '')
  for key, peaks in ACCELERATOR_PEAKS.items():
    if key.lower() in kind.lower():
      dt = dtype if dtype in peaks else 'float32'
      return Peak(peaks[dt] * 1e12, f'{kind}: {peaks[dt]:.0f} TFLOP/s dense {dt} (vendor figure)')
  return Peak(float('nan'), f'{kind}: peak unknown (pass --peak-tflops); MFU n/a')


def peak_rss_mb() -> float:
  """Peak resident memory of this process (Linux ru_maxrss is in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def device_memory_peak_mb(device) -> float | None:
  """Peak device memory in use (accelerators); None where the backend has no stats."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except  # backends without the API
    return None
  if not stats or 'peak_bytes_in_use' not in stats:
    return None
  return stats['peak_bytes_in_use'] / 2 ** 20
