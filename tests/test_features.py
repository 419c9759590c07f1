"""Cached-feature mode, per-phase augmentation and class weights."""

import logging

import jax
import numpy as np
import pytest

from fineflax import config as config_lib, data, train
from fineflax.errors import ConfigError
from fineflax.run.reporting import MetricsLog
from tests import helpers

pytestmark = pytest.mark.slow  # trains runs


def _head_config(cache):
  """A frozen backbone, a head with a hidden layer, dropout and trainable BN: the head
  phase may use cached features; the second phase trains conv5 on the images."""
  cfg = helpers.two_phase_config()  # 3 train steps an epoch, head dropout
  cfg.model.head.hidden = (16,)
  cfg.model.head.batchnorm = True
  cfg.data.augment.flip = 'horizontal'
  cfg.features.cache = cache
  cfg.phases = (
      config_lib.phase(
          name='head',
          freeze='backbone',
          augment=False,
          batchnorm='train',
          learning_rate=3e-3,
          epochs=2,
      ),
      config_lib.phase(name='conv5', freeze='regex:^backbone/conv[1-4]_', epochs=1),
  )
  return cfg


def _metrics(workdir):
  return [
      {k: r[k] for k in ('phase', 'step', 'loss', 'accuracy', 'val_loss', 'val_accuracy')}
      for r in MetricsLog(workdir).read()
  ]


def test_cached_features_train_the_head_as_the_images_do(tmp_path, caplog):
  devices = jax.devices()[:2]
  with caplog.at_level(logging.DEBUG, logger='fineflax'):
    cached = train.train_and_evaluate(_head_config('memory'), tmp_path / 'memory', devices=devices)
  assert '[head] trains the head on cached features' in caplog.text
  assert (
      '[conv5] trains on the images (no cached features: the phase trains backbone' in caplog.text
  )
  caplog.clear()
  with caplog.at_level(logging.INFO, logger='fineflax'):
    plain = train.train_and_evaluate(_head_config('off'), tmp_path / 'off', devices=devices)
  assert 'cached features' not in caplog.text
  disk = train.train_and_evaluate(_head_config('disk'), tmp_path / 'disk', devices=devices)
  assert sorted(p.name for p in (tmp_path / 'disk' / 'features').iterdir()) == [
      'train.npy',
      'val.npy',
  ]

  # The cached step computes the backbone in another XLA program (fused differently), so
  # equality is up to float32 rounding, carried through 7 Adam steps.
  expected = _metrics(tmp_path / 'off')
  for got in (_metrics(tmp_path / 'memory'), _metrics(tmp_path / 'disk')):
    assert [(r['phase'], r['step']) for r in got] == [(r['phase'], r['step']) for r in expected]
    for a, b in zip(got, expected):
      for key in ('loss', 'accuracy', 'val_loss', 'val_accuracy'):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a, b, key)
  for result in (cached, disk):
    assert result['test_examples'] == plain['test_examples']
    assert result['test_loss'] == pytest.approx(plain['test_loss'], rel=1e-4)
    assert result['test_accuracy'] == pytest.approx(plain['test_accuracy'], abs=1e-6)


def test_forcing_the_cache_with_no_phase_that_can_use_it_is_an_error(tmp_path):
  cfg = _head_config('memory')
  cfg.phases = (config_lib.phase(name='head', freeze='backbone', epochs=1),)  # augmented
  with pytest.raises(
      ConfigError,
      match=r"features.cache='memory' but no phase can use cached "
      r'features \(head: the training images are augmented\)',
  ):
    train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:2])
  assert not (tmp_path / 'run').exists()


def test_augment_false_with_a_random_crop_is_refused():
  cfg = _head_config('auto')
  cfg.data.augment.crop = 12
  with pytest.raises(ConfigError, match=r'phases\[0\].augment=False with config.data.augment.crop'):
    config_lib.validate(cfg)


class _Split:

  def __init__(self, labels):
    self.labels = np.asarray(labels)


def test_class_weights_balanced_and_explicit():
  balanced = data.class_weights('balanced', _Split([0, 0, 0, 1]), 2)
  assert balanced == pytest.approx((4 / 6, 4 / 2))  # scikit-learn's and Keras' 'balanced'
  assert data.class_weights((1, 3.5), _Split([0, 1]), 2) == (1.0, 3.5)
  assert data.class_weights(None, _Split([0, 1]), 2) is None
  with pytest.raises(ConfigError, match='class_weight has 3 weights but the dataset has 2'):
    data.class_weights((1, 2, 3), _Split([0, 1]), 2)
  with pytest.raises(ConfigError, match='no example of class 2'):
    data.class_weights('balanced', _Split([0, 1]), 3)
  cfg = config_lib.default_config()
  cfg.loss.class_weight = 'inverse'
  with pytest.raises(
      ConfigError,
      match=r"config.loss.class_weight='inverse': expected " "'balanced' or one weight per class",
  ):
    config_lib.validate(cfg)


def test_class_weights_scale_each_examples_loss():
  """Keras' class_weight: loss_i x w[label_i], averaged over the examples (not over the
  weights); accuracy unweighted."""
  from fineflax.distributed import parallel  # pylint: disable=g-import-not-at-top
  from fineflax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from tests import helpers, test_step  # pylint: disable=g-import-not-at-top

  model, labels, mesh, state, _ = test_step._setup('backbone', dropout=0.0)
  opt = helpers.phase_optimizer(model, state.params, 'backbone', optimizer='sgd')
  batch = parallel.shard_batch(test_step._batches(1)[0], mesh)
  weights = (0.5, 2.0, 0.0, 1.0)
  sums = {}
  for name, cw in (('plain', None), ('weighted', weights)):
    step = step_lib.make_train_step(model, opt, mesh, class_weights=cw)
    sums[name] = jax.device_get(step(jax.tree.map(lambda x: x.copy(), state), batch, {})[1])
  images, targets = np.asarray(batch['image']), np.asarray(batch['label'])
  logits = model.apply(jax.device_get(state.variables), images)
  per_example = np.asarray(step_lib.per_example_loss(logits, targets)[0])
  np.testing.assert_allclose(sums['plain']['loss'], per_example.sum(), rtol=1e-5)
  np.testing.assert_allclose(
      sums['weighted']['loss'], (per_example * np.take(weights, targets)).sum(), rtol=1e-5
  )
  assert sums['weighted']['correct'] == sums['plain']['correct']
  assert sums['weighted']['count'] == sums['plain']['count'] == len(targets)
