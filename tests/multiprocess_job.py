"""What each process of the two-process test does, and what one process alone does."""

import hashlib

import jax

from fineflax import config as config_lib, data, models, parallel, state as state_lib
from fineflax import step as step_lib
from fineflax.evaluate import evaluate


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
