"""XLA compiler options per platform: the CPU convolution choice takes effect, computes
the same convolutions, and a jaxlib that rejects the option falls back to its defaults."""

import re

import jax
import numpy as np
import pytest

from jaisp_jax import xla_options
from jaisp_jax.cli import UserError
from jaisp_jax.train import config as config_lib
from jaisp_jax.train import loop


def _conv(x, k):
  return jax.lax.conv_general_dilated(x, k, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _inputs():
  r = np.random.default_rng(0)
  # Big enough for jaxlib to hand the convolution to YNNPACK by default (small ones
  # stay with XLA either way).
  return (r.normal(size=(1, 64, 64, 32)).astype(np.float32),
          r.normal(size=(3, 3, 32, 64)).astype(np.float32))


def _ynn_convolutions(hlo: str) -> int:
  """YNNPACK fusions of a compiled program whose fused computation is a convolution."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    m = re.match(r'^(?:ENTRY )?%([\w.\-]+) ', line)
    if m:
      name = m.group(1)
    elif name and ' convolution(' in line:
      bodies[name] = True
  return sum(1 for m in re.finditer(r'calls=%([\w.\-]+)[^\n]*__ynn_fusion', hlo)
             if bodies.get(m.group(1)))


def test_cpu_options_move_convolutions_off_ynnpack_and_agree():
  x, k = _inputs()
  opts = xla_options.compiler_options('cpu', 'xla')
  assert opts is not None, 'this jaxlib should take the CPU convolution option'
  default = jax.jit(_conv).lower(x, k).compile()
  chosen = jax.jit(_conv, compiler_options=opts).lower(x, k).compile()
  assert _ynn_convolutions(default.as_text()) >= 1
  assert _ynn_convolutions(chosen.as_text()) == 0
  np.testing.assert_allclose(np.asarray(chosen(x, k)), np.asarray(default(x, k)),
                             rtol=1e-5, atol=1e-5)


def test_options_only_for_cpu_xla_and_bad_value_is_a_user_error():
  assert xla_options.compiler_options('cpu', 'ynnpack') is None
  assert xla_options.compiler_options('gpu', 'xla') is None
  assert xla_options.compiler_options('tpu', 'xla') is None
  with pytest.raises(UserError, match='cpu_convolutions'):
    xla_options.compiler_options('cpu', 'onednn')


def test_unknown_option_value_falls_back_with_a_warning(caplog):
  bogus = (('xla_cpu_experimental_ynn_fusion_type', 'NOT_A_FUSION_TYPE'),)
  assert xla_options._supported(bogus) is False
  assert 'does not take the CPU compiler options' in caplog.text
  assert xla_options._supported((('xla_cpu_experimental_ynn_fusion_type',
                                  xla_options._YNN_WITHOUT_CONVOLUTIONS),))


def test_trainer_compiles_its_step_with_the_configured_options():
  config = config_lib.sized(config_lib.base_config(), 'smoke')
  config.model.variant = 'jepa'
  seen = []
  real = xla_options.jit

  def spy(fn, **kwargs):
    seen.append(kwargs.get('cpu_convolutions'))
    return real(fn, **kwargs)

  for choice in ('xla', 'ynnpack'):
    config.cpu_convolutions = choice
    trainer = loop.Trainer(config)
    xla_options.jit = spy
    try:
      trainer.jitted_step(trainer.abstract_state()[1])
    finally:
      xla_options.jit = real
  assert seen == ['xla', 'ynnpack']
