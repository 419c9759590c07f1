"""Run-level claims of the README and docs that no other test pins: gradient accumulation
in a real run (an effective batch of N x batch_size; a resume inside an accumulation ends
bit for bit where an uninterrupted run ends), `allow_config_change=True` (the resume goes
on and the changed value is used), and `init_from` naming a checkpoint step folder or the
output of scripts/convert_weights.py."""

import json
import shutil
from pathlib import Path

import h5py
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fineflax import config as config_lib, train
from fineflax.distributed import preemption
from fineflax.distributed.preemption import sigterm_flag
from fineflax.run import RunDir
from fineflax.run.reporting import MetricsLog
from tests import helpers, scripts_loader

pytestmark = pytest.mark.slow  # trains runs

DEVICES = jax.devices()[:2]


def _config(examples, batch_size, epochs, val=False, **phase):
  """resnet_tiny at 16 px on the first `examples` digits, one phase, no test split (and
  no validation split unless `val`): only what the test needs is evaluated. Nothing in a
  step depends on the step count or the batch's size but the data itself: no dropout, no
  augmentation, BatchNorm frozen (the defaults), so runs with other batch sizes or
  accumulation can be compared."""
  cfg = helpers.tiny_config(
      config_lib.phase(name='only', epochs=epochs, **phase),
      batch_size=batch_size,
      max_examples=examples,
      test_split=None,
      val_split='validation' if val else None,
  )
  cfg.report.progress = 'off'
  cfg.report.tensorboard = False
  return cfg


def _state(workdir, step=None):
  """The saved train state of `step` (default: the run's last), read with plain Orbax."""
  if step is None:
    step = json.loads((Path(workdir) / 'results.json').read_text())['step']
  return ocp.StandardCheckpointer().restore(RunDir(workdir).latest / str(step) / 'state')


def _records(workdir):
  return [{k: v for k, v in r.items() if k != 'images_per_sec'} for r in MetricsLog(workdir).read()]


# SGD with momentum: unlike Adam's normalised step, its update scales with the gradient,
# so an accumulation that summed the N gradients instead of averaging them would show.
_SGD = dict(optimizer='sgd', momentum=0.9, learning_rate=0.05)


@pytest.fixture(scope='module')
def accumulated_run(tmp_path_factory):
  """32 examples, batch_size 8, accumulate=2, 2 epochs: 8 steps, 4 updates (checkpoints
  at steps 4 and 8 in latest/)."""
  workdir = tmp_path_factory.mktemp('accumulate2')
  # With a validation split: init_from's test below needs a best/ step.
  train.train_and_evaluate(
      _config(32, 8, 2, val=True, accumulate=2, **_SGD), workdir, devices=DEVICES
  )
  return workdir


def test_accumulate_2_of_batch_8_equals_batch_16(accumulated_run, tmp_path):
  """accumulate=N over batches of B is one update on the mean gradient of N x B examples:
  with 32 examples an epoch's order is one permutation (rng.permutation comes first,
  whatever the batch size), so batches 2k and 2k+1 of size 8 are batch k of size 16, and
  the two runs must end on the same parameters."""
  big = tmp_path / 'batch16'
  train.train_and_evaluate(_config(32, 16, 2, accumulate=1, **_SGD), big, devices=DEVICES)
  a, b = _state(accumulated_run), _state(big)
  assert (int(a['step']), int(b['step'])) == (8, 4)
  halfway = _state(accumulated_run, 4)
  moved = max(
      np.abs(np.asarray(x) - np.asarray(y)).max()
      for x, y in zip(jax.tree.leaves(a['params']), jax.tree.leaves(halfway['params']))
  )
  assert moved > 1e-3  # 2 updates move a parameter by ~2e-2: far beyond the tolerance
  # The two runs add the same per-example gradients in another order (two means of 8
  # averaged vs one mean of 16): float32 rounding, grown over 4 momentum updates. Measured
  # here: at most 3e-8 apart, ~1% of rtol 1e-5 / atol 1e-6, which stay 1e4 below what an
  # update moves (with accumulation switched off the runs end 1e-2 apart).
  for (path, x), y in zip(
      jax.tree_util.tree_flatten_with_path(a['params'])[0],
      jax.tree.leaves(b['params']),
      strict=True,
  ):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )


def _multisteps(opt_state):
  """The optax.MultiSteps state inside a saved opt_state (docs/checkpoints.md's paths)."""
  return opt_state['inner_states']['trainable']['inner_state']


