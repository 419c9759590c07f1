"""ViT-B/16 on CIFAR-10: a head trained on cached features, then the whole network
fine-tuned the way ViTs are (AdamW, warmup and cosine, layer decay, label smoothing,
stochastic depth, gradient clipping).

    python -m fineflax.train --config configs/cifar10_vit.py --workdir runs/cifar10_vit
    python -m fineflax.summary --config configs/cifar10_vit.py --phase 1
    python -m fineflax.train --config configs/cifar10_vit.py:smoke --workdir /tmp/vit-smoke

torchvision's ImageNet weights (`vit_b_16-c867db91.pth`, IMAGENET1K_V1, 224 px; images
normalised by ImageNet's mean and std); the 32x32 images are resized to 224 on the device.
Phase 1 trains a new Dense(10) on the class token of the frozen backbone, without
augmentation, so its features are computed once and cached. Phase 2 trains everything
with AdamW (weight decay 0.05), a one-epoch warmup into a cosine decay from 1e-4, layer
decay 0.75 over the patch embedding, the 12 blocks and the final norm, label smoothing 0.1,
horizontal flips, drop path 0.1 and gradient clipping at norm 1 (the recipe of BEiT and
big_vision's transfer configs). Another side (e.g. `--config.model.image_size=384`)
resizes the position embedding when the weights are loaded, and the load report says so.

Needs, offline: `vit_b_16-c867db91.pth` in ~/.cache/fineflax/weights/ and cifar10 prepared
by tensorflow-datasets (or `cifar-10-binary.tar.gz` in config.data.manual_dir); the error
messages say where each goes. Not run on the real data in this repository (no dataset,
weights or accelerator where it is developed): no figure is claimed for it.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ViT CIFAR-10 config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 128
  config.model.backbone = 'vit_b_16_torchvision'
  config.model.weights = 'imagenet'
  config.model.image_size = 224
  config.model.head.pooling = 'avg'  # on the class token's 1x1 map: the token itself
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
          layer_decay=0.75,
          clip_norm=1.0,
          epochs=10,
      ),
  )
  return ffc.finish(config, arg)
