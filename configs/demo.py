"""Offline demo: a small ResNet on scikit-learn's handwritten digits, in two phases.

    python -m fineflax.train --config configs/demo.py --workdir runs/demo

Phase 1 trains the whole network from scratch with training-mode BatchNorm. Phase 2 is a
fine-tuning phase as on a pretrained backbone: every stage but the last frozen
(`stages[:-1]`: the stem and conv2-conv4), BN frozen (inference mode), conv5 and the head
trained at a lower learning rate.
Expected: test accuracy >= 0.95 on the 270 held-out digits, in under 3 minutes on a
2-core CPU.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.seed = 0
  config.batch_size = 64
  config.data.source = 'digits'
  config.model.backbone = 'resnet_tiny'
  config.model.image_size = 32  # the 8x8 digits, upsampled on the device
  config.model.preprocessing = 'tf'
  config.model.head.dropout = 0.2
  config.phases = (
      ffc.phase(
          name='scratch',
          freeze='none',
          batchnorm='train',
          optimizer='adam',
          learning_rate=3e-3,
          epochs=12,
      ),
      ffc.phase(
          name='finetune',
          freeze='stages[:-1]',
          batchnorm='frozen',
          optimizer='adam',
          learning_rate=3e-4,
          epochs=4,
      ),
  )
  return ffc.finish(config, arg)
