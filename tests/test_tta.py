"""Test-time augmentation (`fineflax.inference.tta`): the views are torchvision's
FiveCrop / TenCrop and the mirror, and evaluate / predict average the model's logits over
them, every example counted once.

The run-level tests read conftest's `demo_run` (the demo smoke config: resnet_tiny on 8x8
digits upsampled to 32), evaluated on a copy in a tmp folder; the reference logits come
from `model.apply` on the views cut here with NumPy.
"""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fineflax import data
from fineflax.data import augment as augmentation
from fineflax.errors import ConfigError
from fineflax.inference import evaluate, predict, tta
from fineflax.run import restore

# The same images through another batch layout (float32 rounding only).
LOGIT_ATOL = 2e-5


def test_views_are_torchvision_s_five_and_ten_crops():
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.transforms import functional as tf  # pylint: disable=g-import-not-at-top

  assert tta.views('5crop', 224).side == 256  # ImageNet's 224 of 256
  where = tta.views('10crop', 32)
  assert where.side == 37 and where.size == 32 and len(where.boxes) == 10
  rng = np.random.default_rng(0)
  source = rng.uniform(0, 255, (2, 37, 37, 3)).astype(np.float32)
  got = np.asarray(tta.view_images(jnp.asarray(source), where))
  assert got.shape == (10, 2, 32, 32, 3)
  # torchvision on (N, C, H, W): its crops in its order, the mirrored ones last.
  expected = tf.ten_crop(torch.from_numpy(source.transpose(0, 3, 1, 2)), [32, 32])
  np.testing.assert_array_equal(got, np.stack([t.numpy().transpose(0, 2, 3, 1) for t in expected]))
  # The centre crop by hand: torchvision rounds (37 - 32) / 2 = 2.5 to 2.
  np.testing.assert_array_equal(got[4], source[:, 2:34, 2:34])
  five = np.asarray(tta.view_images(jnp.asarray(source), tta.views('5crop', 32)))
  np.testing.assert_array_equal(five, got[:5])
  flip = tta.views('flip', 32)
  np.testing.assert_array_equal(
      np.asarray(tta.view_images(jnp.asarray(source[:, :32, :32]), flip)),
      np.stack([source[:, :32, :32], source[:, :32, :32][:, :, ::-1]]),
  )


def test_an_unknown_mode_is_one_line():
  with pytest.raises(ConfigError) as error:
    tta.check_mode('hflip')
  assert str(error.value) == "--tta 'hflip': expected one of none, flip, 5crop, 10crop"


@pytest.fixture(scope='module')
def run_copy(demo_run, tmp_path_factory):
  return shutil.copytree(demo_run, tmp_path_factory.mktemp('tta') / 'run')


@pytest.fixture(scope='module')
def latest(run_copy):
  return restore.load_run(run_copy, 'latest')


@pytest.fixture(scope='module')
def test_split(latest):
  return data.load_dataset(latest.config.data, ['test_split']).splits[latest.config.data.test_split]


def _apply(run, images):
  return np.asarray(run.model.apply(run.variables, jnp.asarray(images), train=False), np.float64)


def _prepared(run, images, side):
  augment = data.augment_from_config(run.config.data)
  return np.asarray(augmentation.prepare(jnp.asarray(images), None, augment, side, train=False))


@pytest.mark.slow
def test_flip_averages_the_image_and_its_mirror_each_example_once(run_copy, latest, test_split):
  """On the eight devices, 24 a batch: the 32 test examples end in a batch two thirds
  padding, and each is still counted once."""
  assert jax.device_count() == 8
  report = evaluate.evaluate_run(run_copy, 'test', 'latest', batch_size=24, tta='flip')
  assert report['examples'] == 32 and report['tta'] == 'flip'
  assert report['files']['json'].endswith('eval/test-latest-flip.json')
  saved = np.load(report['files']['predictions'])
  x = _prepared(latest, test_split.images, latest.model.image_size)
  expected = (_apply(latest, x) + _apply(latest, x[:, :, ::-1])) / 2
  np.testing.assert_allclose(saved['logits'], expected, atol=LOGIT_ATOL, rtol=0)
  np.testing.assert_array_equal(saved['labels'], test_split.labels)
  # Not the plain logits: the mirror changes them.
  assert np.abs(_apply(latest, x) - expected).max() > 100 * LOGIT_ATOL
  correct = np.argmax(expected, -1) == test_split.labels
  assert report['accuracy'] == pytest.approx(correct.mean(), abs=1e-12)


@pytest.mark.slow
def test_ten_crops_average_numpy_crops_through_the_model(run_copy, latest, test_split):
  report = evaluate.evaluate_run(
      run_copy, 'test', 'latest', batch_size=5, tta='10crop', devices=jax.devices()[:1]
  )
  assert report['examples'] == 32
  saved = np.load(report['files']['predictions'])
  source = _prepared(latest, test_split.images, 37)  # round(32 / 0.875)
  corners = [(0, 0), (0, 5), (5, 0), (5, 5), (2, 2)]
  # TenCrop: the five crops of the image and of its mirror (whose centre crop, 37 - 32
  # being odd, is not the mirror of the image's).
  crops = [
      image[:, t : t + 32, x : x + 32] for image in (source, source[:, :, ::-1]) for t, x in corners
  ]
  expected = np.mean([_apply(latest, c) for c in crops], axis=0)
  np.testing.assert_allclose(saved['logits'], expected, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_predict_with_flip(run_copy, latest, test_split, tmp_path):
  paths = []
  for i, image in enumerate(test_split.images[:3]):
    paths.append(str(tmp_path / f'{i}.png'))
    Image.fromarray(image).save(paths[-1])
  ranked = predict.predict_run_files(run_copy, paths, k=10, checkpoint='latest', tta='flip')
  x = _prepared(latest, test_split.images[:3], latest.model.image_size)
  logits = (_apply(latest, x) + _apply(latest, x[:, :, ::-1])) / 2
  expected = np.exp(logits - logits.max(-1, keepdims=True))
  expected /= expected.sum(-1, keepdims=True)
  for row, want in zip(ranked, expected):
    got = np.array([p for _, p in sorted(row, key=lambda entry: int(entry[0]))])
    np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ConfigError, match="--tta 'mirror': expected one of"):
    predict.predict_run_files(run_copy, paths, tta='mirror')
