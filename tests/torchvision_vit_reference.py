"""Writes torchvision ViT reference files for tests/test_vit.py, in a process of its own
(torchvision after TensorFlow crashes the process: tests/torchvision_reference.py).

Usage: python -m tests.torchvision_vit_reference OUT_DIR. Writes vit_b_32.pth and
vit_b_32.safetensors (random weights for SIDE; class token, position embedding, head, LayerNorm
scales and offsets drawn away from their initial values), and, for each side in SIDES,
images{side}.npy (uint8), logits{side}.npy and features{side}.npy (the class token after
`encoder.ln`) of the model built for that side from the same file, its position embedding
resized by torchvision's `interpolate_embeddings`; shapes.json: every variant's parameter
names and shapes (built on the meta device: nothing allocated) and the parameter count of
each encoder block; weights.json: each ViT weight enum's URL, sha256 prefix, top-1,
parameter count, minimum size and the names of its metadata, and the default.
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file
from torchvision.models import vision_transformer as vt

from tests.torchvision_reference import enum_entries, normalised

SIDES = (96, 160)  # ViT-B/32: grids of 3x3 (the file's) and 5x5 patches (resized)
VARIANTS = ('b_16', 'b_32', 'l_16', 'l_32')


def _weights() -> dict:
  return {
      variant: enum_entries(
          getattr(vt, f'ViT_{variant.upper()}_Weights'),
          min_size=lambda w: list(w.meta['min_size']),
      )
      for variant in VARIANTS
  }


def _shapes() -> dict:
  out = {}
  for variant in VARIANTS:
    with torch.device('meta'):
      model = getattr(torchvision.models, f'vit_{variant}')(weights=None)
    out[variant] = {
        'params': {name: list(p.shape) for name, p in model.state_dict().items()},
        'block_params': sum(p.numel() for p in model.encoder.layers[0].parameters()),
    }
  return out


def main(out: Path) -> None:
  torch.manual_seed(0)
  model = torchvision.models.vit_b_32(weights=None, image_size=SIDES[0]).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name in ('class_token', 'encoder.pos_embedding') or name.endswith('bias'):
        p.normal_(0, 0.1)
      elif name == 'heads.head.weight':  # zeros at init: the logits would be the bias
        p.normal_(0, 0.05)
      elif p.ndim == 1:
        p.uniform_(0.5, 1.5)
  state = model.state_dict()
  torch.save(state, out / 'vit_b_32.pth')
  save_file(state, str(out / 'vit_b_32.safetensors'))
  rng = np.random.default_rng(2)
  for side in SIDES:
    sized = torchvision.models.vit_b_32(weights=None, image_size=side).eval()
    sized.load_state_dict(vt.interpolate_embeddings(side, 32, state))
    images = rng.integers(0, 256, (2, side, side, 3), dtype=np.uint8)
    x = normalised(images)
    with torch.no_grad():
      np.save(out / f'logits{side}.npy', sized(x).numpy())
      tokens = sized._process_input(x)  # pylint: disable=protected-access
      tokens = torch.cat([sized.class_token.expand(x.shape[0], -1, -1), tokens], dim=1)
      np.save(out / f'features{side}.npy', sized.encoder(tokens)[:, 0].numpy())
    np.save(out / f'images{side}.npy', images)
  (out / 'shapes.json').write_text(json.dumps(_shapes()))
  (out / 'weights.json').write_text(json.dumps(_weights()))


if __name__ == '__main__':
  main(Path(sys.argv[1]))
