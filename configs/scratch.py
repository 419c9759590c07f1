"""ResNet50 trained from scratch on CIFAR-10 at 32x32: the `weights=None` run of the
ResNet50-on-CIFAR-10 Keras workflow.

    python -m fineflax.train --config configs/scratch.py --workdir runs/scratch
    python -m fineflax.train --config configs/scratch.py:smoke --workdir /tmp/scratch-smoke

The architecture of configs/cifar10_32px.py with random initialisation
(`ResNet50(include_top=False, pooling='avg', weights=None)`), everything trainable, Adam
1e-3, batch 256, up to 30 epochs with EarlyStopping(monitor='val_loss', patience=5). The
seed kept `training=False` for BatchNorm even here, so BN stays frozen at its initial
statistics; `--config.phases[0].batchnorm=train` trains it the usual way instead.

Needs, offline: cifar10 prepared by tensorflow-datasets (no weight file).
Expected: that Keras run reached 70.2% val accuracy after 12 epochs; this config has
not been run on the real data in this repository, so no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The from-scratch config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 256
  config.model.backbone = 'resnet50'
  config.model.weights = None
  config.model.head.pooling = 'avg'
  config.data.source = 'tfds:cifar10'
  config.data.train_split = 'train[:90%]'
  config.data.val_split = 'train[90%:]'
  config.data.test_split = 'test'
  config.phases = (
      ffc.phase(
          name='scratch',
          freeze='none',
          optimizer='adam',
          learning_rate=1e-3,
          epochs=30,
          early_stopping={'patience': 5, 'monitor': 'val_loss'},
      ),
  )
  return ffc.finish(config, arg)
