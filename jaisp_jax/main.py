r"""Entry point: parses flags and calls the library. Nothing else lives here.

    python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir=runs/smoke
    python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir=runs/smoke --mode=evaluate
    python -m jaisp_jax.main --config=configs/jepa.py:smoke --workdir=runs/smoke \
        --mode=export --export_dir=runs/smoke/export

Any config field can be overridden with `--config.<field>=<value>`; a misspelt
field fails with the list of valid keys (configs are locked). Training resumes from
the latest checkpoint in --workdir.

Multi-process: on TPU pods and SLURM, `--distributed=auto` (the default) lets
`jax.distributed.initialize()` find its peers from the environment. Elsewhere (e.g.
several CPU processes on one machine) pass --coordinator_address, --num_processes
and --process_id; CPU processes then use gloo collectives.
"""

from __future__ import annotations

import os
import signal
import sys

# Quiet TensorFlow's C++ start-up chatter (TF is imported by TFDS and clu's writer).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

if __name__ == '__main__':
  # Huge pages for the host heap: restarts this command once, before the heavy imports
  # (jaisp_jax/hugepages.py).
  from jaisp_jax import hugepages  # pylint: disable=g-import-not-at-top
  hugepages.reexec()

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from jaisp_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file[:arg], e.g. configs/jepa.py:smoke.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, TensorBoard, eval.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'export'], 'What to do.')
_EXPORT_DIR = flags.DEFINE_string('export_dir', None, 'Where --mode=export writes the bundle.')
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', 'auto', ['auto', 'on', 'off'],
    'auto: initialise jax.distributed when a coordinator is given or a cluster '
    '(TPU pod, SLURM) is detected; on: always; off: never.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Total number of processes.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process index.')


def _cluster_detected() -> bool:
  env = os.environ
  return ('SLURM_NTASKS' in env and int(env.get('SLURM_NTASKS', '1')) > 1) or \
      'TPU_WORKER_HOSTNAMES' in env or 'MEGASCALE_COORDINATOR_ADDRESS' in env


def _init_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  wanted = _DISTRIBUTED.value == 'on' or (
      _DISTRIBUTED.value == 'auto' and (_COORDINATOR.value or _cluster_detected()))
  if not wanted:
    return
  if _COORDINATOR.value and jax.config.jax_platforms in (None, '', 'cpu'):
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)


def _main(argv):
  if not flags.FLAGS['verbosity'].present:
    # Library INFO logs (orbax, grain, clu) drown the progress lines; -v 0 brings them back.
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise cli.UserError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None:
    raise cli.UserError('--config is required, e.g. --config=configs/jepa.py:smoke')
  if not _WORKDIR.value:
    raise cli.UserError('--workdir is required')
  try:
    config = _CONFIG.value
    config.model  # pylint: disable=pointless-statement  # a file that failed to load raises here
  except Exception as e:  # pylint: disable=broad-except  # the user's config file's errors
    raise cli.UserError(_config_problem(sys.argv, e)) from None
  _init_distributed()
  workdir = _WORKDIR.value
  if _MODE.value == 'train':
    # Ctrl-C outside the loop's polite stop (there a first one saves and stops): during
    # start-up, or a second one while that save runs, or during the final evaluation (the
    # last checkpoint is complete by then). A KeyboardInterrupt would surface as tracebacks
    # from orbax's interrupted threads; a save cut short leaves only a temporary folder,
    # which the next run ignores and removes.
    signal.signal(signal.SIGINT, _stop_at_once)
    from jaisp_jax.train import loop  # pylint: disable=g-import-not-at-top
    loop.train_and_evaluate(config, workdir)
  elif _MODE.value == 'evaluate':
    from jaisp_jax.evaluate import suite  # pylint: disable=g-import-not-at-top
    suite.evaluate(config, workdir)
  else:
    if not _EXPORT_DIR.value:
      raise cli.UserError('--mode=export needs --export_dir')
    from jaisp_jax.train import export  # pylint: disable=g-import-not-at-top
    export.export(config, workdir, _EXPORT_DIR.value)


def _stop_at_once(signum, frame):
  del signum, frame
  print('jaisp_jax.main: interrupted', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(130)  # pylint: disable=protected-access


def _config_problem(argv, error: Exception) -> str:
  """One line saying what is wrong with the --config flags of `argv`, for an `error`
  raised while parsing or loading them (absl wraps the config file's own traceback)."""
  from jaisp_jax.bench import configs  # pylint: disable=g-import-not-at-top
  spec, overrides = None, []
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith('--config='):
      spec = arg.split('=', 1)[1]
    elif arg == '--config' and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith('--config.'):
      overrides.append(arg)
  if spec:
    if os.path.isdir(configs.split_spec(spec)[0]):
      return (f'--config={spec}: {configs.split_spec(spec)[0]} is a folder, not a config file '
              '(expected e.g. configs/jepa.py:smoke)')
    try:
      configs.load_config(spec, overrides)
    except cli.UserError as e:
      return str(e)
    except Exception as e:  # pylint: disable=broad-except  # e.g. a SyntaxError in the file
      where = f' (line {e.lineno})' if isinstance(e, SyntaxError) and e.lineno else ''
      return (f'--config={spec}: cannot load the config file{where}: {type(e).__name__}: '
              f'{str(e).splitlines()[0] if str(e) else ""}')
  return str(error).strip().splitlines()[0]


def _parse_flags(argv):
  """absl's flag parsing, with any failure as one line and exit 2 (no traceback)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, config file errors
    print(f'jaisp_jax.main: error: {_config_problem(argv, e)}', file=sys.stderr)
    sys.exit(cli.EXIT_USAGE)


def main():
  def run(argv):
    try:
      _main(argv)
    except cli.UserError as e:
      print(f'jaisp_jax.main: error: {e}', file=sys.stderr)
      sys.exit(cli.EXIT_USAGE)
    except KeyboardInterrupt:  # Ctrl-C in --mode=evaluate or export: one line, no traceback
      # (their `finally`s have run; the interpreter's shutdown with TF's threads mid-work
      # once ended in a segfault, so it is skipped as in training)
      _stop_at_once(signal.SIGINT, None)
  app.run(run, flags_parser=_parse_flags)


if __name__ == '__main__':
  main()
