"""`python -m jaisp_jax.bench ab`: variants of the step timed interleaved in one process.

Tiny configs (as tests/bench_test.py); no timed assertions: the checks are that every
variant really is its own program, is timed as asked, and that the ratios are computed
from the times reported.
"""

import statistics

import pytest

from jaisp_jax.bench import ab
from jaisp_jax.bench import scaling
from jaisp_jax.bench import step as step_lib
from jaisp_jax.cli import UserError

from bench_test import SPEC, TINY  # tests/ is on sys.path (pytest's rootdir import)


def test_variant_specs_are_parsed_into_overrides_and_stem_forms():
  v = ab.parse_variant("deep=--config.model.trunk.depth=2 --stem-conv im2col "
                       "--stem-embed=conv")
  assert (v.name, v.overrides, v.stem_conv, v.stem_embed) == (
      'deep', ['--config.model.trunk.depth=2'], 'im2col', 'conv')
  base = ab.parse_variant('base=')
  assert (base.overrides, base.stem_conv, base.stem_embed) == ([], 'auto', 'matmul')


@pytest.mark.parametrize('specs,match', [
    (['base'], 'NAME=FLAGS'),
    (['=--config.optim.lr=1'], 'NAME=FLAGS'),
    (['base=', 'x=--steps=3'], 'unexpected flag'),
    (['base=', 'x=--stem-conv=winograd'], 'stem-conv must be one of'),
    (['base=', 'x=--stem-conv'], 'needs a value'),
    (['base='], 'at least two'),
    (['a=', 'a=--config.optim.lr=1'], 'must differ'),
    (['base=', "x='--config.optim.lr=1"], 'cannot split'),
])
def test_malformed_variants_are_refused(specs, match):
  with pytest.raises(UserError, match=match):
    ab.parse_variants(specs)


def test_cli_refuses_a_lone_variant_before_compiling_anything():
  from jaisp_jax.bench import __main__ as cli_main
  with pytest.raises(UserError, match='at least two'):
    cli_main.main(['ab', f'--config={SPEC}', '--variant', 'base='] + TINY)


def test_a_bad_override_in_a_later_variant_fails_before_any_compile():
  log = []
  variants = ab.parse_variants(['base=', 'bad=--config.model.no_such_field=1'])
  with pytest.raises(UserError, match='no_such_field'):
    ab.run(SPEC, TINY, variants, quotas_arg='rubin-rubin=2', rounds=1, steps=1, warmup=0,
           mesh=scaling.make_mesh(1, 1), log=log.append)
  assert log == []  # nothing was compiled or timed


def test_variants_are_separate_programs_timed_in_alternating_rounds():
  variants = ab.parse_variants(['base=', 'deep=--config.model.trunk.depth=2',
                                'im2col=--stem-conv=im2col'])
  log = []
  fig = ab.run(SPEC, TINY, variants, quotas_arg='rubin-rubin=2', rounds=3, steps=2,
               warmup=1, mesh=scaling.make_mesh(1, 1), log=log.append)
  base, deep, im2col = (fig['variants'][n] for n in ('base', 'deep', 'im2col'))
  # Each variant's flags reached its program: a second trunk block costs FLOPs, and the
  # im2col stems compile to another program than the CPU loop.
  assert deep['flops_per_step_device'] > base['flops_per_step_device'] > 0
  assert im2col['stem_conv'] == 'im2col' and base['stem_conv'] == 'auto'
  assert len({f['program_sha1'] for f in (base, deep, im2col)}) == 3
  for f in (base, deep, im2col):
    assert len(f['times_s']) == 6 and len(f['round_medians_s']) == 3
    assert min(f['times_s']) > 0
    assert f['median_s'] == pytest.approx(statistics.median(f['times_s']))
    assert f['min_s'] <= f['p25_s'] <= f['median_s'] <= f['p75_s'] <= f['max_s']
    assert f['samples_per_s_at_median'] == pytest.approx(2 / f['median_s'])
    # Each round's median is the median of that round's two steps.
    for r in range(3):
      assert f['round_medians_s'][r] == pytest.approx(
          statistics.median(f['times_s'][2 * r:2 * r + 2]))
  assert fig['baseline'] == 'base' and base['ratio_to_baseline'] == 1.0
  assert deep['ratio_to_baseline'] == pytest.approx(deep['median_s'] / base['median_s'])
  want = [a / b for a, b in zip(deep['round_medians_s'], base['round_medians_s'])]
  assert deep['round_ratios_to_baseline'] == pytest.approx(want)
  assert deep['faster_rounds'] == sum(x < 1 for x in want)
  assert sum(line.startswith('round ') for line in log) == 3
  lines = ab.report_lines(fig)
  assert lines[0].split()[0] == 'variant' and lines[1].startswith('base')
  assert any(line.startswith('deep / base per round:') for line in lines)


