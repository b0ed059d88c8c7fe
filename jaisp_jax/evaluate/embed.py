r"""Embed held-out chips with an exported model and say whether it learned anything.

    python -m jaisp_jax.evaluate.embed --export_dir runs/qs/export --data_dir runs/qs/tfds

Loads the bundle through the public inference API (`jaisp_jax.inference.load`), embeds
the validation split (sky regions never seen in training) and prints, for the trained
encoder and for the same architecture at initialisation (same seed): cross-instrument
retrieval top-1 (Rubin r -> Euclid VIS by global embedding, next to chance), RankMe and
the effective dimension of the embeddings. `--out` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Sequence


from jaisp_jax import cli
from jaisp_jax import inference
from jaisp_jax.train import online_eval
from jaisp_jax.train import sharding


def held_out_figures(export_dir: str, data_dir: str | None, name: str | None,
                     max_chips: int) -> dict:
  """{'trained': figures, 'init': figures} on the validation split."""
  from jaisp_jax.train import loop  # pylint: disable=g-import-not-at-top
  bundle = inference.load(export_dir)
  config = copy.deepcopy(bundle.config)
  if data_dir is not None:
    config.data.data_dir = data_dir
  if name:
    config.data.name = name
  config.eval.max_chips = max_chips
  registry = bundle.registry
  trainer = loop.Trainer(config)
  chips = online_eval.collect_chips(config, registry, trainer.batch_sharding)

  def trained_embed(image, rms, band):
    return bundle.get_representation(image, rms, band)['global']

  init_params = inference.init_params(config)
  return {
      'trained': online_eval.evaluate(trained_embed, chips, config, registry),
      'init': online_eval.evaluate(online_eval.params_embed_fn(init_params, config.model, registry),
                                   chips, config, registry),
      'query_band': config.eval.query_band, 'gallery_band': config.eval.gallery_band,
      'variant': config.model.variant, 'step': bundle.manifest.get('step'),
  }


def summary_lines(fig: dict) -> list[str]:
  t, i = fig['trained'], fig['init']
  n = int(t['n_chips'])
  lines = [f'held-out evaluation ({fig["variant"]}, step {fig["step"]}, {n} chips from sky '
           f'regions not used in training):',
           f'  {"":28s} {"trained":>9s} {"at init":>9s}',
           f'  {"retrieval top-1 " + fig["query_band"] + "->" + fig["gallery_band"]:28s} '
           f'{t["retrieval_top1"]:9.3f} {i["retrieval_top1"]:9.3f}   (chance {t["chance_top1"]:.3f})',
           f'  {"retrieval top-5":28s} {t["retrieval_top5"]:9.3f} {i["retrieval_top5"]:9.3f}   '
           f'(chance {min(1.0, 5 * t["chance_top1"]):.3f})',
           f'  {"RankMe (of D=" + str(int(t["embed_dim"])) + ")":28s} {t["rankme"]:9.1f} {i["rankme"]:9.1f}',
           f'  {"effective dim":28s} {t["effective_dim"]:9.1f} {i["effective_dim"]:9.1f}']
  better = t['retrieval_top1'] > max(i['retrieval_top1'], t['chance_top1'])
  lines.append('  verdict: ' + ('learned: trained retrieval beats both chance and the untrained '
                                'encoder' if better else
                                'NOT LEARNED: trained retrieval does not beat chance and init'))
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m jaisp_jax.evaluate.embed',
                                   description=__doc__.split('\n\n')[0])
  parser.add_argument('--export_dir', required=True, help='bundle written by --mode=export')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data dir of the held-out split (default: the config\'s)')
  parser.add_argument('--name', default=None, help='dataset name (default: the config\'s)')
  parser.add_argument('--max_chips', type=int, default=256, help='held-out chips to embed')
  parser.add_argument('--out', default=None, help='also write the figures to this JSON file')
  args = parser.parse_args(argv)
  if not os.path.isdir(args.export_dir):
    raise cli.UserError(f'{args.export_dir}: no such export folder')
  fig = held_out_figures(args.export_dir, args.data_dir, args.name, args.max_chips)
  print('\n'.join(summary_lines(fig)), flush=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(fig, f, indent=2, sort_keys=True)
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main, prog='jaisp_jax.evaluate.embed'))
