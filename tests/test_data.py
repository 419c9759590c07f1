"""Data sources (image folders, tensorflow-datasets via mock_data, digits), exact
evaluation on any number of devices, device-resident splits."""

import socket

import jax
import numpy as np
import pytest
from PIL import Image

from fineflax import config as config_lib, data, models
from fineflax.data import feed, tfds_source
from fineflax.distributed import parallel
from fineflax.errors import ConfigError, DataError
from fineflax.train import state as state_lib, step as step_lib
from fineflax.train.step import evaluate


def _data_config(source, **kw):
  cfg = config_lib.default_config()
  cfg.data.source = source
  cfg.data.update(kw)
  return config_lib.validate(cfg).data


@pytest.fixture
def photo_folder(tmp_path):
  """Two classes of photos as users have them: JPEG, PNG, grey, RGBA, BMP, one truncated
  JPEG and a stray text file."""
  rng = np.random.default_rng(0)
  root = tmp_path / 'photos'
  for cls, n in (('damaged', 7), ('undamaged', 5)):
    (root / cls).mkdir(parents=True)
    for i in range(n):
      size = (30 + i, 20 + 2 * i)
      pixels = rng.integers(0, 256, size[::-1] + (3,), dtype=np.uint8)
      image = Image.fromarray(pixels)
      kind = i % 4
      if kind == 0:
        image.save(root / cls / f'{i}.jpg')
      elif kind == 1:
        image.convert('L').save(root / cls / f'{i}.png')
      elif kind == 2:
        image.convert('RGBA').save(root / cls / f'{i}.png')
      else:
        image.save(root / cls / f'{i}.bmp')
  good = root / 'damaged' / '0.jpg'
  (root / 'damaged' / 'broken.jpg').write_bytes(good.read_bytes()[:200])  # truncated
  (root / 'undamaged' / 'notes.txt').write_text('not an image')
  return root


def test_folder_source(photo_folder, caplog):
  cfg = _data_config(f'folder:{photo_folder}', load_size=16, validation_split=0.25, test_split=None)
  info = data.dataset_info(cfg)
  assert info.class_names == ('damaged', 'undamaged') and info.image_shape == (16, 16, 3)
  with caplog.at_level('INFO', logger='fineflax.data'):
    dataset = data.load_dataset(cfg)
  train, val = dataset.splits['train'], dataset.splits['validation']
  assert train.images.shape[1:] == (16, 16, 3) and train.images.dtype == np.uint8
  # 13 image files listed, the truncated one skipped with a warning naming it; the sizes
  # count the 12 read, the skipped file apart.
  assert len(train) + len(val) == 12 and train.size + val.size == 12
  assert train.skipped + val.skipped == 1
  assert 'skipped 1 unreadable image' in caplog.text and 'broken.jpg' in caplog.text
  assert '1 unreadable file(s) skipped' in caplog.text
  assert 'ignored 1 files that are no images' in caplog.text and 'notes.txt' in caplog.text
  assert "split 'train'" in caplog.text and 'damaged: ' in caplog.text
  again = data.load_dataset(cfg).splits['validation']
  np.testing.assert_array_equal(again.images, val.images)  # the carve is reproducible
  other = data.load_dataset(
      _data_config(
          f'folder:{photo_folder}',
          load_size=16,
          validation_split=0.25,
          split_seed=7,
          test_split=None,
      )
  ).splits['validation']
  assert not np.array_equal(other.labels, val.labels) or not np.array_equal(
      other.images, val.images
  )


