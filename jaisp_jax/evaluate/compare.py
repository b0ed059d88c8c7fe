r"""One markdown table of every objective's evaluation figures (launch/compare_objectives.sh).

    python -m jaisp_jax.evaluate.compare --out runs/cmp/comparison.md \
        jepa=runs/cmp/jepa two_view=runs/cmp/two_view ... [--similarity]

Each NAME=WORKDIR argument names a workdir evaluated by `--mode=evaluate` (it reads
WORKDIR/eval/report.json). Rows are the reports' headline metrics (report['table']);
each variant's cell reads `trained (init)`; `chance` and `classical` (the pixel
baseline, the same held-out chips for every variant) come first. A trained figure in
bold beats both its own initialisation and the classical baseline (in the metric's
better direction); `best` names the variant with the best trained figure (tied
names joined by '/', 'tie' when every variant has the same figure).

`--similarity` also compares the variants' global embeddings of the same held-out
chips (linear CKA and similarity-profile cosine, `embeddings.compare_representations`)
from each workdir's latest checkpoint, and draws it (comparison.png beside --out).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from jaisp_jax import cli
from jaisp_jax.evaluate.report import fmt as _fmt


def read_reports(runs: Sequence[tuple[str, str]]) -> dict[str, dict]:
  """{name: report} from (name, workdir) pairs."""
  out = {}
  for name, workdir in runs:
    path = os.path.join(workdir, 'eval', 'report.json')
    if not os.path.exists(path):
      raise cli.UserError(f'{path}: missing; run --mode=evaluate on {workdir} first')
    out[name] = cli.read_json(path)
  return out


def _better(a, b, higher: bool | None) -> bool:
  if a is None or b is None or higher is None:
    return False
  return a > b if higher else a < b


def _best(values: dict[str, float], higher: bool | None) -> str:
  """Name of the best value; tied names joined by '/', 'tie' when all are equal."""
  if higher is None or not values:
    return ''
  top = max(values.values()) if higher else min(values.values())
  winners = [n for n, v in values.items() if v == top]
  if len(winners) == len(values) and len(values) > 1:
    return 'tie'
  return '/'.join(winners)


def markdown_table(reports: dict[str, dict]) -> str:
  """The comparison table (markdown), metrics in the order the reports list them."""
  names = list(reports)
  rows: dict[str, dict] = {}
  for name in names:
    for row in reports[name]['table']:
      entry = rows.setdefault(row['metric'], {'chance': row['chance'],
                                              'classical': row['classical'],
                                              'higher': row['higher_is_better'], 'runs': {}})
      if entry['classical'] is None:
        entry['classical'] = row['classical']
      entry['runs'][name] = (row['trained'], row['init'])
  head = ['metric', 'chance', 'classical'] + names + ['best']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for metric, e in rows.items():
    cells = [f'`{metric}`', _fmt(e['chance']), _fmt(e['classical'])]
    trained_of = {n: e['runs'][n][0] for n in names
                  if n in e['runs'] and e['runs'][n][0] is not None}
    for name in names:
      trained, init = e['runs'].get(name, (None, None))
      text = f'{_fmt(trained)} ({_fmt(init)})' if name in e['runs'] else 'n/a'
      refs = [x for x in (init, e['classical'], e['chance']) if x is not None]
      if trained is not None and refs and all(_better(trained, r, e['higher']) for r in refs):
        text = f'**{_fmt(trained)}** ({_fmt(init)})'
      cells.append(text)
    cells.append(_best(trained_of, e['higher']))
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def header(reports: dict[str, dict], budget: str = '') -> str:
  first = next(iter(reports.values()))
  d = first['data']
  steps = ', '.join(f'{n} {r["run"]["step"]}' for n, r in reports.items())
  return '\n'.join([
      '# Objective comparison', '',
      f'Held-out chips: {d["n_chips"]} ({d["source"]}; truth: '
      f'{"yes" if d["has_truth"] else "no"}); retrieval {d["query_band"]} -> '
      f'{d["gallery_band"]}. Steps: {steps}.' + (f' Budget: {budget}.' if budget else ''),
      '',
      'Cells: trained (init = same architecture untrained). **Bold**: beats init, the classical '
      'pixel baseline and chance in the metric\'s better direction. `best`: best trained '
      'variant (\'tie\': all equal). Rows without a direction (e.g. token_similarity) are '
      'descriptive.', '', ''])


def similarity_section(runs: Sequence[tuple[str, str]], out_png: str, max_chips: int) -> str:
  """CKA / profile cosine of the variants' embeddings of the same held-out chips."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from jaisp_jax import bands as bands_lib  # pylint: disable=import-outside-toplevel
  from jaisp_jax import inference  # pylint: disable=import-outside-toplevel
  from jaisp_jax.evaluate import embeddings  # pylint: disable=import-outside-toplevel
  from jaisp_jax.evaluate import plots  # pylint: disable=import-outside-toplevel
  from jaisp_jax.evaluate import suite  # pylint: disable=import-outside-toplevel
  models, data, band = {}, None, None
  for name, workdir in runs:
    config = ml_collections.ConfigDict(cli.read_json(os.path.join(workdir, 'config.json')))
    registry = bands_lib.BandRegistry.from_config(config.bands)
    _, params = suite.restore_ema_params(config, workdir)
    models[name] = inference.from_params(params, config, registry)
    if data is None:
      data = suite.load_heldout(config, registry, max_chips)
      band = config.eval.query_band
      reg0 = registry
  inst, idx = reg0[band].instrument, reg0[band].index
  image = data.chips[inst]['image'][:, idx:idx + 1]
  rms = data.chips[inst]['rms'][:, idx:idx + 1] * (data.chips[inst]['mask'][:, idx:idx + 1] > 0)
  result = embeddings.compare_representations(models, image, rms, band)
  plots.model_comparison(result, out_png)
  names = result['models']
  lines = ['', f'## Embedding similarity between objectives ({band}, {image.shape[0]} held-out '
           'chips)', '', 'Linear CKA (upper) / similarity-profile cosine (lower) of the global '
           'embeddings: coordinate-free, 1 = the same geometry.', '',
           '| | ' + ' | '.join(names) + ' |', '|' + '---|' * (len(names) + 1)]
  cka, prof = np.asarray(result['cka']), np.asarray(result['profile_cosine'])
  for i, n in enumerate(names):
    cells = [f'{cka[i, j]:.2f}' if j >= i else f'{prof[i, j]:.2f}' for j in range(len(names))]
    lines.append(f'| {n} | ' + ' | '.join(cells) + ' |')
  lines.append(f'\n![comparison]({os.path.basename(out_png)})')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m jaisp_jax.evaluate.compare',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('runs', nargs='+', help='NAME=WORKDIR of each evaluated variant')
  parser.add_argument('--out', required=True, help='markdown file to write')
  parser.add_argument('--budget', default='', help='one line on the training budget')
  parser.add_argument('--similarity', action='store_true',
                      help='also compare the variants\' embeddings (loads checkpoints)')
  parser.add_argument('--max_chips', type=int, default=64, help='chips for --similarity')
  args = parser.parse_args(argv)
  runs = []
  for item in args.runs:
    if '=' not in item:
      raise cli.UserError(f'{item}: expected NAME=WORKDIR')
    name, workdir = item.split('=', 1)
    runs.append((name, workdir))
  reports = read_reports(runs)
  text = header(reports, args.budget) + markdown_table(reports) + '\n'
  if args.similarity:
    text += similarity_section(runs, os.path.splitext(args.out)[0] + '.png',
                               args.max_chips) + '\n'
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    f.write(text)
  print(text)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main, prog='jaisp_jax.evaluate.compare'))
