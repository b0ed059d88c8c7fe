r"""Run the probes alone: an exported model next to the same architecture at initialisation.

    python -m jaisp_jax.evaluate.probes --export_dir runs/smoke/export \
        [--data_dir D --name N] [--max_chips 32] [--probes astrometry,detection] \
        [--set detection.augment=4 ...] [--out probes.json]

Held-out data: `jaisp_jax.evaluate.heldout.load_heldout` of the bundle's config (its
validation split, or a fresh simulated field for on-the-fly configs). Prints the headline
figures and writes the full report (schema in `jaisp_jax.evaluate.probes`) with --out.
The full evaluation (diagnostics, plots, embeddings, probes) is `--mode=evaluate`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from jaisp_jax import cli


def _value(text: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError:
    return text


def overrides(sets: Sequence[str]) -> dict:
  """['detection.augment=4', 'astrometry.bands=["rubin_g"]'] -> nested dict."""
  out: dict = {}
  for item in sets:
    if '=' not in item:
      raise cli.UserError(f'--set {item!r}: expected key.path=value')
    key, value = item.split('=', 1)
    node = out
    parts = key.split('.')
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = _value(value)
  return out


def _num(v, digits: int = 2) -> str:
  return '-' if v is None else f'{v:.{digits}f}'


def _det(d: dict) -> str:
  c = d['completeness']
  return (f'C5 {_num(c.get("snr>5"))} C10 {_num(c.get("snr>10"))} P {_num(d["purity"])} '
          f'F1 {_num(d["f1"])}')


def headline(rep: dict) -> list[str]:
  """A few lines: each probe's key figure per model next to its baselines."""
  lines = [f'probes on {rep["heldout"]["n_chips"]} held-out chips ({rep["heldout"]["source"]})']
  models = rep['models']
  a = rep.get('astrometry', {})
  cl = a.get('baselines', {}).get('chip_level')
  if cl:
    base = ', '.join(f'{k} {v["rms_mas"]:.1f}' for k, v in cl.items() if v.get('rms_mas'))
    lines.append(f'  astrometry chip-level rms (mas): {base}')
    for m in models:
      mc = a['models'][m].get('chip_level', {})
      figs = ', '.join(f'{k} {v["rms_mas"]:.1f}' for k, v in mc.items()
                       if isinstance(v, dict) and v.get('rms_mas') is not None)
      drop = a['models'][m]['shift_sensitivity'].get('drop_at_100mas')
      lines.append(f'    {m}: {figs}; shift drop@100mas {drop:.4f}')
    px = a['baselines']['pixels_shift_sensitivity'].get('drop_at_100mas')
    lines.append(f'    pixels: shift drop@100mas {px:.4f}')
  for band, base in rep.get('detection', {}).get('baselines', {}).items():
    f = _det
    lines.append(f'  detection {band}: sep {f(base["sep"])} | random {f(base["random"])}')
    for m in models:
      d = rep['detection']['models'][m][band]
      lines.append(f'    {m}: head {f(d["head"])} | shuffled {f(d["head_shuffled"])}')
  for pair, base in rep.get('photometry', {}).get('baselines', {}).items():
    lines.append(f'  colour {pair} scatter (mag): aperture {base["aperture"]["scatter_mag"]:.3f} '
                 f'median {base["median"]["scatter_mag"]:.3f}')
    for m in models:
      d = rep['photometry']['models'][m][pair]
      if 'head' in d:
        lines.append(f'    {m}: head {d["head"]["scatter_mag"]:.3f} '
                     f'shuffled {d["head_shuffled"]["scatter_mag"]:.3f}')
  r = rep.get('realdata')
  if r:
    s = r['sep']
    lines.append(f'  real field vs SExtractor: sep {_det({**s, "f1": None})}')
    for m, d in r['models'].items():
      extra = ''
      if 'head' in d:
        extra = f', head {_det({**d["head"], "f1": None})}'
      lines.append(f'    {m}: infomap AUC {d["infomap"]["auc"]:.3f}{extra}')
  for probe, why in rep['skipped'].items():
    lines.append(f'  skipped {probe}: {why}')
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m jaisp_jax.evaluate.probes',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--export_dir', required=True, help='bundle written by --mode=export')
  parser.add_argument('--data_dir', default=None, help='TFDS data dir (default: the config\'s)')
  parser.add_argument('--name', default=None, help='dataset name (default: the config\'s)')
  parser.add_argument('--max_chips', type=int, default=32, help='held-out chips')
  parser.add_argument('--probes', default=None, help='comma-separated subset of the probes')
  parser.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                      help='probe setting, e.g. detection.augment=4 (JSON values)')
  parser.add_argument('--out', default=None, help='write the report (JSON) here')
  args = parser.parse_args(argv)
  from jaisp_jax import inference  # pylint: disable=g-import-not-at-top
  from jaisp_jax.evaluate import heldout as heldout_lib  # pylint: disable=g-import-not-at-top
  from jaisp_jax.evaluate import probes  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  bundle = inference.load(args.export_dir)
  config = bundle.config
  with config.unlocked():
    if args.data_dir is not None:
      config.data.data_dir = args.data_dir
    if args.name:
      config.data.name = args.name
  init = inference.from_params(inference.init_params(config), config, bundle.registry)
  data = heldout_lib.load_heldout(config, bundle.registry, max_chips=args.max_chips)
  sets = overrides(args.set)
  if args.probes:
    sets['probes'] = [p.strip() for p in args.probes.split(',') if p.strip()]
  try:
    cfg = probes.ProbesConfig.from_dict(sets)
  except ValueError as e:
    raise cli.UserError(str(e)) from None
  rep = probes.run_probes({'trained': bundle, 'init': init}, data, cfg,
                          log=lambda s: print(s, file=sys.stderr, flush=True))
  rep['variant'] = bundle.manifest.get('variant')
  rep['step'] = bundle.manifest.get('step')
  print('\n'.join(headline(rep)))
  print(f'({time.time() - t0:.0f} s)')
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(rep, f, indent=1, allow_nan=False)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main, prog='jaisp_jax.evaluate.probes'))
