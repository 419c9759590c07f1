"""Writes torchvision ConvNeXt reference files for tests/test_convnext.py, in a process of
its own (torchvision after TensorFlow crashes the process: tests/torchvision_reference.py).

Usage: python -m tests.torchvision_convnext_reference OUT_DIR. Writes convnext_tiny.pth and
convnext_tiny.safetensors (random weights; layer scales, LayerNorm scales and offsets
randomised so that every block matters), for each side in SIDES images{side}.npy (uint8),
logits{side}.npy and features{side}.npy (torchvision's `features` output, NHWC), and
weights.json: each ConvNeXt weight enum's URL, the sha256 prefix torch hub checks, top-1,
parameter count, the names of its metadata and the default.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.models import convnext

from tests.torchvision_reference import enum_entries, write_files

SIDES = (32, 64)
VARIANTS = ('tiny', 'small', 'base', 'large')


def _weights() -> dict:
  return {
      variant: enum_entries(getattr(convnext, f'ConvNeXt_{variant.capitalize()}_Weights'))
      for variant in VARIANTS
  }


def main(out: Path) -> None:
  torch.manual_seed(0)
  model = torchvision.models.convnext_tiny(weights=None).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('layer_scale') or (p.ndim == 1 and name.endswith('weight')):
        p.uniform_(0.5, 1.5)  # layer scales start at 1e-6: the blocks would not show
      elif p.ndim == 1:
        p.normal_(0, 0.1)
  write_files(model, out, 'convnext_tiny', SIDES, np.random.default_rng(2))
  (out / 'weights.json').write_text(json.dumps(_weights()))


if __name__ == '__main__':
  main(Path(sys.argv[1]))
