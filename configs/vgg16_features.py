"""VGG16 on the small cats-vs-dogs set: Deep Learning with Python's
three steps (feature extraction, augmentation, fine-tuning) as three phases.

    python -m fineflax.train --config configs/vgg16_features.py --workdir runs/vgg16 \
        --config.data.source=folder:/data/cats_vs_dogs_small
    python -m fineflax.train --config configs/vgg16_features.py:smoke --workdir /tmp/vgg-smoke \
        --config.data.source=folder:/data/cats_vs_dogs_small

The data is the book's `cats_vs_dogs_small` folder (train/ 1,000 cats + 1,000 dogs,
validation/ 500 + 500, test/ 1,000 + 1,000, made from Kaggle's dogs-vs-cats train.zip),
read at 180x180. Keras VGG16 ImageNet weights, caffe preprocessing, and the book's head:
Flatten, Dense(256) (no activation, as written there), Dropout(0.5), Dense(1) (sigmoid).
1. `features`: the frozen base runs once over the three splits and the head trains on the
   stored 5x5x512 features (cached-feature mode, chosen automatically: no augmentation,
   only the head trains), RMSprop 1e-3, 20 epochs.
2. `augmented`: the base stays frozen, the images are augmented on the device
   (RandomFlip('horizontal'), RandomRotation(0.1), RandomZoom(0.2)), RMSprop 1e-3, 50 epochs.
3. `block5`: `conv_base.layers[:-4]` frozen (block5's three convolutions train), RMSprop
   1e-5, 30 epochs. checkpoints/best keeps the lowest val_loss, as the book's
   `ModelCheckpoint(save_best_only=True, monitor='val_loss')`; evaluate it with
   `python -m fineflax.evaluate --workdir runs/vgg16 --checkpoint best`.

Expected: the book's Keras runs reached 97.3% (features), 97.7% (augmented) and 97.7%
(fine-tuned) test accuracy; this config has not been run on the real photos in this
repository (none here), so no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The VGG16 three-step config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 32
  config.model.backbone = 'vgg16'
  config.model.weights = 'imagenet'
  config.model.num_classes = 1
  config.model.head.pooling = 'flatten'
  config.model.head.hidden = (256,)
  config.model.head.activation = 'linear'
  config.model.head.dropout = 0.5
  config.data.source = 'folder:cats_vs_dogs_small'
  config.data.load_size = 180
  config.data.train_split = 'train'
  config.data.val_split = 'validation'
  config.data.test_split = 'test'
  config.data.augment.flip = 'horizontal'
  config.data.augment.rotation = 0.1
  config.data.augment.zoom = 0.2
  config.phases = (
      ffc.phase(
          name='features',
          freeze='backbone',
          augment=False,
          optimizer='rmsprop',
          learning_rate=1e-3,
          epochs=20,
      ),
      ffc.phase(
          name='augmented', freeze='backbone', optimizer='rmsprop', learning_rate=1e-3, epochs=50
      ),
      ffc.phase(
          name='block5', freeze='layers[:-4]', optimizer='rmsprop', learning_rate=1e-5, epochs=30
      ),
  )
  return ffc.finish(config, arg)
