"""The objective comparison: markdown table from reports, and the launch script's commands."""

import json
import os
import subprocess

import pytest

from jaisp_jax.cli import UserError
from jaisp_jax.evaluate import compare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL = ('jepa', 'two_view', 'detr_jepa', 'clip', 'masked_band', 'jepa_recon', 'jepa_shift')


def _report(step, rows):
  return {'run': {'step': step}, 'data': {'n_chips': 40, 'source': 'sim', 'has_truth': True,
                                          'query_band': 'rubin_r', 'gallery_band': 'euclid_vis'},
          'table': [dict(zip(('metric', 'trained', 'init', 'classical', 'chance',
                              'higher_is_better'), r)) for r in rows]}


def test_markdown_table_bold_best_and_missing():
  reports = {
      'a': _report(10, [('retrieval.global.top1', 0.9, 0.1, 0.5, 0.025, True),
                        ('probe.astrometry.rms_mas', 20.0, 60.0, 30.0, None, False),
                        ('diag.token_similarity', 0.5, 0.2, 0.8, None, None)]),
      'b': _report(10, [('retrieval.global.top1', 0.4, 0.1, 0.5, 0.025, True),
                        ('probe.astrometry.rms_mas', 25.0, 60.0, 30.0, None, False)]),
  }
  lines = compare.markdown_table(reports).splitlines()
  assert lines[0] == '| metric | chance | classical | a | b | best |'
  by_metric = {l.split('|')[1].strip(): [c.strip() for c in l.split('|')[2:-1]] for l in lines[2:]}
  top1 = by_metric['`retrieval.global.top1`']
  assert top1 == ['0.025', '0.500', '**0.900** (0.100)', '0.400 (0.100)', 'a']
  mas = by_metric['`probe.astrometry.rms_mas`']   # lower is better: both beat 30 and 60
  assert mas == ['-', '30.000', '**20.000** (60.000)', '**25.000** (60.000)', 'a']
  sim = by_metric['`diag.token_similarity`']      # no direction: never bold, no best
  assert sim == ['-', '0.800', '0.500 (0.200)', 'n/a', '']


def test_best_ties():
  reports = {n: _report(1, [('m', 0.5, 0.1, 0.2, None, True), ('n', v, 0.1, 0.2, None, True)])
             for n, v in (('a', 0.3), ('b', 0.3), ('c', 0.1))}
  lines = compare.markdown_table(reports).splitlines()
  assert lines[2].endswith('| tie |')        # every variant equal
  assert lines[3].endswith('| a/b |')        # two tied winners


def test_main_writes_markdown(tmp_path):
  for name, v in (('x', 0.9), ('y', 0.2)):
    os.makedirs(tmp_path / name / 'eval')
    with open(tmp_path / name / 'eval' / 'report.json', 'w') as f:
      json.dump(_report(5, [('retrieval.global.top1', v, 0.1, 0.3, 0.025, True)]), f)
  out = tmp_path / 'cmp.md'
  assert compare.main([f'x={tmp_path / "x"}', f'y={tmp_path / "y"}', '--out', str(out),
                       '--budget', '5 steps']) == 0
  text = out.read_text()
  assert 'Budget: 5 steps' in text and '**0.900** (0.100)' in text
  assert '\n\n| metric | chance | classical | x | y | best |' in text   # table after a blank line
  with pytest.raises(UserError, match='report.json'):
    compare.main([f'z={tmp_path / "nothing"}', '--out', str(out)])
  # A damaged report is one user error naming the file, not a traceback.
  (tmp_path / 'x' / 'eval' / 'report.json').write_text('{"rows": [')
  with pytest.raises(UserError, match=r'x/eval/report.json: cannot read it as JSON'):
    compare.main([f'x={tmp_path / "x"}', '--out', str(out)])


def _dry(*args):
  p = subprocess.run(['bash', os.path.join(ROOT, 'launch', 'compare_objectives.sh'), '--dry-run',
                      *args], capture_output=True, text=True, cwd=ROOT, timeout=30,
                     env=dict(os.environ, PATH='/usr/bin:/bin'))
  return p


def test_compare_objectives_dry_run_trains_and_evaluates_every_variant():
  p = _dry('/tmp/cmp', '--steps', '7', '--config.data.pairs_per_batch=8')
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()
  assert any('jaisp_jax.data.build --simulate' in l and '--data-dir /tmp/cmp/tfds' in l
             for l in lines)
  train = [l for l in lines if 'jaisp_jax.main' in l and '--mode=evaluate' not in l]
  evals = [l for l in lines if 'jaisp_jax.main' in l and '--mode=evaluate' in l]
  assert len(train) == len(evals) == len(ALL)
  for v, t, e in zip(ALL, train, evals):
    assert f'--workdir=/tmp/cmp/{v} ' in t and f'--workdir=/tmp/cmp/{v} ' in e
    for line in (t, e):   # same field, same budget, same extra flags for every variant
      assert '--config.data.data_dir=/tmp/cmp/tfds' in line
      assert '--config.total_steps=7' in line and '--config.data.pairs_per_batch=8' in line
  assert '--config.model.recon.enabled=True' in train[ALL.index('jepa_recon')]
  assert '--config.model.shift.enabled=True' in train[ALL.index('jepa_shift')]
  assert 'configs/clip.py:smoke' in train[ALL.index('clip')]
  assert 'recon' not in train[0] and 'shift' not in train[0]
  last = lines[-1]
  assert 'jaisp_jax.evaluate.compare --out /tmp/cmp/comparison.md' in last
  assert all(f'{v}=/tmp/cmp/{v}' in last for v in ALL)


def test_compare_objectives_rejects_unknown_variant():
  p = _dry('--variants', 'jepa,nope')
  assert p.returncode == 2 and 'unknown variant nope' in p.stderr
