"""Builds the TFDS (array_record) chip dataset: `python -m jaisp_jax.data.build`.

    python -m jaisp_jax.data.build --rubin-dir R --euclid-dir E --data-dir D [--name NAME]
    python -m jaisp_jax.data.build --simulate N --data-dir D [--name NAME] [--seed S]

The first form reads a tile folder pair (npz or FITS, see tiles.py), the second
simulates N tile pairs with the GalSim simulator first (their truth catalog is kept in
the dataset folder and every record lists its truth rows). The dataset is written to
D/NAME/1.0.0 atomically (see tfds_builder.py) and read by the pipeline with
`config.data.data_dir=D`, `config.data.name=NAME`.

Bad tiles fail the build with one line per bad file (exit 1), as `check` prints them;
`--skip-invalid` builds without them and says how many were skipped. A missing folder
or a bad flag is exit 2. Progress bars go to stderr (`--no-progress` to silence).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import sys
from typing import Sequence

from jaisp_jax import cli
from jaisp_jax.data import check as check_lib
from jaisp_jax.data import tfds_builder

# What `tfds.data_source(name, ...)` parses as a dataset name (tensorflow_datasets
# core/naming.py): a dataset named otherwise builds, but the pipeline cannot read it.
_NAME = re.compile(r'[A-Za-z][A-Za-z0-9_]*')


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog='python -m jaisp_jax.data.build',
      description='Build the TFDS (array_record) chip dataset from tile folders or the simulator.')
  p.add_argument('--rubin-dir', help='folder of Rubin tiles (same as --dir rubin=PATH)')
  p.add_argument('--euclid-dir', help='folder of Euclid tiles (same as --dir euclid=PATH)')
  p.add_argument('--dir', action='append', default=[], metavar='INSTRUMENT=PATH',
                 help="folder of one instrument's tiles; repeat for each instrument")
  p.add_argument('--simulate', type=int, default=0, metavar='N',
                 help='simulate N tile pairs instead of reading folders')
  p.add_argument('--data-dir', required=True, help='TFDS data dir to write the dataset into')
  p.add_argument('--name', default=tfds_builder.DEFAULT_NAME,
                 help=f'dataset name (default {tfds_builder.DEFAULT_NAME})')
  p.add_argument('--bands', metavar='JSON', help='band registry as a JSON list of band dicts')
  p.add_argument('--chip-px', type=int, default=None,
                 help='chip side in pixels of the coarsest instrument (default '
                 f'{tfds_builder.ChipOptions.chip_px}, or the side of the biggest tile when '
                 'every tile is smaller)')
  p.add_argument('--stride-px', type=int, default=0,
                 help='step between chips (default: the chip side, no overlap)')
  p.add_argument('--val-fraction', type=float, default=tfds_builder.ChipOptions.val_fraction,
                 help='fraction of chips (whole sky regions) for validation (default %(default)s)')
  p.add_argument('--split-seed', type=int, default=0, help='seed of the region split')
  p.add_argument('--min-valid-fraction', type=float,
                 default=tfds_builder.ChipOptions.min_valid_fraction,
                 help='a band is valid in a chip with at least this fraction of usable pixels')
  p.add_argument('--skip-invalid', action='store_true',
                 help='skip bad or unpaired tiles (and report how many) instead of failing')
  p.add_argument('--overwrite', action='store_true', help='replace an existing dataset')
  p.add_argument('--no-progress', action='store_true', help='no progress bars')
  p.add_argument('--seed', type=int, default=0, help='simulator seed (--simulate)')
  p.add_argument('--size', type=int, default=128,
                 help='simulated tile side in Rubin pixels (--simulate; default %(default)s)')
  p.add_argument('--workers', type=int, default=None,
                 help='simulator worker processes (--simulate; default: all cores)')
  return p.parse_args(argv)


def _options(args: argparse.Namespace) -> tfds_builder.ChipOptions:
  chip_px = tfds_builder.ChipOptions.chip_px if args.chip_px is None else args.chip_px
  if chip_px < 1 or args.stride_px < 0:
    raise cli.UserError('--chip-px must be >= 1 and --stride-px >= 0')
  if not 0.0 <= args.val_fraction < 1.0:
    raise cli.UserError(f'--val-fraction must be in [0, 1), got {args.val_fraction}')
  if not 0.0 <= args.min_valid_fraction <= 1.0:
    raise cli.UserError('--min-valid-fraction must be in [0, 1]')
  if args.split_seed < 0:   # numpy seeds are non-negative
    raise cli.UserError(f'--split-seed must be >= 0, got {args.split_seed}')
  return tfds_builder.ChipOptions(
      chip_px=chip_px, stride_px=args.stride_px,
      min_valid_fraction=args.min_valid_fraction, val_fraction=args.val_fraction,
      split_seed=args.split_seed)


def _check_simulate_flags(args: argparse.Namespace, options: tfds_builder.ChipOptions) -> None:
  if args.rubin_dir or args.euclid_dir or args.dir:
    raise cli.UserError('--simulate builds from the simulator; do not also give tile folders')
  if args.simulate < 1:
    raise cli.UserError(f'--simulate must be >= 1, got {args.simulate}')
  if args.seed < 0:
    raise cli.UserError(f'--seed must be >= 0, got {args.seed}')
  if args.workers is not None and args.workers < 1:
    raise cli.UserError(f'--workers must be >= 1, got {args.workers}')
  if args.size < options.chip_px:
    raise cli.UserError(f'--size {args.size} is smaller than --chip-px {options.chip_px}')


def _check_output(args: argparse.Namespace) -> None:
  """The dataset's name and folder, checked before any work so that a bad one costs
  nothing and leaves nothing behind (the build itself only finds out at its end)."""
  if not _NAME.fullmatch(args.name):
    raise cli.UserError(f'--name {args.name!r}: a dataset name is a letter followed by '
                        'letters, digits and _ (what tfds.data_source reads)')
  cli.check_output_folder(args.data_dir, '--data-dir')
  folder = pathlib.Path(args.data_dir) / args.name
  if os.path.lexists(folder) and not folder.is_dir():
    raise cli.UserError(f'{folder}: exists and is not a folder (the dataset goes there); '
                        'remove it or choose another --name')
  final = folder / tfds_builder.VERSION
  if final.exists() and not args.overwrite:
    raise cli.UserError(f'{final}: dataset already built; pass --overwrite to replace it')


def _build_simulated(args, registry, options) -> tfds_builder.BuildReport:
  """Simulates a field into a scratch folder of the data dir, then builds from it."""
  data_dir = pathlib.Path(args.data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  # Named like the builder's scratch folders, so a killed run's leftovers get removed.
  scratch = data_dir / f'.{args.name}-building-{os.getpid()}-sim'
  try:
    field = tfds_builder.simulate_field(scratch, args.name, args.simulate, args.seed, args.size,
                                        registry, workers=args.workers)
    return tfds_builder.build_dataset(
        field.dirs, data_dir, args.name, registry, options, truth=field.truth, wcs=field.wcs,
        extra_files=field.extra_files, overwrite=args.overwrite, progress=not args.no_progress,
        source=f'simulate n_tiles={args.simulate} seed={args.seed} size={args.size}',
        log=lambda s: print(s, file=sys.stderr))
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  registry = check_lib.load_registry(args.bands)
  options = _options(args)
  if args.simulate:
    _check_simulate_flags(args, options)
  _check_output(args)
  created = cli.missing_folders(args.data_dir)
  done = False
  try:
    if args.simulate:
      report = _build_simulated(args, registry, options)
    else:
      dirs = check_lib._folders(args)  # pylint: disable=protected-access
      report = tfds_builder.build_dataset(
          dirs, args.data_dir, args.name, registry, options, skip_invalid=args.skip_invalid,
          overwrite=args.overwrite, fit_chip=args.chip_px is None,
          progress=not args.no_progress,
          source='folders ' + ' '.join(f'{k}={v}' for k, v in dirs.items()),
          log=lambda s: print(s, file=sys.stderr))
    done = True
  except tfds_builder.BuildError as e:
    for line in e.lines:
      print(line, file=sys.stderr)
    print(f'build: {e}', file=sys.stderr)
    return cli.EXIT_INVALID_INPUT
  finally:
    if not done:  # a failed or interrupted build leaves no empty --data-dir it created
      for folder in created:
        try:
          os.rmdir(folder)  # only if empty: a scratch or other content stays
        except OSError:
          break
  for line in report.lines():
    print(line)
  for line in report.problems:
    print(f'skipped: {line}')
  print(f'build: wrote {report.path}')
  return cli.EXIT_OK


if __name__ == '__main__':
  sys.exit(cli.run(main, prog='build'))