def test_folder_errors(photo_folder, tmp_path):
  # Data that cannot be used as it is: DataError; a config key naming what is absent:
  # ConfigError.
  with pytest.raises(DataError, match='images of several sizes'):
    data.load_dataset(_data_config(f'folder:{photo_folder}', test_split=None, val_split=None))
  with pytest.raises(
      ConfigError,
      match="config.data.val_split='validation': .* has no folder "
      "'validation' and config.data.validation_split is 0",
  ):
    data.load_dataset(_data_config(f'folder:{photo_folder}', load_size=8))
  # A test folder is used when there is one: without, the dataset says it is absent.
  carved = data.load_dataset(
      _data_config(f'folder:{photo_folder}', load_size=8, validation_split=0.2)
  )
  assert sorted(carved.splits) == ['train', 'validation'] and carved.absent == ('test',)
  (photo_folder / 'empty').mkdir()
  with pytest.raises(DataError, match=f'class folder {photo_folder / "empty"} has no image'):
    data.load_dataset(
        _data_config(f'folder:{photo_folder}', load_size=8, test_split=None, val_split=None)
    )
  (tmp_path / 'nothing').mkdir()
  with pytest.raises(DataError, match='has no class folders'):
    data.dataset_info(_data_config(f'folder:{tmp_path / "nothing"}'))


def test_folder_per_split_layout(tmp_path):
  for split in ('train', 'validation', 'test'):
    for cls in ('cat', 'dog'):
      (tmp_path / split / cls).mkdir(parents=True)
      Image.new('RGB', (8, 8), 'red' if cls == 'cat' else 'blue').save(
          tmp_path / split / cls / 'a.png'
      )
  dataset = data.load_dataset(_data_config(f'folder:{tmp_path}'))
  assert set(dataset.splits) == {'train', 'validation', 'test'}
  assert list(dataset.splits['test'].labels) == [0, 1]
  assert tuple(dataset.splits['test'].images[0, 0, 0]) == (255, 0, 0)


def test_tfds_cifar10_and_cats_vs_dogs_through_mock_data():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  with tfds.testing.mock_data(num_examples=12):
    cfg = _data_config(
        'tfds:cifar10', train_split='train[:40%]', val_split='train[40%:50%]', test_split='test'
    )
    dataset = data.load_dataset(cfg)
    assert dataset.info.num_classes == 10
    for split in dataset.splits.values():
      assert split.images.shape == (12, 32, 32, 3) and split.images.dtype == np.uint8
      assert split.labels.dtype == np.int32 and split.labels.max() < 10
    with pytest.raises(ConfigError, match='its images vary in size; set config.data.load_size'):
      data.dataset_info(_data_config('tfds:cats_vs_dogs'))
    cfg = _data_config(
        'tfds:cats_vs_dogs',
        load_size=20,
        train_split='train[:40%]',
        val_split='train[40%:50%]',
        test_split='train[50%:60%]',
    )
    dataset = data.load_dataset(cfg)
    assert dataset.info.class_names == ('cat', 'dog')
    assert dataset.splits['train[50%:60%]'].images.shape == (12, 20, 20, 3)


def _probe(monkeypatch, answer):
  """Replaces the data source's network probe: every URL gets `answer` (None: the host
  answers; a string: why not); returns the URLs asked about."""
  asked = []

  def reachable(url):
    asked.append(url)
    return answer

  monkeypatch.setattr(tfds_source, '_reachable', reachable)
  return asked


def test_unprepared_tfds_dataset_offline_fails_naming_the_files(tmp_path, monkeypatch):
  """Whether this machine has network or not: the probe says the host is unreachable."""
  asked = _probe(monkeypatch, 'www.cs.toronto.edu: [Errno 101] Network is unreachable')
  cfg = _data_config(
      'tfds:cifar10', data_dir=str(tmp_path / 'tfds'), manual_dir=str(tmp_path / 'manual')
  )
  with pytest.raises(DataError) as error:
    data.load_dataset(cfg)
  url = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
  assert asked == [url]
  message = str(error.value)
  assert (
      f"config.data.source='tfds:cifar10': the dataset is not prepared in {tmp_path / 'tfds'}"
      in message
  )
  assert '(no network: www.cs.toronto.edu: [Errno 101] Network is unreachable)' in message
  assert f'  cifar-10-binary.tar.gz  from {url}  (sha256 ' in message
  assert f'config.data.manual_dir (now {tmp_path / "manual"})' in message
  assert 'manual download instructions' not in message