@pytest.mark.parametrize('spec,expected', [
    ('xla_gpu_enable_cublaslt=true', ('xla_gpu_enable_cublaslt', True)),
    ('xla_gpu_autotune_level=0', ('xla_gpu_autotune_level', 0)),
    ('xla_cpu_experimental_ynn_fusion_type=', ('xla_cpu_experimental_ynn_fusion_type', '')),
    ('xla_disable_hlo_passes=fusion', ('xla_disable_hlo_passes', 'fusion')),
])
def test_xla_options_are_parsed_with_their_types(spec, expected):
  assert step_lib.parse_compiler_option(spec) == expected
  v = ab.parse_variant(f'x=--xla {spec} --config.model.trunk.depth=2')
  assert v.compiler_options == dict([expected])
  assert v.overrides == ['--config.model.trunk.depth=2']


@pytest.mark.parametrize('spec', ['cublaslt=true', 'xla_gpu_enable_cublaslt', '=1'])
def test_malformed_xla_options_are_refused(spec):
  with pytest.raises(UserError, match='NAME=VALUE'):
    step_lib.parse_compiler_option(spec)
  with pytest.raises(UserError, match='NAME=VALUE'):
    ab.parse_variant(f'x=--xla={spec}')


def test_the_program_fingerprint_ignores_source_metadata_only():
  def hlo(op, frame):
    return ('HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}\n\n'
            f'StackFrames\n1 {{file_location_id={frame} parent_frame_id=1}}\n\n'
            '%fused (p: f32[4]) -> f32[4] {\n  %p = f32[4]{0} parameter(0)\n'
            f'  ROOT %s = f32[4]{{0}} {op}(%p), metadata={{op_name="jit(f)/{op}" '
            f'stack_frame_id={frame}}}\n}}\n')
  # What a fresh compile and a read from the persistent cache differ in: stack frames.
  assert ab.program_fingerprint(hlo('sine', 2)) == ab.program_fingerprint(hlo('sine', 7))
  assert ab.program_fingerprint(hlo('sine', 2)) != ab.program_fingerprint(hlo('cosine', 2))


def test_an_xla_option_reaches_its_variants_compile_alone_and_pipelined_rounds_time_it():
  # Clearing YNNPACK's fusion types changes the CPU program; the baseline keeps them.
  # A GPU option leaves the CPU program as it is: reported as the same program.
  variants = ab.parse_variants(['base=', 'noynn=--xla=xla_cpu_experimental_ynn_fusion_type=',
                                'lt=--xla=xla_gpu_enable_cublaslt=true'])
  log = []
  fig = ab.run(SPEC, TINY, variants, quotas_arg='rubin-rubin=2', rounds=2, steps=2,
               warmup=1, pipelined=True, mesh=scaling.make_mesh(1, 1), log=log.append)
  base, noynn, lt = (fig['variants'][n] for n in ('base', 'noynn', 'lt'))
  assert noynn['compiler_options'] == {'xla_cpu_experimental_ynn_fusion_type': ''}
  assert base['compiler_options'] == {}
  assert base['program_sha1'] != noynn['program_sha1']
  assert 'same_program_as' not in noynn
  assert lt['program_sha1'] == base['program_sha1'] and lt['same_program_as'] == 'base'
  assert any(m.startswith('note: lt compiled to the same program as base') for m in log)
  # Pipelined: one time per round (the round's total over its steps).
  assert fig['pipelined'] is True
  assert len(base['times_s']) == 2 and base['round_medians_s'] == base['times_s']
  lines = ab.report_lines(fig)
  assert any('pipelined' in line for line in lines)
  assert 'lt: the same program as base (its flags changed nothing)' in lines
  assert fig['platform'] == 'cpu' and base['mfu_at_median'] is not None
  assert 0 < base['mfu_at_median'] < 1


def test_an_unknown_xla_option_is_a_user_error_naming_it():
  # The bad variant first: its compile fails before anything else is compiled.
  variants = ab.parse_variants(['bad=--xla=xla_no_such_option=1', 'base='])
  with pytest.raises(UserError, match='xla_no_such_option'):
    ab.run(SPEC, TINY, variants, quotas_arg='rubin-rubin=2', rounds=1, steps=1, warmup=0,
           mesh=scaling.make_mesh(1, 1), log=lambda m: None)
