"""launch/tune_pallas.py on the CPU (interpret mode): every setting is traced anew and
checked against the float32 reference, and the module's defaults are restored."""

import importlib.util
import json
import os

from jaisp_jax.models import pallas_conv

_PATH = os.path.join(os.path.dirname(__file__), '..', 'launch', 'tune_pallas.py')


def _module():
  spec = importlib.util.spec_from_file_location('tune_pallas', _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_tune_traces_each_setting_checks_it_and_restores_the_defaults(tmp_path):
  tune = _module()
  before = {k: getattr(pallas_conv, k) for k in {**tune.CONV, **tune.KGRAD}}
  out = tmp_path / 'tune.json'
  assert tune.main(['--groups', '2', '--size', '32', '--ci', '16', '--co', '32',
                    '--out', str(out)]) == 0
  res = json.loads(out.read_text())
  assert len(res['conv']) == 12 and len(res['kgrad']) == 16
  for row in res['conv'] + res['kgrad']:
    assert row['ms'] > 0 and row['rel_err'] < 2e-2, row
  # In interpret mode the tile, split and layout change the program: a tuner that reuses
  # one trace (jit's cache) would show a single fingerprint per part.
  assert len({r['program'] for r in res['conv']}) == 3          # 3 tile sizes
  # 2 tiles x 2 layouts; the split (4 or 16) falls back to what the 4 or 2 tile rows of
  # a 32-px image allow, so it changes nothing here
  assert len({r['program'] for r in res['kgrad']}) == 4
  assert set(res['best']) == set(before)
  assert {k: getattr(pallas_conv, k) for k in before} == before
