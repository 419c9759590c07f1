"""Checkpoints restore exactly what was saved, and refuse a tree of another shape
(Orbax alone would restore it partially, without a word)."""

import jax
import numpy as np
import pytest

from fineflax import checkpoints, config as config_lib, freeze, models, optimizers, parallel
from fineflax import state as state_lib


@pytest.fixture(scope='module')
def states():
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  model = models.build_model(cfg.model, 10)
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)
  mesh = parallel.make_mesh(jax.devices()[:2])

  def state_for(spec):
    labels = freeze.freeze_labels(variables['params'], spec, model.backbone.layers)
    tx = freeze.partition_optimizer(optimizers.build_optimizer(config_lib.phase()), labels)
    return parallel.replicate(state_lib.create_train_state(variables, tx, labels, 7), mesh)

  return {'conv5': state_for('layers[:43]'), 'all': state_for('none')}


def test_round_trip(tmp_path, states):
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(states['conv5'], {'step': 7, 'phase_index': 0})
  ckpts.close()
  ckpts = checkpoints.Checkpoints(tmp_path)  # as a resumed run reads it
  assert ckpts.latest_meta() == {'step': 7, 'phase_index': 0}
  restored = ckpts.restore(7, states['conv5'])
  assert jax.tree.structure(restored) == jax.tree.structure(states['conv5'])
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(states['conv5'])):
    np.testing.assert_array_equal(a, b)
  ckpts.close()


@pytest.mark.parametrize('saved, target, message', [
    ('conv5', 'all', 'leaves missing from the checkpoint'),
    ('all', 'conv5', "leaves in the checkpoint but not in this config's state"),
])
def test_another_tree_is_refused(tmp_path, states, saved, target, message):
  ckpts = checkpoints.Checkpoints(tmp_path)
  ckpts.save(states[saved], {'step': 7})
  ckpts.close()
  ckpts = checkpoints.Checkpoints(tmp_path)
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    ckpts.restore(7, states[target])
  assert message in str(error.value)
  assert 'opt_state/inner_states/trainable/inner_state/0/mu/backbone/conv1' in str(error.value)
  assert str(tmp_path) in str(error.value)
  ckpts.close()
