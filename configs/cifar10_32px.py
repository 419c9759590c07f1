"""ResNet50 on CIFAR-10 at its own 32x32: the Keras workflow as
written.

    python -m fineflax.train --config configs/cifar10_32px.py --workdir runs/cifar10_32px
    python -m fineflax.train --config configs/cifar10_32px.py:smoke --workdir /tmp/c32-smoke

Keras ImageNet weights, `ResNet50(include_top=False, pooling='avg', input_shape=(32, 32, 3))`
with caffe preprocessing and a Dense(10) head, batch 256, BatchNorm frozen (the Keras run's
`base_model(x, training=False)`).
1. `head`: the base frozen; no augmentation, so the head trains on features the base
   computes once (cached-feature mode); Adam 1e-3, up to 10 epochs,
   EarlyStopping(monitor='val_loss', patience=5).
2. `conv5`: `base_model.layers[:143]` frozen, Adam 1e-4, up to 50 epochs,
   EarlyStopping(patience=5).
The Keras run validated on the test set; here the validation split is the last 10% of train and
the test set is kept for the end.

Needs, offline: the ResNet50 `_notop` file in ~/.cache/fineflax/weights/ and cifar10
prepared by tensorflow-datasets (or `cifar-10-binary.tar.gz` in config.data.manual_dir).
Expected: the Keras run reached 64.8% val accuracy after the head phase and 72.5%
after conv5; this config has not been run on the real data in this repository (no
dataset, weights or accelerator here), so no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CIFAR-10 32x32 config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 256
  config.model.backbone = 'resnet50'
  config.model.weights = 'imagenet'
  config.model.head.pooling = 'avg'
  config.data.source = 'tfds:cifar10'
  config.data.train_split = 'train[:90%]'
  config.data.val_split = 'train[90%:]'
  config.data.test_split = 'test'
  patience = {'patience': 5, 'monitor': 'val_loss'}
  config.phases = (
      ffc.phase(
          name='head',
          freeze='backbone',
          optimizer='adam',
          learning_rate=1e-3,
          epochs=10,
          early_stopping=patience,
      ),
      ffc.phase(
          name='conv5',
          freeze='layers[:143]',
          optimizer='adam',
          learning_rate=1e-4,
          epochs=50,
          early_stopping=patience,
      ),
  )
  return ffc.finish(config, arg)
