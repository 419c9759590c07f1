"""ResNet50 on CIFAR-10 as configs/cifar10.py, with discriminative fine-tuning: after the
head is trained on the frozen base, the whole backbone is fine-tuned with layer-wise
learning-rate decay instead of only conv5.

    python -m fineflax.train --config configs/cifar10_discriminative.py --workdir runs/cifar10_ld
    python -m fineflax.summary --config configs/cifar10_discriminative.py --phase 1
    python -m fineflax.train --config configs/cifar10_discriminative.py:smoke --workdir /tmp/ld

Phase 2 trains at 1e-4 x 0.5**k, k the stages below the head: the head at 1e-4, conv5 at
5e-5, conv4 at 2.5e-5, ... the stem at 3.1e-6 (layer_decay, docs/running.md); BatchNorm
stays frozen. Needs, offline, what configs/cifar10.py needs. Not run on the real data in
this repository (no dataset, weights or accelerator where it is developed): no figure is
claimed for it.
"""

import ml_collections

from configs import cifar10
from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """configs/cifar10.py with phase 2 replaced by layer decay; `arg` 'smoke' shrinks it."""
  config = cifar10.get_config()  # the base as written: :smoke applies to the result
  config.phases = (
      config.phases[0],
      ffc.phase(
          name='finetune',
          freeze='none',
          optimizer='adam',
          learning_rate=1e-4,
          layer_decay=0.5,
          epochs=10,
      ),
  )
  return ffc.finish(config, arg)
