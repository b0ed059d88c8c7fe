"""Command-line plumbing shared by the `python -m jaisp_jax...` entry points.

User errors (bad files, bad flags) are reported as one readable line on stderr and
a non-zero exit status, never as a traceback; programming errors still raise.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence


class UserError(Exception):
  """A problem with the user's input (a file, a flag, a folder), not with our code.

  The message must name the offending file or flag and say what is wrong.
  """


class ConfigError(UserError, ValueError):
  """A config value the code cannot run with (e.g. a batch that does not split over the
  devices): one line and exit 2 on the command line, a ValueError for library callers."""


# Exit statuses of the command-line tools.
EXIT_OK = 0
EXIT_INVALID_INPUT = 1   # the input was read and found bad (e.g. `check` found bad tiles)
EXIT_USAGE = 2           # the command could not run (missing folder, bad flag value)


def first_line(error: BaseException) -> str:
  """The first line of `error`'s message ('' if it has none), for one-line reports."""
  text = str(error).strip()
  return text.splitlines()[0] if text else ''


def read_json(path: str | os.PathLike, kind: type = dict):
  """The JSON file at `path`, whose top level must be a `kind` (dict or list).

  Raises UserError naming the file when it cannot be read, is not JSON, or holds
  another kind of value at the top level.
  """
  import json  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  try:
    with open(path) as f:
      value = json.load(f)
  except OSError as e:
    raise UserError(f'{path}: cannot read it ({e.strerror or e})') from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UserError(f'{path}: cannot read it as JSON ({type(e).__name__}: {e})') from None
  if not isinstance(value, kind):
    raise UserError(f'{path}: expected a JSON {"object" if kind is dict else "array"} at '
                    f'the top level, got {type(value).__name__}')
  return value


def missing_folders(path: str | os.PathLike) -> list[str]:
  """The absolute paths of `path` and its parents that do not exist yet, deepest first.

  A dangling symlink exists (it is taken, not missing).
  """
  missing = []
  folder = os.path.abspath(os.fspath(path))
  while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
    missing.append(folder)
    folder = os.path.dirname(folder)
  return missing


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
  """Raises UserError unless `path` is a folder or can be made one (checked before work).

  Walks up to the nearest existing path, which must be a writable folder: a regular
  file anywhere on the way would otherwise fail `os.makedirs` late, with a traceback.
  """
  path = os.fspath(path)
  missing = missing_folders(path)
  folder = os.path.dirname(missing[-1]) if missing else os.path.abspath(path)
  if not os.path.isdir(folder):
    what = 'exists and is not a folder' if folder == os.path.abspath(path) else \
        f'{folder} is not a folder'
    raise UserError(f'{flag} {path}: {what}')
  if not os.access(folder, os.W_OK | os.X_OK):
    raise UserError(f'{flag} {path}: {folder} is not writable')


def run(main: Callable[[Sequence[str] | None], int | None],
        argv: Sequence[str] | None = None, prog: str = 'jaisp_jax') -> int:
  """Runs `main(argv)`, turning `UserError` into a one-line message and exit 2."""
  try:
    status = main(argv)
  except UserError as e:
    print(f'{prog}: error: {e}', file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    print(f'{prog}: interrupted', file=sys.stderr)
    return 130
  except BrokenPipeError:
    # Output piped into a reader that quit early (`... | head`): not an error of ours.
    # Point stdout at devnull so the interpreter's final flush does not raise again.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK
  return EXIT_OK if status is None else int(status)
