"""Xception on cats_vs_dogs: the Keras transfer-learning guide.

    python -m fineflax.train --config configs/cats_vs_dogs.py --workdir runs/cats_vs_dogs
    python -m fineflax.train --config configs/cats_vs_dogs.py:smoke --workdir /tmp/cvd-smoke

Keras ImageNet weights, 150x150 inputs scaled to [-1, 1], tfds splits `train[:40%]`,
`train[40%:50%]`, `train[50%:60%]`, RandomFlip('horizontal') + RandomRotation(0.1) on
the device, a GAP + Dropout(0.2) + Dense(1) head (logits, binary cross-entropy). Phase 1
trains the head on the frozen base with Adam; phase 2 unfreezes the whole base at Adam
1e-5 with BatchNorm still in inference mode (the guide's `training=False`).

Needs, offline: the Xception `_notop` file in ~/.cache/fineflax/weights/ and cats_vs_dogs
prepared by tensorflow-datasets (or its zip in config.data.manual_dir).
Expected: the guide's Keras run reached 94.1% test accuracy; this config has not been run
on the real data in this repository yet, so no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The cats_vs_dogs config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 64
  config.model.backbone = 'xception'
  config.model.weights = 'imagenet'
  config.model.num_classes = 1
  config.model.image_size = 150
  config.model.head.dropout = 0.2
  config.data.source = 'tfds:cats_vs_dogs'
  config.data.load_size = 150
  config.data.train_split = 'train[:40%]'
  config.data.val_split = 'train[40%:50%]'
  config.data.test_split = 'train[50%:60%]'
  config.data.augment.flip = 'horizontal'
  config.data.augment.rotation = 0.1
  config.phases = (
      ffc.phase(name='head', freeze='backbone', optimizer='adam', learning_rate=1e-3, epochs=20),
      ffc.phase(name='finetune', freeze='none', optimizer='adam', learning_rate=1e-5, epochs=10),
  )
  return ffc.finish(config, arg)