@pytest.mark.parametrize('manual_dir', [None, 'empty'])
def test_a_manual_tfds_dataset_needs_its_files_even_when_the_network_answers(
    tmp_path, monkeypatch, manual_dir
):
  """imagenet2012 cannot be downloaded by tfds (MANUAL_DOWNLOAD_INSTRUCTIONS): with the
  hosts reachable, and without its files in manual_dir (none set, or an empty folder), the
  error gives tfds' instructions and names the files, and no download starts."""
  asked = _probe(monkeypatch, None)
  if manual_dir:
    manual_dir = tmp_path / manual_dir
    manual_dir.mkdir()
  cfg = _data_config(
      'tfds:imagenet2012',
      data_dir=str(tmp_path / 'tfds'),
      load_size=32,
      manual_dir=manual_dir and str(manual_dir),
      val_split='validation',
      test_split=None,
  )
  with pytest.raises(DataError) as error:
    data.load_dataset(cfg)
  message = str(error.value)
  assert "config.data.source='tfds:imagenet2012': the dataset is not prepared in" in message
  assert 'no network' not in message
  assert 'Its manual download instructions:' in message
  assert 'https://image-net.org/download-images' in message
  for name in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'):
    assert name in message
  assert f'config.data.manual_dir (now {manual_dir})' in message
  assert not (tmp_path / 'tfds' / 'downloads').exists()
  assert asked == []  # reachability does not matter for a manual dataset


def test_the_reachability_probe_on_local_sockets():
  with socket.socket() as listening:
    listening.bind(('127.0.0.1', 0))
    listening.listen(1)
    port = listening.getsockname()[1]
    assert tfds_source._reachable(f'http://127.0.0.1:{port}/a.tar.gz') is None
  why = tfds_source._reachable(f'https://127.0.0.1:{port}/a.tar.gz')  # closed now
  assert why.startswith('127.0.0.1: ') and 'refused' in why


def _eval_setup(devices, n=37):
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  cfg.model.head.update(dropout=0.5, batchnorm=True)  # both in inference mode to evaluate
  model = models.build_model(cfg.model, 3, bn_axis_name=parallel.AXIS)
  variables = state_lib.init_variables(model, (16, 16, 3), seed=0)
  rng = np.random.default_rng(5)
  images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
  labels = rng.integers(0, 3, n).astype(np.int32)
  # Padding rows repeat example 0: labelled as the model predicts it, a padding row that
  # counted would add to the correct ones as well as to the loss.
  labels[0] = int(np.argmax(model.apply(variables, images[:1])))
  split = data.Split(images, labels)
  mesh = parallel.make_mesh(devices)
  return model, parallel.replicate(variables, mesh), split, mesh


@pytest.mark.parametrize('resident', [False, True])
def test_evaluation_is_exact_on_one_and_eight_devices(resident):
  """37 examples in batches of 16: two full ones and one of 5 padded to 16 (on eight
  devices, 2 rows each: the padding spreads over devices). Each example counts once: the
  loss and accuracy are the mean softmax cross-entropy and argmax accuracy of the 37,
  computed here with NumPy from the model's inference-mode logits."""
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    model, variables, split, mesh = _eval_setup(devices)
    placed = feed.place(split, mesh) if resident else None
    eval_step = step_lib.make_eval_step(model, mesh)
    results.append(evaluate(eval_step, variables, split, 16, mesh, placed))
  logits = np.asarray(model.apply(jax.device_get(variables), split.images), np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  loss = -log_p[np.arange(37), split.labels]
  correct = logits.argmax(-1) == split.labels
  assert 0 < correct.sum() < 37  # an accuracy that a miscount would move
  for got in results:
    assert got['count'] == 37
    np.testing.assert_allclose(got['loss'], loss.mean(), rtol=1e-5)
    assert got['accuracy'] == pytest.approx(correct.sum() / 37, rel=1e-9)


def test_resident_splits_respect_the_limit():
  split = data.Split(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int32))
  mesh = parallel.make_mesh(jax.devices()[:1])
  assert feed.place_splits({'train': split, 'test': None}, mesh, True, 1)['train'] is not None
  assert feed.place_splits({'train': split}, mesh, True, 0)['train'] is None
  assert feed.place_splits({'train': split}, mesh, False, 100)['train'] is None
