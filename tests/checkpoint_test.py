"""Orbax checkpoints of (train state, grain iterator): round trip, mismatch, corruption."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaisp_jax.train import checkpoint as ckpt_lib
from jaisp_jax.train import state as state_lib


def make_state(width=4, seed=0):
  params = {'dense': {'kernel': jax.random.normal(jax.random.key(seed), (3, width)),
                      'bias': jnp.zeros(width)}}
  return state_lib.TrainState(step=jnp.asarray(7, jnp.int32), params=params,
                              ema_params=jax.tree.map(lambda x: x + 1, params),
                              opt_state={'mu': jax.tree.map(jnp.zeros_like, params)},
                              rng=jax.random.key_data(jax.random.key(seed)),
                              skipped=jnp.zeros((), jnp.int32))


def make_iter():
  ds = grain.MapDataset.range(100).shuffle(seed=3).map(lambda x: x * 2).to_iter_dataset()
  return iter(ds)


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                     sharding=x.sharding), state)


def test_round_trip_restores_state_and_iterator_position(tmp_path):
  state = make_state()
  it = make_iter()
  for _ in range(5):
    next(it)
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert ck.save(7, state, it)
  ck.wait()
  expected_next = [next(it) for _ in range(4)]
  fresh_it = make_iter()
  ck2 = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert ck2.latest_step() == 7
  restored = ck2.restore(abstract(state), fresh_it)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert [next(fresh_it) for _ in range(4)] == expected_next
  ck.close()
  ck2.close()


def test_shape_changing_config_gets_a_clear_error_and_checkpoint_is_kept(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  ck.save(1, make_state(width=4), make_iter())
  ck.close()
  before = sorted(os.listdir(tmp_path / 'checkpoints' / '1'))
  ck2 = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  with pytest.raises(ckpt_lib.CheckpointError, match=r'params/dense/kernel: checkpoint has shape \(3, 4\), this config needs \(3, 8\)'):
    ck2.restore(abstract(make_state(width=8)), make_iter())
  assert sorted(os.listdir(tmp_path / 'checkpoints' / '1')) == before
  ck2.close()


def test_corrupted_checkpoint_gets_a_clear_error(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  ck.save(1, make_state(), make_iter())
  ck.close()
  # Damage every file of the saved state (array data and metadata alike).
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '1' / 'state'):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'\x00garbage')
  ck2 = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  with pytest.raises(ckpt_lib.CheckpointError, match='checkpoints/1'):
    ck2.restore(abstract(make_state()), make_iter())
  ck2.close()


def test_checkpoints_path_that_is_a_file_is_refused_up_front(tmp_path):
  # orbax would let the run train and then hang for minutes at its first save.
  (tmp_path / 'checkpoints').write_text('notes')
  with pytest.raises(ckpt_lib.CheckpointError, match='checkpoints: exists and is not a folder'):
    ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=2)
  assert (tmp_path / 'checkpoints').read_text() == 'notes'


def test_unreadable_latest_checkpoint_says_which_step_to_resume_from(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=5)
  ck.save(1, make_state(), make_iter())
  ck.save(2, make_state(), make_iter())
  ck.close()
  # Step 2's array data cut short (a disk that filled up, a copy cut short).
  data = [os.path.join(root, f) for root, _, files in
          os.walk(tmp_path / 'checkpoints' / '2' / 'state') for f in files
          if os.sep + 'd' + os.sep in os.path.join(root, f)]
  assert data
  for f in data:
    with open(f, 'r+b') as fh:
      fh.truncate(5)
  # An empty step folder after it (e.g. a sync of the workdir cut short).
  os.makedirs(tmp_path / 'checkpoints' / '3')
  ck2 = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=5)
  assert ck2.latest_step() == 3
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r'checkpoints/3: cannot read .*to resume from step 2$'):
    ck2.restore(abstract(make_state()), make_iter())
  with pytest.raises(ckpt_lib.CheckpointError,
                     match=r'checkpoints/2: .*corrupted.*to resume from step 1$') as e:
    ck2.restore(abstract(make_state()), make_iter(), step=2)
  assert 'tensorstore_spec' not in str(e.value) and '\n' not in str(e.value)
  restored = ck2.restore(abstract(make_state()), make_iter(), step=1)  # the fallback works
  jax.tree.map(np.testing.assert_array_equal, restored, make_state())
  ck2.close()
  assert os.listdir(tmp_path / 'checkpoints' / '3') == []  # nothing was deleted


def test_training_checkpointer_removes_the_leftovers_of_a_killed_save(tmp_path):
  ck = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=5)
  ck.save(1, make_state(), make_iter())
  ck.close()
  # What a save killed half-way (SIGKILL, a second Ctrl-C) leaves: orbax's temporary folder.
  tmp = tmp_path / 'checkpoints' / '7.orbax-checkpoint-tmp'
  (tmp / 'state').mkdir(parents=True)
  (tmp / 'state' / 'partial').write_bytes(b'\x00' * 1000)
  reader = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=5)  # evaluate / export
  assert reader.latest_step() == 1
  reader.close()
  assert tmp.exists()  # another process's save may still be writing it
  # The training run's: orbax removes the leftovers in the background, done by its first save.
  trainer = ckpt_lib.Checkpointer(str(tmp_path), save_every=1, keep=5, cleanup_tmp=True)
  assert trainer.latest_step() == 1
  trainer.save(2, make_state(), make_iter())
  trainer.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']
