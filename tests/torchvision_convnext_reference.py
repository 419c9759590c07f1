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
import torch.hub
import torchvision
from safetensors.torch import save_file
from torchvision.models import convnext

SIDES = (32, 64)
VARIANTS = ('tiny', 'small', 'base', 'large')


def _weights() -> dict:
  out = {}
  for variant in VARIANTS:
    enum = getattr(convnext, f'ConvNeXt_{variant.capitalize()}_Weights')
    out[variant] = {
        'default': enum.DEFAULT.name,
        'weights': {
            w.name: {
                'url': w.url,
                'acc1': w.meta['_metrics']['ImageNet-1K']['acc@1'],
                'prefix': torch.hub.HASH_REGEX.search(w.url.rsplit('/', 1)[1]).group(1),
                'num_params': w.meta['num_params'],
                'meta': sorted(w.meta),
            }
            for w in enum
        },
    }
  return out


def main(out: Path) -> None:
  torch.manual_seed(0)
  model = torchvision.models.convnext_tiny(weights=None).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith('layer_scale') or (p.ndim == 1 and name.endswith('weight')):
        p.uniform_(0.5, 1.5)  # layer scales start at 1e-6: the blocks would not show
      elif p.ndim == 1:
        p.normal_(0, 0.1)
  torch.save(model.state_dict(), out / 'convnext_tiny.pth')
  save_file(model.state_dict(), str(out / 'convnext_tiny.safetensors'))
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  rng = np.random.default_rng(2)
  for side in SIDES:
    images = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    x = torch.tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
    with torch.no_grad():
      np.save(out / f'logits{side}.npy', model(x).numpy())
      np.save(out / f'features{side}.npy', model.features(x).numpy().transpose(0, 2, 3, 1))
    np.save(out / f'images{side}.npy', images)
  (out / 'weights.json').write_text(json.dumps(_weights()))


if __name__ == '__main__':
  main(Path(sys.argv[1]))
