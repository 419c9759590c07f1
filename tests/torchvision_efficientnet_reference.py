"""Writes torchvision EfficientNetV2 reference files for tests/test_efficientnet_torchvision.py,
in a process of its own (torchvision after TensorFlow crashes the process:
tests/torchvision_reference.py).

Usage: python -m tests.torchvision_efficientnet_reference OUT_DIR. Writes
efficientnet_v2_s.pth and efficientnet_v2_s.safetensors (random weights; BatchNorm scales
and offsets drawn at random, running means and variances measured: every BatchNorm
matters), for each side in SIDES images{side}.npy (uint8), logits{side}.npy and
features{side}.npy (torchvision's `features` output, NHWC); shapes.json: each variant's
state-dict names and shapes, classifier dropout and each block's stochastic depth (rate,
mode, whether it has the residual add), built on the meta device (nothing allocated);
weights.json:
each EfficientNetV2 weight enum's URL, the sha256 prefix torch hub checks, top-1,
parameter count, transforms (crop and resize sizes, mean, std), the names of its metadata
and the default.
"""

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models import efficientnet
from torchvision.transforms._presets import ImageClassification

from tests.torchvision_reference import enum_entries, normalised, write_files

SIDES = (32, 64)
VARIANTS = ('s', 'm', 'l')


def _transforms(weights) -> dict:
  """ImageClassification's arguments: the enum's, over the class' defaults."""
  defaults = {
      name: p.default
      for name, p in inspect.signature(ImageClassification).parameters.items()
      if p.default is not inspect.Parameter.empty
  }
  kept = ('crop_size', 'resize_size', 'mean', 'std')
  given = weights.transforms.keywords
  return {k: np.atleast_1d(given.get(k, defaults.get(k))).tolist() for k in kept}


def _weights() -> dict:
  return {
      variant: enum_entries(
          getattr(efficientnet, f'EfficientNet_V2_{variant.upper()}_Weights'),
          transforms=_transforms,
      )
      for variant in VARIANTS
  }


def _shapes() -> dict:
  out = {}
  for variant in VARIANTS:
    with torch.device('meta'):
      model = getattr(torchvision.models, f'efficientnet_v2_{variant}')(weights=None)
    blocks = [(n, m) for n, m in model.named_modules() if hasattr(m, 'use_res_connect')]
    out[variant] = {
        'state': {name: list(p.shape) for name, p in model.state_dict().items()},
        'dropout': model.classifier[0].p,
        'stochastic_depth': [
            [n, m.stochastic_depth.p, m.stochastic_depth.mode, m.use_res_connect] for n, m in blocks
        ],
    }
  return out


def _random_batch_norms(model: torch.nn.Module, x: torch.Tensor) -> None:
  """BatchNorm scales and offsets drawn at random, and running statistics measured on `x`
  with them: far from their initial 0 and 1, and such that 50 blocks of random weights
  keep the output a function of the image (with statistics drawn at random it is almost
  a constant, which no parity check could tell from another). `x` is larger and more
  than the images compared: statistics of a few small images make other images' outputs
  grow without bound, and float32 rounding with them."""
  norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for m in norms:
      m.weight.uniform_(0.5, 1.5)
      m.bias.normal_(0, 0.1)
      m.reset_running_stats()
      m.momentum = None  # a plain average over the batch
  for m in model.modules():
    m.train(m in norms)  # stochastic depth and dropout off
  with torch.no_grad():
    model(x)
  model.eval()


def main(out: Path) -> None:
  torch.manual_seed(0)
  model = torchvision.models.efficientnet_v2_s(weights=None)
  rng = np.random.default_rng(2)
  _random_batch_norms(model, normalised(rng.integers(0, 256, (64, 96, 96, 3), dtype=np.uint8)))
  write_files(model, out, 'efficientnet_v2_s', SIDES, rng)
  (out / 'shapes.json').write_text(json.dumps(_shapes()))
  (out / 'weights.json').write_text(json.dumps(_weights()))


if __name__ == '__main__':
  main(Path(sys.argv[1]))
