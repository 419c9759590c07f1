"""Writes torchvision reference files for tests/test_weights.py, in a process of its own:
importing torchvision after TensorFlow (which the tfds tests load) crashes the process.

Usage: python -m tests.torchvision_reference OUT_DIR. Writes resnet50.pth,
resnet50.safetensors (random weights, BN statistics randomised), images.npy (uint8),
logits.npy (torchvision's output for them) and resnet101.safetensors.
"""

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file


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
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  x = torch.tensor(((images / 255.0 - mean) / std).transpose(0, 3, 1, 2), dtype=torch.float32)
  with torch.no_grad():
    logits = model(x).numpy()
  np.save(out / 'images.npy', images)
  np.save(out / 'logits.npy', logits)
  save_file(
      torchvision.models.resnet101(weights=None).state_dict(), str(out / 'resnet101.safetensors')
  )


if __name__ == '__main__':
  main(Path(sys.argv[1]))