def test_resume_inside_an_accumulation_is_bitwise(tmp_path, monkeypatch):
  """24 examples in batches of 8: 3 steps an epoch, so with accumulate=2 the second
  update spans the epoch's end. A SIGTERM after step 1 (mid-epoch, one batch accumulated)
  and another after step 3 (the end of epoch 1, its last batch accumulated for an update
  made in epoch 2), each resumed by the same call, end bit for bit on the state of a run
  never stopped (the docs' resume claim): the partial sums and the mini-step count are
  saved and restored, and the resume goes on from the batch after the saved one."""
  config = lambda: _config(24, 8, 2, accumulate=2)  # Adam, the default
  whole = train.train_and_evaluate(config(), tmp_path / 'whole', devices=DEVICES)
  cut = tmp_path / 'cut'
  for step, where in [(1, '1 batches into an epoch'), (3, 'the end of epoch 1')]:
    # The SIGTERM noted after that step, as test_train.py does it.
    with monkeypatch.context() as patch:
      patch.setattr(preemption.StopRequest, 'at', lambda self, s, at=step: s == at)
      with pytest.raises(preemption.Preempted, match=f'saved step {step} .*{where}'):
        train.train_and_evaluate(config(), cut, devices=DEVICES)
    saved = _multisteps(_state(cut, step)['opt_state'])
    # What makes these stops a test of accumulation: a half-done update was saved.
    assert int(saved['mini_step']) == 1 and int(saved['gradient_step']) == step // 2
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(saved['acc_grads']))
  resumed = train.train_and_evaluate(config(), cut, devices=DEVICES)

  assert resumed == whole
  assert _records(cut) == _records(tmp_path / 'whole')
  a, b = _state(tmp_path / 'whole'), _state(cut)
  assert int(a['step']) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_allow_config_change_resumes_with_the_new_learning_rate(tmp_path, caplog):
  """A learning rate changed between two runs of a workdir is refused by default
  (test_bad_input.py); with allow_config_change=True the resume goes on, config.json and
  the records say the new rate, and the new epoch's update is made with it.

  Full batch (16 examples, batch_size 16), plain SGD: an epoch is one update
  p2 = p1 - lr * g(p1). Resuming the same checkpoint once with the old rate and once with
  a new one must give updates in the ratio of the rates: a formula, not a second
  implementation of the step. The log names what changed."""
  lr_old, lr_new = 0.1, 0.025
  plain_sgd = lambda lr, epochs: _config(16, 16, epochs, optimizer='sgd', learning_rate=lr)
  first = tmp_path / 'first'
  train.train_and_evaluate(plain_sgd(lr_old, 1), first, devices=DEVICES)
  shutil.copytree(first, tmp_path / 'same')
  shutil.copytree(first, tmp_path / 'changed')
  # More epochs alone are a resumable change: the reference needs no permission.
  train.train_and_evaluate(plain_sgd(lr_old, 2), tmp_path / 'same', devices=DEVICES)
  changed = plain_sgd(lr_new, 2)
  changed.allow_config_change = True
  with caplog.at_level('INFO', logger='fineflax.train'):
    train.train_and_evaluate(changed, tmp_path / 'changed', devices=DEVICES)
  assert 'resuming from step 1' in caplog.text
  assert (
      'resuming with a changed config (config.allow_config_change): '
      'phases[0].learning_rate: 0.1 -> 0.025'
  ) in caplog.text

  saved = json.loads(RunDir(tmp_path / 'changed').config_json.read_text())
  assert (saved['phases'][0]['learning_rate'], saved['allow_config_change']) == (lr_new, True)
  records = _records(tmp_path / 'changed')
  assert [(r['step'], r['learning_rate']) for r in records] == [(1, lr_old), (2, lr_new)]

  p1 = jax.tree.leaves(_state(first, 1)['params'])
  same = jax.tree.leaves(_state(tmp_path / 'same', 2)['params'])
  new = jax.tree.leaves(_state(tmp_path / 'changed', 2)['params'])
  ratio = lr_new / lr_old
  eps = np.finfo(np.float32).eps
  for p, a, b in zip(p1, same, new, strict=True):
    p, a, b = (np.asarray(x, np.float64) for x in (p, a, b))
    # Both resumes compute the same g(p1) bit for bit; what differs is the rounding of
    # lr * g (eps/2 relative) and of p1 + update (half a float32 ulp of the result): a
    # bound from that analysis, not a fitted tolerance (measured: 0.4 of it at most).
    ulp = np.spacing(np.maximum.reduce([np.abs(p), np.abs(a), np.abs(b)]).astype(np.float32))
    bound = (1 + ratio) * ulp + 2 * eps * np.abs(b - p)
    excess = (np.abs((b - p) - ratio * (a - p)) / bound).max()
    assert excess <= 1, f'an update off the ratio {ratio} by {excess:.3g}x the rounding bound'
  assert max(np.abs(np.asarray(a) - np.asarray(p)).max() for p, a in zip(p1, same)) > 1e-3


