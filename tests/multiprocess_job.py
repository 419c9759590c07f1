"""What each process of the two-process tests does, and what one process alone does."""

import hashlib
from typing import Any

import jax
import ml_collections
import numpy as np

from fineflax import config as config_lib, data, models, train
from fineflax.distributed import parallel
from fineflax.train import state as state_lib, step as step_lib
from fineflax.train.step import evaluate
from tests import helpers


def run() -> dict:
  """This process's examples (hashed) and the global evaluation of a fixed model."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  cfg.data.max_examples = 37
  cfg = config_lib.validate(cfg)
  dataset = data.load_dataset(cfg.data)
  shares = {
      name: sorted(
          hashlib.sha1(image.tobytes() + bytes([label])).hexdigest()
          for image, label in zip(split.images, split.labels)
      )
      for name, split in dataset.splits.items()
  }
  sizes = {name: split.size for name, split in dataset.splits.items()}
  model = models.build_model(cfg.model, 10, bn_axis_name=parallel.AXIS)
  mesh = parallel.make_mesh(jax.devices()[:4])
  variables = parallel.replicate(state_lib.init_variables(model, (8, 8, 3), seed=0), mesh)
  metrics = evaluate(
      step_lib.make_eval_step(model, mesh), variables, dataset.splits['validation'], 8, mesh
  )
  return {
      'shares': shares,
      'sizes': sizes,
      'metrics': metrics,
      'process_count': jax.process_count(),
  }


def folder_config(photos: str) -> ml_collections.ConfigDict:
  """A small run on an image folder: global batch 8 (4 a process), 3 epochs."""
  return helpers.tiny_config(
      config_lib.phase(name='a', optimizer='adam', learning_rate=1e-3, epochs=3),
      source=f'folder:{photos}',
  )


def train_folder(photos: str, workdir: str) -> dict:
  """This process's share of the train split, and the results of a run trained on it."""
  cfg = config_lib.validate(folder_config(photos))
  train_split = data.load_dataset(cfg.data).splits['train']
  results = train.train_and_evaluate(cfg, workdir)
  return {
      'share': len(train_split),
      'size': train_split.size,
      'largest_share': train_split.largest_share,
      'results': results,
      'process_count': jax.process_count(),
  }


# The edges job: evaluation and per-process shares of a folder, a tfds dataset and a run.

IMAGE = (8, 8, 3)
TINY_TFDS = 'fineflax_tiny_images'  # tfds' name of the class below: snake case of its own
TINY_SPLITS = {'train': (9, 0), 'test': (1, 1)}  # split: (examples, seed)


def digest(image, label) -> str:
  """An example as a string: equal examples give equal strings, whoever read them."""
  return hashlib.sha1(
      np.ascontiguousarray(image, np.uint8).tobytes() + bytes([int(label)])
  ).hexdigest()


