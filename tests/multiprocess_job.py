"""What each process of the two-process tests does, and what one process alone does."""

import hashlib

import jax
import ml_collections

from fineflax import config as config_lib, data, models
from fineflax.distributed import parallel
from fineflax.train import state as state_lib
from fineflax import train
from fineflax.train import step as step_lib
from fineflax.train.step import evaluate


def run() -> dict:
  """This process's examples (hashed) and the global evaluation of a fixed model."""
  cfg = config_lib.default_config()
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.preprocessing = 'tf'
  cfg.data.max_examples = 37
  cfg = config_lib.validate(cfg)
  dataset = data.load_dataset(cfg.data)
  shares = {name: sorted(hashlib.sha1(image.tobytes() + bytes([label])).hexdigest()
                         for image, label in zip(split.images, split.labels))
            for name, split in dataset.splits.items()}
  sizes = {name: split.size for name, split in dataset.splits.items()}
  model = models.build_model(cfg.model, 10, bn_axis_name=parallel.AXIS)
  mesh = parallel.make_mesh(jax.devices()[:4])
  variables = parallel.replicate(state_lib.init_variables(model, (8, 8, 3), seed=0), mesh)
  metrics = evaluate(step_lib.make_eval_step(model, mesh), variables,
                     dataset.splits['validation'], 8, mesh)
  return {'shares': shares, 'sizes': sizes, 'metrics': metrics,
          'process_count': jax.process_count()}


def folder_config(photos: str) -> ml_collections.ConfigDict:
  """A small run on an image folder: global batch 8 (4 a process), 3 epochs."""
  cfg = config_lib.default_config()
  cfg.batch_size = 8
  cfg.data.source = f'folder:{photos}'
  cfg.model.backbone = 'resnet_tiny'
  cfg.model.image_size = 16
  cfg.model.preprocessing = 'tf'
  cfg.phases = (config_lib.phase(name='a', optimizer='adam', learning_rate=1e-3, epochs=3),)
  return cfg


def train_folder(photos: str, workdir: str) -> dict:
  """This process's share of the train split, and the results of a run trained on it."""
  cfg = config_lib.validate(folder_config(photos))
  train_split = data.load_dataset(cfg.data).splits['train']
  results = train.train_and_evaluate(cfg, workdir)
  return {'share': len(train_split), 'size': train_split.size,
          'largest_share': train_split.largest_share, 'results': results,
          'process_count': jax.process_count()}
