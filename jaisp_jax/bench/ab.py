"""Variants of the train step timed against each other in ONE process, interleaved.

    python -m jaisp_jax.bench ab --config=configs/jepa.py:torch_ref \
        --variant base= --variant ynn=--config.cpu_convolutions=ynnpack --rounds 6 --steps 4

Why: on a shared or drifting machine two separate processes of the same program differ
by up to ~25% (docs/performance.md, session 6), so a 3% change cannot be decided by
running `step` twice. Here every variant is compiled first (each with its own state
and synthetic batches, all held in memory at once), warmed up, and then timed in
rounds of `steps` blocked steps each, the variants' order reversed every other round,
so that drift hits all of them alike.

A variant is `NAME=FLAGS`: flags on top of the common `--config.<field>=<value>`
overrides: more `--config.` overrides, `--stem-conv=<form>` and `--stem-embed=<form>`
(as for `step`), and `--xla=<option>=<value>`, an XLA option for that variant's compile
alone (e.g. `--xla=xla_gpu_enable_cublaslt=true`: XLA_FLAGS would set it for every
variant). The first variant is the baseline. Reported per variant: median step,
p25-p75, min, samples/s at the median, MFU where the device's peak is known; against
the baseline the ratio of medians, the per-round ratios (each round's median over the
baseline's in the same round) and in how many rounds the variant was faster. Nothing
is asserted: the figures are the result.

`pipelined=True` (`--pipelined`): each round's steps are dispatched back to back and
blocked on once, as the training loop runs them; a round then gives one time per step
(its total / steps), so the statistics are over rounds. On an accelerator that takes the
host's dispatch out of the step time (~13 ms per ViT-B step on an H200, session 5).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import shlex
import statistics
import time
from typing import Any, Callable, Sequence

import jax

from jaisp_jax import bands as bands_lib
from jaisp_jax.bench import configs
from jaisp_jax.bench import hardware
from jaisp_jax.bench import step as step_lib
from jaisp_jax.cli import UserError
from jaisp_jax.models import sample_conv
from jaisp_jax.train import sharding


@dataclasses.dataclass
class Variant:
  name: str
  flags: str
  overrides: list[str]
  stem_conv: str = 'auto'
  stem_embed: str = 'matmul'
  compiler_options: dict[str, Any] = dataclasses.field(default_factory=dict)


def parse_variant(spec: str) -> Variant:
  """`NAME=FLAGS` (module docstring) -> Variant; UserError for a malformed spec."""
  name, sep, flags = spec.partition('=')
  name = name.strip()
  if not sep or not name:
    raise UserError(f"--variant {spec!r}: expected NAME=FLAGS, e.g. 'base=' or "
                    "'ynn=--config.cpu_convolutions=ynnpack'")
  variant = Variant(name=name, flags=flags.strip(), overrides=[])
  try:
    words = shlex.split(flags)
  except ValueError as e:  # an unbalanced quote
    raise UserError(f'--variant {name}: cannot split its flags ({e})') from None
  i = 0
  while i < len(words):
    word = words[i]
    key, eq, value = word.partition('=')
    if key in ('--stem-conv', '--stem-embed'):
      if not eq:  # `--stem-conv loop`
        if i + 1 >= len(words):
          raise UserError(f'--variant {name}: {key} needs a value')
        i += 1
        value = words[i]
      choices = sample_conv.IMPLEMENTATIONS if key == '--stem-conv' else sample_conv.EMBEDDINGS
      if value not in choices:
        raise UserError(f'--variant {name}: {key} must be one of {choices}, got {value!r}')
      setattr(variant, key[2:].replace('-', '_'), value)
    elif key == '--xla':
      if not eq:  # `--xla name=value`
        if i + 1 >= len(words):
          raise UserError(f'--variant {name}: --xla needs NAME=VALUE')
        i += 1
        value = words[i]
      option, setting = step_lib.parse_compiler_option(value)
      variant.compiler_options[option] = setting
    elif word.startswith('--config.') and eq:
      variant.overrides.append(word)
    else:
      raise UserError(f'--variant {name}: unexpected flag {word!r} (expected '
                      '--config.<field>=<value>, --stem-conv=<form>, --stem-embed=<form> or '
                      '--xla=<option>=<value>)')
    i += 1
  return variant


def parse_variants(specs: Sequence[str]) -> list[Variant]:
  variants = [parse_variant(s) for s in specs]
  names = [v.name for v in variants]
  if len(variants) < 2:
    raise UserError('ab: give at least two --variant (the first is the baseline)')
  if len(set(names)) != len(names):
    raise UserError(f'ab: variant names must differ, got {names}')
  return variants


_METADATA = re.compile(r',? (?:metadata|source_file|source_line)=(?:\{[^{}]*\}|"[^"]*"|\d+)')


def program_fingerprint(hlo_text: str) -> str:
  """12 hex digits of the optimised program's instructions: the HLO text without its
  source metadata (op names, stack frames, file locations), which differs between a
  fresh compile and an executable read back from JAX's persistent compilation cache."""
  lines = [_METADATA.sub('', line) for line in hlo_text.splitlines()
           if line.startswith(('HloModule', ' ', '%', 'ENTRY', 'ROOT', '}'))]
  return hashlib.sha1('\n'.join(lines).encode()).hexdigest()[:12]