def test_init_from_a_step_folder_takes_that_step_not_the_best(accumulated_run, tmp_path):
  """init_from naming `RUN/checkpoints/latest/STEP` loads that step's backbone (compared
  with plain Orbax's read of its leaves), not the run's best step, which init_from naming
  the run would take."""
  folder = RunDir(accumulated_run)
  [best] = [int(p.name) for p in folder.best.iterdir() if p.name.isdigit()]
  [other] = [s for s in (4, 8) if s != best]
  named = ocp.StandardCheckpointer().restore(folder.latest / str(other) / 'state')
  at_best = ocp.StandardCheckpointer().restore(folder.best / str(best) / 'state')
  cfg = _config(32, 8, 1)
  cfg.model.head.hidden = (32,)  # a new head: only the backbone comes from the step
  cfg.init_from = str(folder.latest / str(other))
  with sigterm_flag() as stop:
    run, _, variables = train.setup(cfg, tmp_path / 'new', DEVICES, stop)
    run.close()
  for collection in ('params', 'batch_stats'):
    for a, b in zip(
        jax.tree.leaves(named[collection]['backbone']),
        jax.tree.leaves(variables[collection]['backbone']),
        strict=True,
    ):
      assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
  differs = [
      not np.array_equal(a, b)
      for a, b in zip(
          jax.tree.leaves(at_best['params']['backbone']),
          jax.tree.leaves(variables['params']['backbone']),
          strict=True,
      )
  ]
  assert sum(differs) > len(differs) // 2


def _convert_weights():
  return scripts_loader.load('convert_weights')


# Keras' weight names -> where fineflax keeps them.
_KERAS_NAMES = {
    'kernel': ('params', 'kernel'),
    'bias': ('params', 'bias'),
    'gamma': ('params', 'scale'),
    'beta': ('params', 'bias'),
    'moving_mean': ('batch_stats', 'mean'),
    'moving_variance': ('batch_stats', 'var'),
}


def _assert_holds_keras_weights(variables, reference, what):
  """Every weight of the Keras model, bit for bit, at its layer's name in `variables`'
  backbone, and nothing else there."""
  backbone = {c: variables[c]['backbone'] for c in ('params', 'batch_stats')}
  compared = 0
  for layer in reference.layers:
    for weight in layer.weights:
      collection, key = _KERAS_NAMES[weight.name]
      ours = np.asarray(backbone[collection][layer.name][key])
      assert ours.tobytes() == np.asarray(weight.numpy(), np.float32).tobytes(), (
          what,
          layer.name,
          weight.name,
      )
      compared += 1
  assert compared == len(jax.tree.leaves(backbone)), what


def test_init_from_a_converted_keras_file_holds_the_keras_weights(keras, tmp_path):
  """scripts/convert_weights.py turns a Keras ResNet50 .h5 (random weights, BatchNorm
  statistics randomised so a mix-up of them shows) into a folder holding Keras' arrays
  under fineflax's names (read with plain Orbax), and init_from naming that folder starts
  the run from exactly those arrays. Both are checked against Keras: a mapping wrong in
  both directions (mean and variance swapped on write and on read) would cancel out in
  the run alone."""
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top

  keras.backend.clear_session()
  reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
  rng = np.random.default_rng(0)
  for layer in reference.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.get_weights()[0].shape
      layer.set_weights(
          [
              rng.uniform(0.5, 1.5, c),
              rng.normal(0, 0.1, c),
              rng.normal(0, 0.1, c),
              rng.uniform(0.5, 1.5, c),
          ]
      )
  h5 = tmp_path / 'resnet50_notop.h5'
  with h5py.File(h5, 'w') as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, reference)
  converted = tmp_path / 'converted'
  _convert_weights().convert('resnet50', str(h5), str(converted))
  _assert_holds_keras_weights(
      ocp.StandardCheckpointer().restore(converted), reference, 'the converted folder'
  )

  cfg = _config(32, 8, 1)
  cfg.model.backbone = 'resnet50'
  cfg.model.image_size = 32
  cfg.init_from = str(converted)
  with sigterm_flag() as stop:
    run, _, variables = train.setup(cfg, tmp_path / 'run', DEVICES, stop)
    run.close()
  _assert_holds_keras_weights(variables, reference, 'the run initialised from it')
