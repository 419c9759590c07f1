"""ConvNeXt-Tiny on CIFAR-10: a head trained on cached features, then the whole network
fine-tuned the way ConvNeXt is (AdamW, warmup and cosine, layer decay, label smoothing,
stochastic depth).

    python -m fineflax.train --config configs/cifar10_convnext.py --workdir runs/cifar10_convnext
    python -m fineflax.summary --config configs/cifar10_convnext.py --phase 1
    python -m fineflax.train --config configs/cifar10_convnext.py:smoke --workdir /tmp/cx-smoke

Keras' ImageNet weights (`convnext_tiny_notop.h5`; the network normalises the [0, 255]
pixels itself); the 32x32 images are resized to 224 on the device. Phase 1 trains a new
Dense(10) on global average pooling over the frozen backbone, without augmentation, so
its features are computed once and cached. Phase 2 trains everything with AdamW (weight
decay 0.05), a one-epoch warmup into a cosine decay from 1e-4, layer decay 0.7 (the head
at 1e-4, stage4 at 7e-5, ... the stem at 1.7e-5), label smoothing 0.1, horizontal flips
and drop path 0.1 (the last block's rate; stochastic depth acts in the blocks that train,
so not in phase 1).

Needs, offline: `convnext_tiny_notop.h5` in ~/.cache/fineflax/weights/ and cifar10 prepared
by tensorflow-datasets (or `cifar-10-binary.tar.gz` in config.data.manual_dir); the error
messages say where each goes. Not run on the real data in this repository (no dataset,
weights or accelerator where it is developed): no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ConvNeXt CIFAR-10 config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 128
  config.model.backbone = 'convnext_tiny'
  config.model.weights = 'imagenet'
  config.model.image_size = 224
  config.model.head.pooling = 'avg'
  config.model.drop_path = 0.1
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
          weight_decay=0.05,
          schedule='warmup_cosine',
          warmup_epochs=1.0,
          layer_decay=0.7,
          epochs=10,
      ),
  )
  return ffc.finish(config, arg)
