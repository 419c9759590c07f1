"""Your own photos, one folder per class: the ResNet50 damage
classifier workflow.

    python -m fineflax.train --config configs/folder.py --workdir runs/damage \
        --config.data.source=folder:/data/damage_photos
    python -m fineflax.summary --config configs/folder.py \
        --config.data.source=folder:/data/damage_photos

ResNet50 with Keras ImageNet weights, `base_model.layers[:143]` frozen (conv5 trains),
BatchNorm frozen, and that workflow's head: GlobalAveragePooling, Dropout(0.5),
BatchNormalization, Dense(1) (binary: e.g. damaged / undamaged). Photos of any size are
resized to 224 as they are read. PATH holds either one folder per class, and 20% of the
photos are carved out as the validation split; or `train/`, `validation/` and, if you have
one, `test/`, each with the class folders (a test/ folder is evaluated at the end of the
run). Unreadable files are skipped with a warning that counts them. More than two
classes: add `--config.model.num_classes=None` (the dataset's class count). Another
backbone: `layers[:143]` is ResNet50's index; add `--config.phases[0].freeze='stages[:-1]'`
(every stage but the last frozen, on any backbone; for ResNet50 the same layers).

Expected: the summary prints Keras' own counts for this model (14,982,145 trainable,
8,615,808 non-trainable; tested). Accuracy depends on your photos.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The folder config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 32
  config.model.backbone = 'resnet50'
  config.model.weights = 'imagenet'
  config.model.num_classes = 1
  config.model.image_size = 224
  config.model.head.dropout = 0.5
  config.model.head.batchnorm = True
  config.data.source = 'folder:photos'
  config.data.load_size = 224
  config.data.validation_split = 0.2
  config.data.test_split = 'test'  # used when PATH has a test/ folder (see the docstring)
  config.data.augment.flip = 'horizontal'
  config.phases = (
      ffc.phase(
          name='conv5', freeze='layers[:143]', optimizer='adam', learning_rate=1e-4, epochs=10
      ),
  )
  return ffc.finish(config, arg)