def tiny_examples(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The tiny tfds dataset's examples of a split, in generation order: 8x8 RGB images and
  labels 0, 1, 2, 0, ... (NumPy only: the test's reference without TensorFlow)."""
  rng = np.random.default_rng(seed)
  return (rng.integers(0, 256, (n,) + IMAGE, dtype=np.uint8), np.arange(n, dtype=np.int64) % 3)


def tiny_tfds(data_dir: str, prepare: bool) -> None:
  """Registers the tiny tfds dataset (a real one, built offline in `data_dir`).

  tfds.testing.mock_data would not do: its as_dataset ignores the split it is given, so
  every sub-split `tfds.split_for_jax_process` makes yields the same examples, and the
  shares of two processes would be identical rather than disjoint.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  tfds.disable_progress_bar()  # bars drawn over each other would fill the logs of a failure
  if TINY_TFDS not in tfds.list_builders(with_community_datasets=False):
    _register_tiny_tfds(tfds)  # once a process: tfds refuses a second class of one name
  if prepare:
    tfds.builder(TINY_TFDS, data_dir=data_dir).download_and_prepare()


def _register_tiny_tfds(tfds) -> None:
  """Defines (and so registers with tfds) the tiny dataset's builder class."""

  class FineflaxTinyImages(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          supervised_keys=('image', 'label'),
          features=tfds.features.FeaturesDict(
              {
                  'image': tfds.features.Image(shape=IMAGE),
                  'label': tfds.features.ClassLabel(names=['a', 'b', 'c']),
              }
          ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager
      return {name: self._generate_examples(*spec) for name, spec in TINY_SPLITS.items()}

    def _generate_examples(self, n, seed):
      for i, (image, label) in enumerate(zip(*tiny_examples(n, seed))):
        yield i, {'image': image, 'label': int(label)}


def fixed_model() -> tuple[Any, dict]:
  """A 3-class resnet_tiny and its initial variables (seed 0) for 8x8 images."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  model = models.build_model(cfg.model, 3, bn_axis_name=parallel.AXIS)
  return model, state_lib.init_variables(model, IMAGE, seed=0)


def _share(split: data.Split) -> dict:
  """This process's share of a split (its examples as digests) and the split's counts."""
  return {
      'digests': [digest(x, y) for x, y in zip(split.images, split.labels)],
      'size': split.size,
      'largest_share': split.largest_share,
      'image_shape': list(split.images.shape[1:]),
  }


def _shares(dataset: data.Dataset) -> dict:
  return {name: _share(split) for name, split in dataset.splits.items()}


def edges(photos: str, tfds_dir: str, run_dir: str, run_one_dir: str) -> dict:
  """Everything the edges tests check, in one launch of two processes (each launch costs
  seconds of start-up and compilation):

  - `digits`: what `run()` returns (the digits' shares and an exact evaluation);
  - `folder`: the shares of the image folder PHOTOS (7 train images, 1 validation image
    carved out: process 1's share of it is empty), and the evaluation of `fixed_model` on
    both at a global batch of 4;
  - `tfds`: how many times this process prepared the tiny tfds dataset (process 0 alone
    should), the shares of its train split (9 examples), whole, with
    max_examples=5, and with max_examples=1 (process 1 takes none) and its evaluation;
  - `evaluate_run`: the reports of evaluate_run on the test split of RUN_DIR and of
    RUN_ONE_DIR (a copy whose digits are cut to 1 example a split: process 1's share is
    empty).
  Each part is a collective: every process runs them all, in this order.
  """
  from fineflax.data import tfds_source  # pylint: disable=g-import-not-at-top
  from fineflax.inference import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top

  out = {'digits': run(), 'process_count': jax.process_count()}
  model, variables = fixed_model()
  mesh = parallel.make_mesh()
  eval_step = step_lib.make_eval_step(model, mesh)
  variables = parallel.replicate(variables, mesh)

  cfg = config_lib.default_config()
  cfg.data.update(source=f'folder:{photos}', validation_split=0.125)
  dataset = data.load_dataset(config_lib.validate(cfg).data)
  out['folder'] = {
      'shares': _shares(dataset),
      'metrics': {
          name: evaluate(eval_step, variables, split, 4, mesh)
          for name, split in dataset.splits.items()
      },
  }

  # Not prepared yet, in one data_dir: fineflax prepares it on process 0 alone.
  tiny_tfds(tfds_dir, prepare=False)
  prepared = []
  original = tfds_source._prepare  # pylint: disable=protected-access
  tfds_source._prepare = lambda *a: prepared.append(1) or original(*a)  # pylint: disable=protected-access
  cfg = config_lib.default_config()
  cfg.data.update(
      source=f'tfds:{TINY_TFDS}',
      data_dir=tfds_dir,
      train_split='train',
      val_split=None,
      test_split=None,
  )
  out['tfds'] = {'whole': _shares(data.load_dataset(config_lib.validate(cfg).data))['train']}
  out['tfds']['prepared_here'] = len(prepared)
  cfg.data.max_examples = 5  # odd: the processes' shares cannot be equal
  out['tfds']['max5'] = _shares(data.load_dataset(config_lib.validate(cfg).data))['train']
  cfg.data.max_examples = 1
  split = data.load_dataset(config_lib.validate(cfg).data).splits['train']
  out['tfds']['max1'] = dict(_share(split), metrics=evaluate(eval_step, variables, split, 4, mesh))

  keep = ('examples', 'loss', 'accuracy', 'step')
  out['evaluate_run'] = {
      name: {
          k: v for k, v in evaluate_lib.evaluate_run(workdir, 'test', 'latest').items() if k in keep
      }
      for name, workdir in (('run', run_dir), ('run_one', run_one_dir))
  }
  return out
