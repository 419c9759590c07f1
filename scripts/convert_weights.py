"""Converts a weight file into an Orbax checkpoint of fineflax's variables tree.

    python scripts/convert_weights.py --backbone resnet50 --weights imagenet --out ~/r50
    python scripts/convert_weights.py --backbone resnet50_torchvision \
        --weights resnet50-11ad3fa6.pth --include_top --out ~/r50tv

The checkpoint holds {'params': {'backbone': ..., 'head': ...}, 'batch_stats': ...} as
fineflax names them (Keras layer names); `config.model.weights = '~/r50'` loads it.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp
from absl import app, flags

from fineflax import config as config_lib, models, weights
from fineflax.run import reporting
from fineflax.train import state as state_lib

_BACKBONE = flags.DEFINE_enum('backbone', None, sorted(models.BACKBONES), 'Backbone name.')
_WEIGHTS = flags.DEFINE_string('weights', None, 'A file path or a weights name (imagenet, ...).')
_INCLUDE_TOP = flags.DEFINE_bool('include_top', False, "Keep Keras' ImageNet classifier.")
_OUT = flags.DEFINE_string('out', None, 'Directory of the Orbax checkpoint to write.')


def convert(
    backbone: str, weights_spec: str, out: str, include_top: bool = False
) -> weights.LoadReport:
  """Writes the variables of `backbone` with `weights_spec` loaded to `out`."""
  model_config = config_lib.default_config().model
  model_config.update(backbone=backbone, weights=weights_spec, include_top=include_top)
  model = models.build_model(model_config, 1000 if include_top else 1)
  size = models.BACKBONES[backbone].input_size
  variables = state_lib.init_variables(model, (size, size, 3), seed=0)
  variables, report = weights.load_pretrained(model_config, model, variables)
  if not include_top:  # the placeholder head is no part of the file
    for collection in variables.values():
      collection.pop('head', None)
  with ocp.StandardCheckpointer() as checkpointer:  # leaving the block waits for the write
    checkpointer.save(os.path.abspath(os.path.expanduser(out)), variables)
  return report


def main(argv: list[str]) -> None:
  """Converts and prints what was loaded."""
  del argv
  reporting.setup_logging()
  report = convert(_BACKBONE.value, _WEIGHTS.value, _OUT.value, _INCLUDE_TOP.value)
  print(report.text())
  print(f'wrote {_OUT.value}')


if __name__ == '__main__':
  flags.mark_flags_as_required(['backbone', 'weights', 'out'])
  app.run(main)
