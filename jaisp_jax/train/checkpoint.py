"""Orbax checkpoints of the train state and the data iterator, saved together.

Layout: `<workdir>/checkpoints/<step>/{state,data}` written by one orbax
`CheckpointManager` (async saves, keep-K, atomic: orbax writes into a temporary
folder and renames it when complete, so a killed save leaves no checkpoint that
looks valid). The grain iterator state is stored per process beside the state, so
a resumed run reads exactly the batches an uninterrupted one would.

A checkpoint that does not fit the current config (a shape-changing edit such as a
new embed dim) or cannot be read (corrupted files) raises `CheckpointError`, a
`UserError` naming the checkpoint and the first mismatching leaves; it is never
overwritten, because saving only happens after a successful restore or into an
empty folder.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaisp_jax import cli
from jaisp_jax.cli import UserError


class CheckpointError(UserError):
  """A checkpoint that cannot be restored into the current config."""


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


def _shape_mismatches(saved: Any, expected: Any, limit: int = 5) -> list[str]:
  """Leaves whose saved shape differs from the expected one (or that are missing)."""
  saved_flat = {_path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(saved)[0]}
  problems = []
  for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]:
    key = _path_str(p)
    if key not in saved_flat:
      problems.append(f'{key}: missing from the checkpoint')
    else:
      s_shape = tuple(getattr(saved_flat[key], 'shape', ()) or ())
      if s_shape != tuple(x.shape):
        problems.append(f'{key}: checkpoint has shape {s_shape}, this config needs {tuple(x.shape)}')
    if len(problems) >= limit:
      break
  expected_keys = {_path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(expected)[0]}
  extra = sorted(set(saved_flat) - expected_keys)[:max(0, limit - len(problems))]
  problems += [f'{k}: in the checkpoint but not in this config' for k in extra]
  return problems


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs under `workdir`."""

  def __init__(self, workdir: str, *, save_every: int, keep: int, async_save: bool = True,
               cleanup_tmp: bool = False):
    """`cleanup_tmp`: delete the temporary folders of saves that a killed run left behind
    (orbax does it in the background, finished before the first save; only the run that
    trains may ask: another process's save may still be in flight)."""
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    if os.path.lexists(self.directory) and not os.path.isdir(self.directory):
      # orbax would train on and then hang for minutes at the first save.
      raise CheckpointError(f'{self.directory}: exists and is not a folder; checkpoints '
                            'cannot be kept there (move it aside or use another --workdir)')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(1, save_every),
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=cleanup_tmp)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None, *, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); returns whether a save started.

    A step that is already saved (e.g. the final step fell on the save interval)
    is not saved again.
    """
    if step in self._manager.all_steps():
      return False
    items = {'state': ocp.args.StandardSave(state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iter)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iter: Any | None, step: int | None = None) -> Any:
    """Restores the state (sharded like `abstract_state`) and the iterator in place.

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with shardings.
    """
    step = self.latest_step() if step is None else step
    where = os.path.join(self.directory, str(step))
    try:
      saved = _as_tree(ocp.StandardCheckpointHandler().metadata(
          epath.Path(os.path.join(where, 'state'))))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{where}: cannot read the checkpoint metadata '
                            f'({type(e).__name__}: {_first_line(e)}); it may be corrupted'
                            f'{self._fallback(step)}') from None
    problems = _shape_mismatches(saved, abstract_state)
    if problems:
      raise CheckpointError(
          f'{where}: the checkpoint does not fit this config (a shape-changing config '
          f'edit?): ' + '; '.join(problems) + '. Use a new --workdir, or the config '
          f'this checkpoint was trained with. The checkpoint was left untouched.')
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items['data'] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{where}: restore failed ({type(e).__name__}: {_first_line(e)}); '
                            'the checkpoint may be corrupted or from an incompatible version'
                            f'{self._fallback(step)}') from None
    return restored['state']

  def _fallback(self, step: int) -> str:
    """What to do about the unreadable checkpoint of `step` (it is never deleted here)."""
    earlier = [s for s in self.all_steps() if s < step]
    then = f'resume from step {max(earlier)}' if earlier else 'start afresh'
    return f'. Move that folder out of {self.directory} to {then}'

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _first_line(error: Exception) -> str:
  """The first line of `error`'s message, without TensorStore's dump of its spec."""
  line = cli.first_line(error)
  for spec in (' [tensorstore_spec=', ' See full TensorStore details'):
    line = line.split(spec)[0]
  return line


def _as_tree(metadata: Any) -> Any:
  """Orbax tree metadata -> a plain pytree whose leaves have `.shape`."""
  tree = getattr(metadata, 'tree', metadata)
  if not isinstance(tree, (dict, list, tuple)):
    raise ValueError(f'unexpected checkpoint metadata {type(tree).__name__}')
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape or ()), np.int8)
                      if hasattr(m, 'shape') else m, tree,
                      is_leaf=lambda m: hasattr(m, 'shape'))
