"""EfficientNetV2-B0 on CIFAR-10: a head trained on cached features, then the whole network
fine-tuned with the usual recipe (AdamW, warmup and cosine, layer decay, label smoothing,
stochastic depth).

    python -m fineflax.train --config configs/cifar10_efficientnetv2.py --workdir runs/cifar10_effv2
    python -m fineflax.summary --config configs/cifar10_efficientnetv2.py --phase 1
    python -m fineflax.train --config configs/cifar10_efficientnetv2.py:smoke --workdir /tmp/ev2

Keras' ImageNet weights (`efficientnetv2-b0_notop.h5`; the network rescales and normalises
the [0, 255] pixels itself, as Keras' `include_preprocessing=True` model does); the 32x32
images are resized to 224, its ImageNet side, on the device. Phase 1 trains a new Dense(10)
on global average pooling over the frozen backbone, without augmentation, so its features
are computed once and cached. Phase 2 trains every parameter (BatchNormalization's scale and
offset too; its statistics stay frozen, Keras' `training=False` rule) with
AdamW (weight decay 0.01), a one-epoch warmup into a cosine decay from 1e-4, layer decay
0.8 over the stem, the six block groups and the top (the head at 1e-4, the top at 8e-5,
... the stem at 1.7e-5), label smoothing 0.1, horizontal flips and drop path 0.2 (Keras'
drop_connect_rate: block b of 16 drops at 0.2 * b / 16; it acts in the blocks that train,
so not in phase 1).

Needs, offline: `efficientnetv2-b0_notop.h5` in ~/.cache/fineflax/weights/ and cifar10
prepared by tensorflow-datasets (or `cifar-10-binary.tar.gz` in config.data.manual_dir);
the error messages say where each goes. Not run on the real data in this repository (no
dataset, weights or accelerator where it is developed): no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The EfficientNetV2 CIFAR-10 config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 128
  config.model.backbone = 'efficientnetv2_b0'
  config.model.weights = 'keras:imagenet'
  config.model.image_size = 224
  config.model.head.pooling = 'avg'
  config.model.drop_path = 0.2
  config.loss.label_smoothing = 0.1
  config.data.source = 'tfds:cifar10'
  config.data.train_split = 'train[:90%]'
  config.data.val_split = 'train[90%:]'
  config.data.test_split = 'test'
  config.data.augment.flip = 'horizontal'
  config.phases = (
      ffc.phase(
          name='head',
          freeze='backbone',
          augment=False,
          optimizer='adam',
          learning_rate=1e-3,
          epochs=5,
      ),
      ffc.phase(
          name='finetune',
          freeze='none',
          optimizer='adamw',
          learning_rate=1e-4,
          weight_decay=0.01,
          schedule='warmup_cosine',
          warmup_epochs=1.0,
          layer_decay=0.8,
          epochs=10,
      ),
  )
  return ffc.finish(config, arg)