def run(config_spec: str, common: Sequence[str], variants: Sequence[Variant], *,
        quotas_arg: str | None = None, rounds: int = 6, steps: int = 4, warmup: int = 2,
        pipelined: bool = False, peak_tflops: float | None = None, mesh=None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
  """Compiles, warms up and times `variants` interleaved (module docstring); the figures."""
  if rounds < 1 or steps < 1 or warmup < 0:
    raise UserError(f'ab: --rounds and --steps must be >= 1 and --warmup >= 0 (got '
                    f'{rounds}, {steps}, {warmup})')
  benches, figures = {}, {'config': config_spec, 'overrides': list(common), 'rounds': rounds,
                          'steps_per_round': steps, 'warmup': warmup, 'pipelined': pipelined,
                          'variants': {}}
  # Every variant's config first, so that a bad override fails before any compile.
  loaded = [configs.load_config(config_spec, list(common) + v.overrides) for v in variants]
  for v, config in zip(variants, loaded):
    registry = bands_lib.BandRegistry.from_config(config.bands)
    data_parallel = sharding.data_size(mesh if mesh is not None else sharding.make_mesh(config))
    quotas = configs.bench_quotas(config, registry, data_parallel, quotas_arg)
    bench = step_lib.StepBench(config, quotas, mesh=mesh,
                               compiler_options=v.compiler_options)
    samples, _ = step_lib.work_per_step(config, bench.trainer.registry, quotas)
    with sample_conv.implementation(v.stem_conv), sample_conv.embedding(v.stem_embed):
      bench.compile()  # the step is traced here, under the variant's stem forms
    bench.init_state()
    t0 = time.perf_counter()
    bench.run(warmup)
    log(f'{v.name}: compiled in {bench.figures["compile_s"]:.1f} s, {warmup} warm-up '
        f'steps in {time.perf_counter() - t0:.1f} s ({v.flags or "no extra flags"})')
    benches[v.name] = bench
    figures['variants'][v.name] = dict(
        flags=v.flags, overrides=v.overrides, stem_conv=v.stem_conv, stem_embed=v.stem_embed,
        compiler_options=v.compiler_options, dtype=config.model.dtype,
        samples_per_step=samples, compile_s=bench.figures['compile_s'],
        flops_per_step_device=bench.figures.get('flops_per_step_device'),
        program_sha1=program_fingerprint(bench.compiled.as_text()),
        times_s=[], round_medians_s=[])

  names = [v.name for v in variants]
  by_program: dict[str, str] = {}
  for name in names:  # flags that change nothing (e.g. an XLA option this backend ignores)
    sha = figures['variants'][name]['program_sha1']
    if sha in by_program:
      figures['variants'][name]['same_program_as'] = by_program[sha]
      log(f'note: {name} compiled to the same program as {by_program[sha]} (fingerprint '
          f'{sha}): its flags changed nothing here, so its times measure noise')
    by_program.setdefault(sha, name)
  done = {n: warmup for n in names}
  for r in range(rounds):
    order = names if r % 2 == 0 else names[::-1]
    for name in order:
      if pipelined:
        times = [benches[name].run_pipelined(steps, start=done[name]) / steps]
      else:
        times = benches[name].run(steps, start=done[name])
      done[name] += steps
      figures['variants'][name]['times_s'].extend(times)
      figures['variants'][name]['round_medians_s'].append(statistics.median(times))
    log(f'round {r + 1}/{rounds}: ' + ', '.join(
        f'{n} {figures["variants"][n]["round_medians_s"][-1]:.3f} s' for n in names))

  base = names[0]
  device = next(iter(benches.values())).mesh.devices.flat[0]
  figures.update(platform=device.platform, device_kind=device.device_kind)
  for name in names:
    f = figures['variants'][name]
    f.update(step_lib.time_stats(f['times_s']))
    f['samples_per_s_at_median'] = f['samples_per_step'] / f['median_s']
    peak = hardware.device_peak(device, f['dtype'], peak_tflops)
    f['peak_flops_per_s_device'] = peak.flops_per_s
    f['mfu_at_median'] = (f['flops_per_step_device'] / f['median_s'] / peak.flops_per_s
                          if peak.flops_per_s > 0 and f['flops_per_step_device'] else None)
    per_round = [a / b for a, b in zip(f['round_medians_s'],
                                       figures['variants'][base]['round_medians_s'])]
    f['ratio_to_baseline'] = f['median_s'] / figures['variants'][base]['median_s']
    f['round_ratios_to_baseline'] = per_round
    f['faster_rounds'] = sum(x < 1 for x in per_round)
  figures['baseline'] = base
  return figures


def report_lines(figures: dict[str, Any]) -> list[str]:
  """The figures as a table (median step, spread, samples/s, ratio to the baseline)."""
  base, rounds = figures['baseline'], figures['rounds']
  lines = [f'{"variant":12s} {"median":>8s} {"p25-p75":>15s} {"min":>7s} {"samples/s":>9s} '
           f'{"MFU":>6s} {"/ " + base:>10s}  faster in']
  for name, f in figures['variants'].items():
    ratio = '' if name == base else f'{f["ratio_to_baseline"]:10.3f}'
    faster = '' if name == base else f'{f["faster_rounds"]} of {rounds} rounds'
    mfu = f'{100 * f["mfu_at_median"]:5.1f}%' if f.get('mfu_at_median') else '   n/a'
    lines.append(f'{name:12s} {f["median_s"]:7.4f}s {f["p25_s"]:7.4f}-{f["p75_s"]:.4f}s '
                 f'{f["min_s"]:6.4f}s {f["samples_per_s_at_median"]:9.2f} {mfu:>6s} {ratio:>10s}'
                 f'  {faster}')
  for name, f in figures['variants'].items():
    if f.get('same_program_as'):
      lines.append(f'{name}: the same program as {f["same_program_as"]} (its flags changed '
                   'nothing)')
  for name, f in figures['variants'].items():
    if name != base:
      lines.append(f'{name} / {base} per round: ' +
                   ' '.join(f'{x:.3f}' for x in f['round_ratios_to_baseline']))
  per_round = figures['steps_per_round']
  how = ('dispatched back to back, one time per round (pipelined)' if figures.get('pipelined')
         else 'each blocked on')
  lines.append(f'{rounds * per_round} timed steps per variant ({rounds} rounds of '
               f'{per_round}, {how}), after {figures["warmup"]} warm-up steps; '
               f'jax {jax.__version__} on {figures.get("device_kind", jax.default_backend())}')
  return lines
