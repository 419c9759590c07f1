"""ResNet50 on CIFAR-10, the Keras workflow (frozen base, then
conv5 fine-tuned) done the fineflax way.

    python -m fineflax.train --config configs/cifar10.py --workdir runs/cifar10
    python -m fineflax.train --config configs/cifar10.py:smoke --workdir /tmp/cifar10-smoke

Keras ImageNet weights; the 32x32 images are resized to 224 on the device (the host ships
3 KB a picture); a new Dense(10) head is trained on the frozen base, then conv5 (Keras
`layers[143:]`) is fine-tuned at a lower learning rate; BatchNorm stays frozen throughout.

Needs, offline: the ResNet50 `_notop` file in ~/.cache/fineflax/weights/ and cifar10
prepared by tensorflow-datasets (or `cifar-10-binary.tar.gz` in config.data.manual_dir);
the error messages say where each goes.
Expected: the Keras run (32x32, conv5 fine-tuned) reached 72.5% validation
accuracy; this config has not been run on the real data in this repository yet (no
dataset, weights or accelerator where it is developed), so no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The CIFAR-10 config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 256
  config.model.backbone = 'resnet50'
  config.model.weights = 'imagenet'
  config.model.image_size = 224
  config.model.head.pooling = 'avg'
  config.data.source = 'tfds:cifar10'
  config.data.train_split = 'train[:90%]'
  config.data.val_split = 'train[90%:]'
  config.data.test_split = 'test'
  config.data.augment.flip = 'horizontal'
  config.phases = (
      ffc.phase(name='head', freeze='backbone', optimizer='adam', learning_rate=1e-3, epochs=5),
      ffc.phase(
          name='conv5', freeze='layers[:143]', optimizer='adam', learning_rate=1e-4, epochs=10
      ),
  )
  return ffc.finish(config, arg)
