"""Metrics reach TensorBoard event files that TensorBoard's own reader parses."""

import glob

import jax.numpy as jnp
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from jaisp_jax.train import reporting


def test_metrics_are_averaged_and_written_to_tensorboard(tmp_path):
  writer = reporting.create_writer(str(tmp_path))
  lines = []
  log = reporting.MetricsLogger(writer, log_every=2, total_steps=4, print_fn=lines.append)
  fetched = [log.push(s, {'loss': jnp.asarray(float(s)), 'vec': jnp.ones(3)}) for s in (1, 2, 3, 4)]
  assert fetched[0] is None and fetched[1] == {'loss': 1.0}   # one step late, scalars only
  log.flush()
  writer.close()
  files = glob.glob(str(tmp_path / 'events.out.tfevents.*'))
  assert files
  acc = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={'tensors': 0})
  acc.Reload()
  tags = acc.Tags()['tensors'] + acc.Tags()['scalars']
  assert 'train/loss' in tags
  events = acc.Tensors('train/loss') if 'train/loss' in acc.Tags()['tensors'] else acc.Scalars('train/loss')
  values = {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) if hasattr(e, 'tensor_proto')
            else e.value for e in events}
  assert values == {2: pytest.approx(1.5), 4: pytest.approx(3.5)}
  assert len(lines) == 2 and lines[0].startswith('step 2/4 | loss 1.5 |') and 'ETA' in lines[0]
