"""Zero-shot ImageNet-1k classification with a pretrained backbone and Keras' own top
(Keras' `ResNet50(include_top=True, weights='imagenet')` + `decode_predictions`).

    python -m fineflax.predict --config configs/imagenet.py --top_k 3 elephant.jpg
    python -m fineflax.predict --config configs/imagenet.py --config.model.backbone=xception \
        elephant.jpg

Needs the backbone's ImageNet file with the top: downloaded into $FINEFLAX_CACHE/weights
on first use, or put there by hand offline (the error message says where).
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The zero-shot ImageNet config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.model.backbone = 'resnet50'
  config.model.weights = 'imagenet'
  config.model.include_top = True
  return ffc.finish(config, arg)
