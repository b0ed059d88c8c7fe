r"""Embed held-out chips with an exported model and say whether it learned anything.

    python -m jaisp_jax.evaluate.embed --export_dir runs/qs/export --data_dir runs/qs/tfds

Loads the bundle through the public inference API (`jaisp_jax.inference.load`), embeds
the validation split (sky regions never seen in training) and prints, for the trained
encoder and for the same architecture at initialisation (same seed):

* cross-instrument retrieval (Rubin r -> Euclid VIS, top-1 / top-5, next to chance) by
  the global embedding (D numbers per chip), and by the token grid (the N x D tokens
  flattened: spatial layout kept), the latter also next to a classical, non-learned
  grid of the same size: asinh(S/N) of the image averaged over each token's pixels;
* RankMe and the effective dimension of the global embeddings.

`--out` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Sequence


import numpy as np

from jaisp_jax import bands as bands_lib
from jaisp_jax import cli
from jaisp_jax import inference
from jaisp_jax.train import online_eval


def classical_grid_fn(registry: bands_lib.BandRegistry, token_arcsec: float):
  """embed(image, rms, band) -> (B, n*n): asinh(S/N) averaged over each token's pixels.

  The non-learned reference for token-grid retrieval: it keeps where the flux is on
  the token grid, which is what a learned token grid must at least encode. Inputs are
  (B, 1, H, W) in noise units (the batch contract), so asinh(image) is a stretched S/N.
  """
  def embed(image, rms, band):
    del rms
    s = registry.stride(band, token_arcsec)
    x = np.arcsinh(np.asarray(image, np.float64)[:, 0])  # (B, H, W)
    b, hgt, wid = x.shape
    x = x.reshape(b, hgt // s, s, wid // s, s).mean(axis=(2, 4))  # (B, h, w)
    return x.reshape(b, -1).astype(np.float32)
  return embed


def _top_k(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
  return {'retrieval_top1': online_eval.retrieval_top_k(q, g, 1),
          'retrieval_top5': online_eval.retrieval_top_k(q, g, 5)}


def _global_and_tokens(rep, chips, band, registry) -> tuple[np.ndarray, np.ndarray]:
  """(global (N, D), flattened token grid (N, T*D)) of one band: one forward pass for both."""
  width = {}

  def embed(image, rms, b):
    out = rep.get_representation(image, rms, b)
    glob = np.asarray(out['global'], np.float32)
    tokens = np.asarray(out['tokens'], np.float32)
    width['global'] = glob.shape[1]
    return np.concatenate([glob, tokens.reshape(len(tokens), -1)], axis=1)

  both = online_eval.embed_band(embed, chips, band, registry)
  return both[:, :width['global']], both[:, width['global']:]


def held_out_figures(export_dir: str, data_dir: str | None, name: str | None,
                     max_chips: int) -> dict:
  """{'trained': figures, 'init': figures} on the validation split."""
  from jaisp_jax.train import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  bundle = inference.load(export_dir)
  config = copy.deepcopy(bundle.config)
  if data_dir is not None:
    config.data.data_dir = data_dir
  if name:
    config.data.name = name
  config.eval.max_chips = max_chips
  registry = bundle.registry
  trainer = trainer_lib.Trainer(config)
  chips = online_eval.collect_chips(config, registry, trainer.batch_sharding)

  init = inference.from_params(inference.init_params(config), config, registry)
  query, gallery = config.eval.query_band, config.eval.gallery_band
  figures = {}
  for key, rep in (('trained', bundle), ('init', init)):
    q_global, q_tokens = _global_and_tokens(rep, chips, query, registry)
    g_global, g_tokens = _global_and_tokens(rep, chips, gallery, registry)
    figures[key] = online_eval.figures(q_global, g_global)
    figures[key]['token_grid'] = _top_k(q_tokens, g_tokens)
  grid = classical_grid_fn(registry, config.model.token_arcsec)
  classical = _top_k(online_eval.embed_band(grid, chips, query, registry),
                     online_eval.embed_band(grid, chips, gallery, registry))
  return {
      **figures, 'classical_grid': classical,
      'query_band': config.eval.query_band, 'gallery_band': config.eval.gallery_band,
      'variant': config.model.variant, 'step': bundle.manifest.get('step'),
  }


def summary_lines(fig: dict) -> list[str]:
  t, i = fig['trained'], fig['init']
  n = int(t['n_chips'])
  lines = [f'held-out evaluation ({fig["variant"]}, step {fig["step"]}, {n} chips from sky '
           f'regions not used in training):',
           f'  {"":36s} {"trained":>9s} {"at init":>9s}',
           f'  {"retrieval top-1 " + fig["query_band"] + "->" + fig["gallery_band"]:36s} '
           f'{t["retrieval_top1"]:9.3f} {i["retrieval_top1"]:9.3f}   (chance {t["chance_top1"]:.3f})',
           f'  {"retrieval top-5":36s} {t["retrieval_top5"]:9.3f} {i["retrieval_top5"]:9.3f}   '
           f'(chance {min(1.0, 5 * t["chance_top1"]):.3f})',
           f'  {"RankMe (of D=" + str(int(t["embed_dim"])) + ")":36s} {t["rankme"]:9.1f} {i["rankme"]:9.1f}',
           f'  {"effective dim":36s} {t["effective_dim"]:9.1f} {i["effective_dim"]:9.1f}']
  tg, ig, cg = t.get('token_grid'), i.get('token_grid'), fig.get('classical_grid')
  if tg and ig and cg:
    lines += [f'  {"token grid: retrieval top-1":36s} {tg["retrieval_top1"]:9.3f} '
              f'{ig["retrieval_top1"]:9.3f}   (classical asinh(S/N) grid {cg["retrieval_top1"]:.3f})',
              f'  {"token grid: retrieval top-5":36s} {tg["retrieval_top5"]:9.3f} '
              f'{ig["retrieval_top5"]:9.3f}   (classical asinh(S/N) grid {cg["retrieval_top5"]:.3f})']
  better = t['retrieval_top1'] > max(i['retrieval_top1'], t['chance_top1'])
  lines.append('  verdict: ' + ('learned: trained retrieval beats both chance and the untrained '
                                'encoder' if better else
                                'NOT LEARNED: trained retrieval does not beat chance and init'))
  if tg and cg:
    beats = tg['retrieval_top1'] > cg['retrieval_top1']
    lines.append(f'  token grid vs the classical grid: {"beats" if beats else "does NOT beat"} it '
                 f'({tg["retrieval_top1"]:.3f} vs {cg["retrieval_top1"]:.3f} top-1)')
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
  if args.max_chips < 2:
    parser.error(f'--max_chips must be at least 2 (retrieval needs two chips), got {args.max_chips}')
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
