"""Every config file: valid as written and as :smoke, Keras' counts, and a smoke run of
each seed workflow end to end (random weights, tfds through mock_data, a made folder)."""

import importlib

import jax
import numpy as np
import pytest
from PIL import Image

from fineflax import config as config_lib, train
from fineflax.config import resume
from fineflax.train import summary
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # trains a smoke run of each config

CONFIGS = sorted(p.stem for p in (ROOT / 'configs').glob('*.py') if p.stem != '__init__')


def _config(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_validates_as_written_and_as_smoke(name):
  full, smoke = config_lib.validate(_config(name)), config_lib.validate(_config(name, 'smoke'))
  assert [(p.name, p.freeze, p.batchnorm) for p in smoke.phases] == [
      (p.name, p.freeze, p.batchnorm) for p in full.phases
  ]
  assert smoke.model.backbone == full.model.backbone
  assert smoke.model.head == full.model.head and smoke.model.weights == full.model.weights
  assert smoke.data.max_examples == 32 and smoke.model.image_size <= 32


def test_the_32px_smoke_run_is_the_cifar10_one_without_flips():
  """configs/cifar10_32px.py:smoke differs from configs/cifar10.py:smoke (both at 32 px)
  only in its flips and early-stopping patience (one epoch: nothing to stop), so the
  smoke run of the one runs the other's workflow; a difference beyond these needs its
  own smoke run below."""
  # The flattening that compares a resumed run's config with its config.json.
  flat = lambda name: resume._flatten(config_lib.to_dict(_config(name, 'smoke')))
  base, small = flat('cifar10'), flat('cifar10_32px')
  differ = {k for k in base.keys() | small.keys() if base.get(k) != small.get(k)}
  assert differ == {
      'data.augment.flip',
      'phases[0].early_stopping.patience',
      'phases[1].early_stopping.patience',
  }, differ
  assert small['data.augment.flip'] == 'none'


@pytest.fixture
def photos(tmp_path):
  rng = np.random.default_rng(0)
  for cls in ('damaged', 'undamaged'):
    (tmp_path / cls).mkdir()
    for i in range(20):
      Image.fromarray(rng.integers(0, 256, (40 + i, 50, 3), dtype=np.uint8)).save(
          tmp_path / cls / f'{i}.jpg'
      )
  return tmp_path


def test_folder_config_counts_equal_seed000_keras(photos):
  cfg = _config('folder')
  cfg.data.source = f'folder:{photos}'
  got, _ = summary.summarize_config(cfg)
  assert (got.trainable, got.non_trainable) == (14_982_145, 8_615_808)


def test_cifar10_config_counts_equal_seed004_keras():
  counts = [summary.summarize_config(_config('cifar10'), phase=i)[0] for i in (0, 1)]
  assert [(c.trainable, c.non_trainable) for c in counts] == [
      (20_490, 23_587_712),
      (14_996_490, 8_611_712),
  ]


def test_cats_vs_dogs_config_counts_equal_keras(keras):
  base = keras.applications.Xception(include_top=False, weights=None, input_shape=(150, 150, 3))
  count = lambda ws: sum(int(np.prod(w.shape)) for w in ws)
  frozen, finetune = [summary.summarize_config(_config('cats_vs_dogs'), phase=i)[0] for i in (0, 1)]
  assert (frozen.trainable, frozen.non_trainable) == (2049, base.count_params())
  assert (finetune.trainable, finetune.non_trainable) == (
      count(base.trainable_weights) + 2049,
      count(base.non_trainable_weights),
  )


@pytest.fixture
def cats_vs_dogs_small(tmp_path):
  """Seed 002's folder layout: train/, validation/, test/, each with cat/ and dog/."""
  rng = np.random.default_rng(0)
  for split in ('train', 'validation', 'test'):
    for cls in ('cat', 'dog'):
      (tmp_path / 'data' / split / cls).mkdir(parents=True)
      for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(
            tmp_path / 'data' / split / cls / f'{cls}.{i}.jpg'
        )
  return tmp_path / 'data'


def test_vgg16_features_config_counts_equal_seed002_keras(keras, cats_vs_dogs_small):
  base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(180, 180, 3))
  count = lambda ws: sum(int(np.prod(w.shape)) for w in ws)
  for layer in base.layers[:-4]:  # the seed's fine-tuning freeze
    layer.trainable = False
  head = 5 * 5 * 512 * 256 + 256 + 257  # Flatten, Dense(256), Dropout, Dense(1)
  cfg = _config('vgg16_features')
  cfg.data.source = f'folder:{cats_vs_dogs_small}'
  features, augmented, block5 = [summary.summarize_config(cfg, phase=i)[0] for i in (0, 1, 2)]
  assert (features.trainable, features.non_trainable) == (head, base.count_params())
  assert augmented == features
  assert (block5.trainable, block5.non_trainable) == (
      count(base.trainable_weights) + head,
      count(base.non_trainable_weights),
  )


def test_vgg16_features_workflow_smoke_run(cats_vs_dogs_small, tmp_path, caplog):
  cfg = _config('vgg16_features', 'smoke')
  cfg.model.weights = None
  cfg.data.source = f'folder:{cats_vs_dogs_small}'
  with caplog.at_level('INFO', logger='fineflax'):
    results = train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:2])
  assert results['test_examples'] == 12 and results['step'] == 3
  assert '[features] trains the head on cached features' in caplog.text
  assert (
      '[augmented] trains on the images (no cached features: the training images are '
      'augmented)' in caplog.text
  )


@pytest.mark.parametrize(
    'name',
    [
        'cifar10',
        'cats_vs_dogs',
        'cifar10_discriminative',
        'cifar10_convnext',
        'cifar10_vit',
        'cifar10_efficientnetv2',
    ],
)
def test_tfds_workflow_smoke_run(name, tmp_path):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  cfg = _config(name, 'smoke')
  cfg.model.weights = None  # no ImageNet file here; loading is tested in test_weights.py
  with tfds.testing.mock_data(num_examples=32):
    results = train.train_and_evaluate(cfg, tmp_path, devices=jax.devices()[:2])
  assert results['test_examples'] == 32 and results['step'] == 2 * len(cfg.phases)
  assert (tmp_path / 'samples.png').exists()


def test_folder_workflow_smoke_run(photos, tmp_path):
  cfg = _config('folder', 'smoke')
  cfg.model.weights = None
  cfg.data.source = f'folder:{photos}'
  results = train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:2])
  assert results['step'] == 2 and 'test_accuracy' not in results


def test_imagenet_folder_workflow_smoke_run(cats_vs_dogs_small, tmp_path, caplog):
  """The ILSVRC-style folder, streamed with random-resized crops, both phases."""
  cfg = _config('imagenet_folder', 'smoke')
  cfg.model.weights = None
  cfg.data.source = f'folder:{cats_vs_dogs_small}'
  cfg.data.workers = 0  # threads: the worker processes are tested in test_streaming.py
  with caplog.at_level('INFO', logger='fineflax'):
    results = train.train_and_evaluate(cfg, tmp_path / 'run', devices=jax.devices()[:2])
  assert "data pipeline: stream (config.data.pipeline='stream')" in caplog.text
  assert results['test_examples'] == 12 and results['step'] == 2
  assert (tmp_path / 'run' / 'samples.png').exists()
