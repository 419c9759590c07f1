"""Writes torchvision reference files for tests/test_weights.py, in a process of its own:
importing torchvision after TensorFlow (which the tfds tests load) crashes the process.

Usage: python -m tests.torchvision_reference OUT_DIR. Writes resnet50.pth,
resnet50.safetensors (random weights, BN statistics randomised), images.npy (uint8),
logits.npy (torchvision's output for them) and resnet101.safetensors. The other reference
processes share `enum_entries` and `normalised`.
"""

import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.hub
import torchvision
from safetensors.torch import save_file

IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def enum_entries(enum: Any, **extra: Callable[[Any], Any]) -> dict:
  """A weight enum's default and, for each member, its URL, the sha256 prefix torch hub
  checks (its HASH_REGEX on the file name), ImageNet top-1, parameter count, the names of
  its metadata (where a full checksum would be) and `extra`'s fields (functions of it)."""
  return {
      'default': enum.DEFAULT.name,
      'weights': {
          w.name: {
              'url': w.url,
              'acc1': w.meta['_metrics']['ImageNet-1K']['acc@1'],
              'prefix': torch.hub.HASH_REGEX.search(w.url.rsplit('/', 1)[1]).group(1),
              'num_params': w.meta['num_params'],
              'meta': sorted(w.meta),
              **{key: fn(w) for key, fn in extra.items()},
          }
          for w in enum
      },
  }


def normalised(images: np.ndarray) -> torch.Tensor:
  """uint8 NHWC images as torchvision's models take them: [0, 1], ImageNet mean / std, NCHW."""
  x = (images / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  return torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32)


def write_files(model: torch.nn.Module, out: Path, name: str, sides: Any, rng: Any) -> None:
  """`model`'s state dict as {name}.pth and {name}.safetensors; for each side, two random
  images{side}.npy (uint8), logits{side}.npy and features{side}.npy (the `features`
  output, NHWC)."""
  torch.save(model.state_dict(), out / f'{name}.pth')
  save_file(model.state_dict(), str(out / f'{name}.safetensors'))
  for side in sides:
    images = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    x = normalised(images)
    with torch.no_grad():
      np.save(out / f'logits{side}.npy', model(x).numpy())
      np.save(out / f'features{side}.npy', model.features(x).numpy().transpose(0, 2, 3, 1))
    np.save(out / f'images{side}.npy', images)


def main(out: Path) -> None:
  torch.manual_seed(0)
  model = torchvision.models.resnet50(weights=None).eval()
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_(0, 0.1)
        module.running_mean.normal_(0, 0.1)
        module.running_var.uniform_(0.5, 1.5)
  torch.save(model.state_dict(), out / 'resnet50.pth')
  save_file(model.state_dict(), str(out / 'resnet50.safetensors'))
  images = np.random.default_rng(2).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
  with torch.no_grad():
    logits = model(normalised(images)).numpy()
  np.save(out / 'images.npy', images)
  np.save(out / 'logits.npy', logits)
  save_file(
      torchvision.models.resnet101(weights=None).state_dict(), str(out / 'resnet101.safetensors')
  )


if __name__ == '__main__':
  main(Path(sys.argv[1]))
