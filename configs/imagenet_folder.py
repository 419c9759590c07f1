"""ResNet50 fine-tuned on an ImageNet-size folder of JPEGs, streamed: the Keras two-phase
workflow (frozen base, then conv5) at the scale where splits no longer fit in memory.

    python -m fineflax.train --config configs/imagenet_folder.py --workdir runs/ilsvrc \
        --config.data.source=folder:/data/ilsvrc
    python -m fineflax.train --config configs/imagenet_folder.py:smoke --workdir /tmp/s \
        --config.data.source=folder:/data/ilsvrc

PATH holds `train/` and `validation/` (and `test/` if labelled), each with one folder per
class (ILSVRC's n01440764/... layout; class ids are the sorted folder names). The splits
are streamed (`config.data.pipeline`, docs/data.md): each batch is decoded, given an
Inception-style random-resized crop of the original image (evaluation: the centred 87.5%)
and resized to 224 by `config.data.workers` processes while the devices train; host memory
does not grow with the dataset, and a preempted run resumes mid-epoch without reading the
epoch again. Keras ImageNet weights; a new head is trained on the frozen base, then the
last stage (`stages[:-1]` frozen: for ResNet50 conv5, Keras' `layers[143:]`; it fits any
backbone) at a lower learning rate; BatchNorm stays frozen.

Expected: no figure is claimed; ILSVRC, its weights and an accelerator are not available
where this repository is developed. The smoke run is tested on a small made folder.
"""

import ml_collections

from fineflax import config as ffc


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The ImageNet-folder config; `arg` 'smoke' shrinks it."""
  config = ffc.default_config()
  config.batch_size = 256
  config.model.backbone = 'resnet50'
  config.model.weights = 'imagenet'
  config.model.num_classes = None  # the folder's class count
  config.model.image_size = 224
  config.data.source = 'folder:ilsvrc'
  config.data.pipeline = 'stream'
  config.data.load_size = 224
  config.data.test_split = 'test'  # used when PATH has a test/ folder
  config.data.augment.crop = 'random_resized'
  config.data.augment.flip = 'horizontal'
  config.phases = (
      ffc.phase(name='head', freeze='backbone', optimizer='adam', learning_rate=1e-3, epochs=2),
      ffc.phase(
          name='conv5',
          freeze='stages[:-1]',
          optimizer='sgd',
          momentum=0.9,
          learning_rate=1e-2,
          schedule='cosine',
          epochs=8,
      ),
  )
  return ffc.finish(config, arg)
