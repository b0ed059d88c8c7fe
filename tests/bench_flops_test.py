"""Matmul FLOPs counted on the jaxpr (bench/flops.py) against hand counts and XLA's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaisp_jax.bench import flops
from jaisp_jax.bench import scaling
from jaisp_jax.bench import step
from jaisp_jax.models import sample_conv
from jaisp_jax.train import sharding

from bench_test import tiny_config  # tests/ is on sys.path (pytest's rootdir import)

S = jax.ShapeDtypeStruct


def test_dot_general_counts_two_flops_per_multiply_add_with_batch_dims():
  c = flops.count(lambda a, b: jnp.einsum('gij,gjk->gik', a, b),
                  S((3, 5, 7), jnp.float32), S((3, 7, 11), jnp.float32))
  assert c.dot == 2 * 3 * 5 * 7 * 11 and c.conv == 0
  # A Dense layer on (B, N, D) tokens: 2 * B * N * D * F.
  c = flops.count(lambda x, w: x @ w, S((2, 9, 16), jnp.bfloat16), S((16, 24), jnp.bfloat16))
  assert c.total == 2 * 2 * 9 * 16 * 24


@pytest.mark.parametrize('groups', [1, 4])
def test_convolution_counts_taps_times_input_channels_per_group(groups):
  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME', feature_group_count=groups,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  c = flops.count(conv, S((2, 10, 12, 8), jnp.float32), S((3, 3, 8 // groups, 16), jnp.float32))
  assert c.conv == 2 * (2 * 10 * 12 * 16) * 9 * (8 // groups)
  # The gradients add the input-gradient and kernel-gradient convolutions, each as
  # costly as the forward.
  g = flops.count(jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1)),
                  S((2, 10, 12, 8), jnp.float32), S((3, 3, 8 // groups, 16), jnp.float32))
  assert g.conv == pytest.approx(3 * c.conv)


def test_strided_convolution_gradient_counts_only_real_taps():
  # A stride-4 4x4 'patch embedding' convolution: its input gradient is a convolution of
  # the output gradient dilated by 4, whose kernel meets one real pixel per output per
  # dimension, so forward, input gradient and kernel gradient cost the same.
  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (4, 4), 'VALID',
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  args = S((2, 16, 16, 8), jnp.float32), S((4, 4, 8, 32), jnp.float32)
  c = flops.count(conv, *args)
  assert c.conv == 2 * (2 * 4 * 4 * 32) * 16 * 8
  g = flops.count(jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1)), *args)
  assert g.conv == pytest.approx(3 * c.conv)


def test_scan_bodies_count_per_iteration_and_while_bodies_are_flagged():
  def scanned(x, w):
    return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]
  c = flops.count(scanned, S((4, 8), jnp.float32), S((8, 8), jnp.float32))
  assert c.dot == 5 * 2 * 4 * 8 * 8 and c.while_loops == 0

  def looped(x, w):
    return jax.lax.fori_loop(0, jnp.int32(x.shape[0]) + x[0, 0].astype(jnp.int32),
                             lambda i, h: h @ w, x)
  c = flops.count(looped, S((4, 8), jnp.float32), S((8, 8), jnp.float32))
  assert c.dot == 2 * 4 * 8 * 8 and c.while_loops == 1


def test_cond_counts_its_costliest_branch():
  def f(p, x, w):
    return jax.lax.cond(p, lambda x: x @ w @ w, lambda x: x, x)
  c = flops.count(f, S((), jnp.bool_), S((4, 8), jnp.float32), S((8, 8), jnp.float32))
  assert c.dot == 2 * (2 * 4 * 8 * 8)


def test_train_step_count_agrees_with_xla_and_the_xla_stem_forms_agree():
  # The whole jepa step at toy sizes: the jaxpr's matmul count is below XLA:CPU's cost
  # analysis of the same step in matmul form, which adds the element-wise work (78% of
  # it is matmul at these toy widths; at torch_ref's 234.8 of 237.6 GFLOP, 98.8%), and
  # both per-sample conv forms do the same matmul work.
  bench = step.StepBench(tiny_config(), {'rubin-rubin': 2},
                         mesh=scaling.make_mesh(1, 1), n_batches=1)
  abstract, _ = bench.trainer.abstract_state()
  example = sharding.global_batch(bench.host_batches[0], bench.mesh)
  counts = {}
  for impl, embed in (('im2col', 'matmul'), ('grouped', 'matmul'), ('shift', 'matmul'),
                      ('im2col', 'conv')):
    with sample_conv.implementation(impl), sample_conv.embedding(embed):
      counts[impl if embed == 'matmul' else embed] = flops.count(
          bench.trainer.jitted_step(bench.shardings), abstract, example)
  with sample_conv.implementation('im2col'):
    compiled = bench.trainer.jitted_step(bench.shardings).lower(abstract, example).compile()
  xla = step.cost_figures(compiled)['flops_per_step_device']
  assert counts['im2col'].while_loops == 0
  assert 0.7 * xla < counts['im2col'].total <= xla
  assert counts['grouped'].conv > 0 and counts['im2col'].conv == 0
  for form in ('grouped', 'shift', 'conv'):
    np.testing.assert_allclose(counts[form].total, counts['im2col'].total, rtol=1e-6,
                               err_msg=form)
