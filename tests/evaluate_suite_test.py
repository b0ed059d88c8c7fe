"""The evaluation suite end to end: a tiny run trained in-process, then --mode=evaluate's
library call; user data without truth; the report schema; TensorBoard; the summary."""

import importlib.util
import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from jaisp_jax import bands as bands_lib
from jaisp_jax.cli import UserError
from jaisp_jax.data import batch as batch_lib
from jaisp_jax.evaluate import heldout
from jaisp_jax.evaluate import report as report_lib
from jaisp_jax.evaluate import suite
from jaisp_jax.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# tests/train_loop_test.py's TINY run, shortened (3 steps: the suite needs a checkpoint,
# not a good model).
TINY = {
    'total_steps': 3, 'checkpoint_every': 3, 'log_every': 3, 'eval.every': 0,
    'eval.max_chips': 8, 'model.trunk.embed_dim': 32, 'model.trunk.depth': 1,
    'model.trunk.num_heads': 2, 'model.predictor.hidden': 64, 'data.crop_arcsec': 6.4,
    'data.pairs_per_batch': 8, 'data.simulate.n_tiles': 4, 'data.simulate.size': 64,
    'data.simulate.chip_px': 32, 'optim.warmup_steps': 1,
}

TOP_KEYS = {'schema_version', 'run', 'data', 'models', 'diagnostics', 'retrieval', 'embeddings',
            'probes', 'table', 'plots', 'notes', 'summary', 'report_path', 'seconds'}
DIAG_KEYS = {'token_similarity', 'token_similarity_unweighted', 'token_similarity_shuffled',
             'var_loss', 'var_min', 'var_mean', 'effective_dim', 'rankme', 'embed_dim', 'n',
             'per_band', 'n_collapsed_bands', 'cross_band', 'activation_weight'}
PLOTS = {'cross_band_similarity.png', 'cross_band_contrast.png', 'infomap_overlay.png',
         'activation_vs_weight.png', 'per_band_collapse.png', 'retrieval.png',
         'embedding_bands.png', 'spearman_global.png', 'spearman_sources.png',
         'embedding_sources_mag.png', 'embedding_global_n_sources.png'}


def tiny_config():
  spec = importlib.util.spec_from_file_location('jepa_config', os.path.join(ROOT, 'configs',
                                                                            'jepa.py'))
  jepa = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(jepa)
  c = jepa.get_config('smoke')
  for key, value in TINY.items():
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = type(node[leaf])(value)
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  config = tiny_config()
  workdir = str(tmp_path_factory.mktemp('tiny'))
  loop.train_and_evaluate(config, workdir)
  lines = []
  # One probe (detection) keeps the test short; the probes have their own tests.
  report = suite.evaluate(config, workdir, embedding_method='pca', print_fn=lines.append,
                          probes_config={'probes': ['detection']})
  return config, workdir, report, lines


def _is_num(x):
  return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def check_schema(report):
  assert set(report) == TOP_KEYS
  assert report['schema_version'] == suite.SCHEMA_VERSION == 1
  assert set(report['run']) == {'workdir', 'variant', 'step', 'seed', 'embed_dim'}
  assert set(report['data']) == {'split', 'n_chips', 'has_truth', 'n_sources', 'source', 'bands',
                                 'query_band', 'gallery_band', 'crop_px'}
  assert set(report['models']) == set(suite.MODELS)
  for m in suite.MODELS:
    d = report['diagnostics'][m]
    assert set(d) == DIAG_KEYS
    for k in DIAG_KEYS - {'per_band', 'cross_band', 'activation_weight'}:
      assert _is_num(d[k]), (m, k)
    n = len(report['data']['bands'])
    assert np.asarray(d['cross_band']['matrix'], float).shape == (n, n)
    assert set(d['activation_weight']) == {'pearson', 'spearman', 'pearson_centred',
                                           'spearman_centred', 'n_tokens'}
    for stats in d['per_band'].values():
      assert isinstance(stats['collapsed'], bool) and _is_num(stats['effective_dim'])
  r = report['retrieval']
  assert set(r) == {'query_band', 'gallery_band', 'n', 'chance_top1', 'chance_top5', 'models',
                    'band_pairs'}
  for m in suite.MODELS:
    if r['models'][m] is None:      # fewer than two chips with both bands
      assert r['n'] < 2
      continue
    assert set(r['models'][m]) == {'global', 'tokens'}
    for method in ('global', 'tokens'):
      assert set(r['models'][m][method]) == {'top1', 'top5'}
      assert 0.0 <= r['models'][m][method]['top1'] <= r['models'][m][method]['top5'] <= 1.0
  e = report['embeddings']
  assert set(e) == {'method', 'band', 'properties', 'global', 'sources', 'comparison'}
  assert e['method'] in ('umap', 'pca')
  assert set(report['probes']) == {'status', 'note', 'results'}
  assert report['probes']['status'] in ('ok', 'skipped')
  assert report['table'] and all(
      set(row) == {'metric', 'trained', 'init', 'classical', 'chance', 'higher_is_better'}
      and all(_is_num(row[m]) for m in suite.MODELS) for row in report['table'])
  metrics = [row['metric'] for row in report['table']]
  assert len(metrics) == len(set(metrics))
  for needed in ('retrieval.global.top1', 'retrieval.tokens.top5', 'diag.effective_dim',
                 'diag.rankme', 'diag.var_min', 'diag.var_loss', 'diag.token_similarity'):
    assert needed in metrics
  assert all(isinstance(s, str) for s in report['notes'] + report['summary'])


