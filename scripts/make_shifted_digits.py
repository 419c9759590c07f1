r"""Writes the harder offline task of docs/recipes.md: scikit-learn's digits as an image
folder, few-shot and under a distribution shift.

    python scripts/make_shifted_digits.py /tmp/shifted_digits
    python -m fineflax.train --config configs/demo.py --workdir runs/shifted \
        --config.data.source=folder:/tmp/shifted_digits

OUT/train/<digit>/ holds the first `--per-class` training images of each digit of the
demo's split (fineflax.data.digits), OUT/validation/ the demo's validation split as it
is, and OUT/test/ the demo's test split shifted: each image rotated by an angle drawn
uniformly in +-`--degrees` and given Gaussian noise of standard deviation `--noise` grey
levels (of 255), with a fixed seed. The model chooses what it can on clean validation
images and is tested on shifted ones, where WiSE-FT claims its largest gains.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
from PIL import Image

from fineflax.data import digits

SEED = 0


def _shifted(
    image: np.ndarray, rng: np.random.Generator, degrees: float, noise: float
) -> np.ndarray:
  angle = rng.uniform(-degrees, degrees)
  turned = np.asarray(Image.fromarray(image).rotate(angle, resample=Image.BILINEAR))
  noisy = turned.astype(np.float64) + rng.normal(0.0, noise, turned.shape[:2])[..., None]
  return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def write(
    out: Path, per_class: int, degrees: float, noise: float, kept: range = range(10)
) -> dict[str, int]:
  """Writes the folder of the digits in `kept` (`per_class` 0: every training image);
  returns the number of images of each split."""
  dataset = digits.load('digits', ml_collections.ConfigDict({'max_examples': None}))
  rng = np.random.default_rng(SEED)
  counts = {}
  for split in ('train', 'validation', 'test'):
    images, labels = dataset.splits[split].images, dataset.splits[split].labels
    seen = np.zeros(10, int)
    for i, (image, label) in enumerate(zip(images, labels)):
      if label not in kept or (split == 'train' and per_class and seen[label] >= per_class):
        continue
      seen[label] += 1
      if split == 'test':
        image = _shifted(image, rng, degrees, noise)
      folder = out / split / str(label)
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(image).save(folder / f'{i:04d}.png')
    counts[split] = int(seen.sum())
  return counts


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('out', type=Path, help='the folder to write (must not exist)')
  parser.add_argument(
      '--per-class', type=int, default=20, help='training images per digit (0: all)'
  )
  parser.add_argument('--digits', default='0-9', help='the digits kept, FIRST-LAST')
  parser.add_argument('--degrees', type=float, default=30.0, help='test rotation range')
  parser.add_argument('--noise', type=float, default=40.0, help='test noise std (of 255)')
  args = parser.parse_args(argv)
  if args.out.exists():
    parser.error(f'{args.out} exists')
  first, last = (int(d) for d in args.digits.split('-'))
  print(write(args.out, args.per_class, args.degrees, args.noise, range(first, last + 1)))


if __name__ == '__main__':
  main()