def test_report_schema_and_file(run):
  config, workdir, report, _ = run
  path = os.path.join(workdir, 'eval', 'report.json')
  with open(path) as f:
    stored = json.load(f)
  assert stored == report
  check_schema(stored)
  assert stored['run']['step'] == config.total_steps
  assert stored['run']['variant'] == 'jepa'
  # On-the-fly configs are evaluated on a fresh simulated field, with truth.
  assert stored['data']['has_truth'] is True and stored['data']['n_sources'] > 0
  # The classical baseline sees the same sky in r and VIS: it must retrieve above chance.
  r = stored['retrieval']
  assert r['models']['classical']['global']['top1'] > r['chance_top1']
  # Per-source embeddings coloured by truth, and the probe's figures in the table.
  e = stored['embeddings']
  assert set(e['sources']) == set(suite.MODELS)
  assert {'mag', 'size', 'is_star', 'redshift'} <= set(e['sources']['trained']['best'])
  assert stored['probes']['status'] == 'ok'
  assert stored['probes']['results']['schema'] == 'jaisp_jax.evaluate.probes/1'
  rows = {row['metric']: row for row in stored['table']}
  f1 = rows['probe.detection.rubin_r.f1']
  assert _is_num(f1['trained']) and f1['trained'] is not None and f1['classical'] is not None


def test_plots_written_and_listed(run):
  _, workdir, report, _ = run
  out = os.path.join(workdir, 'eval')
  assert PLOTS <= set(report['plots'])
  for name in report['plots']:
    assert os.path.getsize(os.path.join(out, name)) > 1000


def test_tensorboard_and_summary(run, capsys):
  _, workdir, report, lines = run
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={'tensors': 0, 'images': 0})
  acc.Reload()
  tags = acc.Tags()
  scalar_tags = set(tags['tensors']) | set(tags['scalars'])
  assert 'eval/retrieval.global.top1/trained' in scalar_tags
  assert 'eval/diag.effective_dim/init' in scalar_tags
  assert any(t.startswith('eval/cross_band_similarity') for t in
             set(tags['images']) | scalar_tags)
  text = '\n'.join(lines)
  assert text.endswith('\n'.join(report['summary']))   # after the probes' progress lines
  assert suite.main([workdir]) == 0
  assert capsys.readouterr().out.strip() == '\n'.join(report['summary'])
  assert 'retrieval.global.top1' in text and 'report.json' in text


def test_user_data_without_truth_is_deterministic(run, tmp_path):
  config, workdir, _, _ = run
  step, params = suite.restore_ema_params(config, workdir)
  reg = bands_lib.BandRegistry.from_config(config.bands)
  chips = batch_lib.synthetic_chips_batch(7, reg, 6, config.data.crop_arcsec)
  user = heldout.HeldOut.from_arrays(reg, {i: c['image'] for i, c in chips.items()},
                                     {i: c['rms'] for i, c in chips.items()}, source='user tiles')
  data = suite.from_heldout(user, config.eval.query_band)
  out = str(tmp_path / 'user')
  kw = dict(data=data, params=params, step=step, embedding_method='pca',
            print_fn=lambda s: None, probes_config={'probes': ['detection', 'photometry']})
  first = suite.evaluate(config, out, **kw)
  check_schema(first)
  assert first['data']['has_truth'] is False and first['data']['n_chips'] == 6
  assert first['embeddings']['sources'] is None
  assert any('no truth' in n for n in first['notes'])
  # The probes that need truth are skipped, with the reason in the report.
  assert first['probes']['status'] == 'ok'
  assert set(first['probes']['results']['skipped']) == {'detection', 'photometry'}
  assert 'truth' in first['probes']['note']
  assert not any(row['metric'].startswith('probe.') for row in first['table'])
  second = suite.evaluate(config, out, **kw)
  assert first['table'] == second['table']


def test_no_checkpoint_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match='no checkpoints'):
    suite.evaluate(tiny_config(), str(tmp_path), embedding_method='pca')
  with pytest.raises(UserError, match='no report'):
    suite.main([str(tmp_path)])
  os.makedirs(tmp_path / 'eval')
  for text, why in (('{"summ', 'cannot read it as JSON'), ('[1, 2]', 'expected a JSON object'),
                    ('{"rows": []}', 'no "summary" list')):
    (tmp_path / 'eval' / 'report.json').write_text(text)
    with pytest.raises(UserError, match=why):
      suite.main([str(tmp_path)])


def test_probe_rows_follow_the_probes_schema():
  stats = lambda v: {'rms_mas': v, 'median_mas': v / 2, 'n': 10, 'n_failed': 0}  # noqa: E731
  det = lambda c, p: {'completeness': {'snr>5': c, 'snr>10': c + 0.1}, 'purity': p,  # noqa: E731
                      'f1': 2 * c * p / (c + p)}
  results = {
      'astrometry': {
          'baselines': {'chip_level': {'zero': stats(40.0), 'centroid': stats(12.0),
                                       'xcorr': stats(9.0)},
                        'per_source': {'zero': {'all': stats(45.0)},
                                       'centroid': {'all': stats(20.0)}},
                        'pixels_shift_sensitivity': {'drop_at_100mas': 0.05}},
          'models': {m: {'chip_level': {'head': stats(v), 'register': stats(v + 1),
                                        'head_shuffled': stats(41.0)},
                         'per_source': {'head': {'all': stats(v + 2)}},
                         'shift_sensitivity': {'drop_at_100mas': 0.01}}
                     for m, v in (('trained', 15.0), ('init', 30.0))}},
      'detection': {'baselines': {'rubin_r': {'sep': det(0.9, 0.95), 'random': det(0.1, 0.1)}},
                    'models': {'trained': {'rubin_r': {'head': det(0.8, 0.7)}},
                               'init': {'rubin_r': {'head': det(0.5, 0.4)}}}},
      'photometry': {'baselines': {'rubin_g-rubin_i': {'median': {'scatter_mag': 0.5},
                                                       'aperture': {'scatter_mag': 0.1}}},
                     'models': {'trained': {'rubin_g-rubin_i': {'head': {'scatter_mag': 0.2}}}}},
  }
  rows = {r['metric']: r for r in report_lib.probe_rows(results)}
  head = rows['probe.astrometry.head_rms_mas']
  assert (head['trained'], head['init'], head['classical'], head['chance']) == (15.0, 30.0, 9.0,
                                                                                40.0)
  assert head['higher_is_better'] is False
  assert rows['probe.astrometry.register_rms_mas']['trained'] == 16.0
  assert rows['probe.astrometry.per_source_head_rms_mas']['classical'] == 20.0
  assert rows['probe.astrometry.shift_drop_at_100mas']['classical'] == 0.05
  c10 = rows['probe.detection.rubin_r.completeness_snr>10']
  assert (c10['trained'], c10['classical'], c10['chance']) == (0.9, 1.0, 0.2)
  phot = rows['probe.photometry.rubin_g-rubin_i.scatter_mag']
  assert (phot['trained'], phot['init'], phot['classical'], phot['chance']) == (0.2, None, 0.1,
                                                                                0.5)
  assert all(r['classical'] is not None or r['metric'].endswith('shuffled_rms_mas')
             for r in rows.values())
  assert report_lib.probe_rows(None) == [] and report_lib.probe_rows({}) == []


def test_single_instrument_user_data(run, tmp_path):
  config, workdir, _, _ = run
  step, params = suite.restore_ema_params(config, workdir)
  reg = bands_lib.BandRegistry.from_config(config.bands)
  chips = batch_lib.synthetic_chips_batch(8, reg, 5, config.data.crop_arcsec)
  euclid_only = {'euclid': chips['euclid']}
  data = suite.HeldOutData(chips=euclid_only, sources=None, chip_properties={},
                           description='euclid tiles', notes=[])
  report = suite.evaluate(config, str(tmp_path), data=data, params=params, step=step,
                          embedding_method='pca', print_fn=lambda s: None)
  check_schema(report)
  assert report['retrieval']['n'] == 0
  assert report['retrieval']['models']['trained'] is None
  assert set(report['diagnostics']['trained']['per_band']) == {
      b.name for b in reg.instrument_bands('euclid')}
  assert report['embeddings']['band'].startswith('euclid')
  assert any('no rubin chips' in n for n in report['notes'])


def test_beats_follows_the_direction():
  row = {'metric': 'x', 'trained': 0.5, 'init': 0.2, 'classical': 0.9, 'chance': 0.1,
         'higher_is_better': True}
  assert report_lib.beats(row) == 'init,chance'
  assert report_lib.beats({**row, 'higher_is_better': False}) == 'classical'
  assert report_lib.beats({**row, 'trained': 0.05}) == '-'
  assert report_lib.beats({**row, 'higher_is_better': None}) is None
  assert report_lib.beats({**row, 'classical': None}) == 'init,chance'


def test_compare_similarity_of_the_same_run_is_one(run, tmp_path):
  from jaisp_jax.evaluate import compare  # pylint: disable=import-outside-toplevel
  _, workdir, _, _ = run
  out = tmp_path / 'cmp.md'
  assert compare.main([f'a={workdir}', f'b={workdir}', '--out', str(out), '--similarity',
                       '--max_chips', '8']) == 0
  text = out.read_text()
  assert '## Embedding similarity between objectives' in text
  row_a = next(l for l in text.splitlines() if l.startswith('| a |'))
  assert row_a.split('|')[2:4] == [' 1.00 ', ' 1.00 ']     # CKA(a, a), CKA(a, b)
  assert (tmp_path / 'cmp.png').stat().st_size > 1000
