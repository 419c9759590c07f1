"""The named pretrained weights fineflax knows: where each file lives and its checksum.

`config.model.weights` is None (random init), 'imagenet' (the backbone's default
source), a source name below ('keras:imagenet', 'torchvision:IMAGENET1K_V2'), or the
path of a `.h5`, `.pth`, `.pt` or `.safetensors` file.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePosixPath
from urllib.parse import urlparse

from fineflax.weights import torchvision_sources


@dataclasses.dataclass(frozen=True)
class WeightFile:
  """One downloadable file and what its content must hash to (every checksum given must
  match; at least one is required)."""

  url: str
  md5: str | None = None  # Keras publishes md5 for its files
  sha256: str | None = None
  sha256_prefix: str | None = None  # torch hub's check: the sha256 prefix in the file name

  def __post_init__(self):
    if not (self.md5 or self.sha256 or self.sha256_prefix):
      raise ValueError(f'{self.url}: a weight file needs a checksum')

  @property
  def filename(self) -> str:
    """The file's name: its name in the cache, and under a mirror."""
    return PurePosixPath(urlparse(self.url).path).name

  def checksums(self) -> str:
    """The expected checksums, for messages."""
    parts = [
        f'{k} {v}'
        for k, v in [
            ('md5', self.md5),
            ('sha256', self.sha256),
            ('sha256 prefix', self.sha256_prefix),
        ]
        if v
    ]
    return ', '.join(parts)


@dataclasses.dataclass(frozen=True)
class Source:
  """A named set of pretrained weights for one backbone."""

  name: str
  backbone: str
  full: WeightFile  # with the ImageNet-1k classifier
  notop: WeightFile | None  # without it, where the publisher offers such a file
  top1: str  # ImageNet-1k top-1 accuracy as its publisher reports it
  licence: str
  # Where the checksums come from, as the weight table shows it: for Keras the source file
  # of keras.applications whose md5 `file_hash`es they are (tests/test_weights.py finds
  # them there); for torchvision the file name, whose sha256 prefix is all it publishes.
  checksum_source: str

  def file(self, include_top: bool) -> WeightFile:
    """The file to fetch: the top-less one unless the model keeps Keras' top."""
    return self.full if include_top or self.notop is None else self.notop


_KERAS = 'https://storage.googleapis.com/tensorflow/keras-applications'


def _keras(
    backbone: str, folder: str, md5_full: str, md5_notop: str, top1: str, licence: str
) -> Source:
  stem = f'{_KERAS}/{folder}/{backbone}_weights_tf_dim_ordering_tf_kernels'
  # keras.applications' module of each family is named like its folder of the bucket.
  return Source(
      'keras:imagenet',
      backbone,
      WeightFile(f'{stem}.h5', md5=md5_full),
      WeightFile(f'{stem}_notop.h5', md5=md5_notop),
      top1,
      licence,
      f"Keras' md5s, in keras.applications' `keras/src/applications/{folder}.py`",
  )


def _keras_convnext(variant: str, sha256_full: str, sha256_notop: str, top1: str) -> Source:
  # keras.applications' ConvNeXt files are named after the model and checked by sha256.
  stem = f'{_KERAS}/convnext/convnext_{variant}'
  return Source(
      'keras:imagenet',
      f'convnext_{variant}',
      WeightFile(f'{stem}.h5', sha256=sha256_full),
      WeightFile(f'{stem}_notop.h5', sha256=sha256_notop),
      top1,
      'MIT (ported from facebookresearch/ConvNeXt)',
      "Keras' sha256s, in keras.applications' `keras/src/applications/convnext.py`",
  )


def _keras_efficientnet(backbone: str, md5_full: str, md5_notop: str, top1: str) -> Source:
  # keras.applications' EfficientNet files are named after the Keras model
  # (`efficientnetb0`, `efficientnetv2-b0`), V1's in another bucket than the other families.
  v2 = backbone.startswith('efficientnetv2')
  folder = 'efficientnet_v2' if v2 else 'efficientnet'
  name = backbone.replace('_', '-') if v2 else backbone.replace('_', '')
  base = f'{_KERAS}/efficientnet_v2' if v2 else 'https://storage.googleapis.com/keras-applications'
  return Source(
      'keras:imagenet',
      backbone,
      WeightFile(f'{base}/{name}.h5', md5=md5_full),
      WeightFile(f'{base}/{name}_notop.h5', md5=md5_notop),
      top1,
      'Apache-2.0 (ported from tensorflow/tpu)',
      f"Keras' md5s, in keras.applications' `keras/src/applications/{folder}.py`",
  )


def _torchvision(name: str, filename: str, top1: str, licence: str, backbone: str) -> Source:
  return Source(
      f'torchvision:{name}',
      backbone,
      WeightFile(
          f'https://download.pytorch.org/models/{filename}',
          sha256_prefix=filename.split('-')[1].split('.')[0],
      ),
      None,
      top1,
      licence,
      'the 8-hex sha256 prefix in the file name, all that torchvision publishes '
      '(torch hub checks it)',
  )


def _torchvision_sources(family: str) -> tuple[Source, ...]:
  """torchvision's weights of the backbones whose names start with `family`."""
  return tuple(
      _torchvision(*row, backbone)
      for backbone, rows in torchvision_sources.WEIGHTS.items()
      if backbone.startswith(family)
      for row in rows
  )


SOURCES: tuple[Source, ...] = (
    # md5s as keras.applications checks them; top-1 as keras.io lists it.
    _keras(
        'resnet50',
        'resnet',
        '2cb95161c43110f7111970584f804107',
        '4d473c1dd8becc155b73f8504c6f6626',
        '74.9%',
        'MIT (ported from Kaiming He et al.)',
    ),
    _keras(
        'resnet101',
        'resnet',
        'f1aeb4b969a6efcfb50fad2f0c20cfc5',
        '88cf7a10940856eca736dc7b7e228a21',
        '76.4%',
        'MIT (ported from Kaiming He et al.)',
    ),
    _keras(
        'resnet152',
        'resnet',
        '100835be76be38e30d865e96f2aaae62',
        'ee4c566cf9a93f14d82f913c2dc6dd0c',
        '76.6%',
        'MIT (ported from Kaiming He et al.)',
    ),
    _keras(
        'vgg16',
        'vgg16',
        '64373286793e3c8b2b4e3219cbf3544b',
        '6d6bbae143d832006294945121d1f1fc',
        '71.3%',
        'CC BY 4.0 (Oxford VGG)',
    ),
    _keras(
        'xception',
        'xception',
        '0a58e3b7378bc2990ea3b43d5981f1f6',
        'b0042744bf5b25fce3cb969f33bebb97',
        '79.0%',
        'MIT (Keras)',
    ),
    *_torchvision_sources('resnet50'),
    # sha256s as keras.applications checks them; top-1 as keras.io lists it (base, large and
    # xlarge were pre-trained on ImageNet-21k, then fine-tuned on ImageNet-1k).
    _keras_convnext(
        'tiny',
        '8ae6e78ce2933352b1ef4008e6dd2f17bc40771563877d156bc6426c7cf503ff',
        'd547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1',
        '81.3%',
    ),
    _keras_convnext(
        'small',
        'ce1277d8f1ee5a0ef0e171469089c18f5233860ceaf9b168049cb9263fd7483c',
        '6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab',
        '82.3%',
    ),
    _keras_convnext(
        'base',
        '52cbb006d3dadd03f6e095a8ca1aca47aecdd75acb4bc74bce1f5c695d0086e6',
        '40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45',
        '85.3%',
    ),
    _keras_convnext(
        'large',
        '070c5ed9ed289581e477741d3b34beffa920db8cf590899d6d2c67fba2a198a6',
        '96f02b6f0753d4f543261bc9d09bed650f24dd6bc02ddde3066135b63d23a1cd',
        '86.3%',
    ),
    _keras_convnext(
        'xlarge',
        'c1f5ccab661354fc3a79a10fa99af82f0fbf10ec65cb894a3ae0815f17a889ee',
        'de3f8a54174130e0cecdc71583354753d557fcf1f4487331558e2a16ba0cfe05',
        '86.7%',
    ),
    *_torchvision_sources('convnext'),
    *_torchvision_sources('vit'),
)

# md5s as keras.applications checks them; top-1 as keras.io lists it.
_EFFICIENTNET = (
    (
        'efficientnet_b0',
        '902e53a9f72be733fc0bcb005b3ebbac',
        '50bc09e76180e00e4465e1a485ddc09d',
        '77.1%',
    ),
    (
        'efficientnet_b1',
        '1d254153d4ab51201f1646940f018540',
        '74c4e6b3e1f6a1eea24c589628592432',
        '79.1%',
    ),
    (
        'efficientnet_b2',
        'b15cce36ff4dcbd00b6dd88e7857a6ad',
        '111f8e2ac8aa800a7a99e3239f7bfb39',
        '80.1%',
    ),
    (
        'efficientnet_b3',
        'ffd1fdc53d0ce67064dc6a9c7960ede0',
        'af6d107764bb5b1abb91932881670226',
        '81.6%',
    ),
    (
        'efficientnet_b4',
        '18c95ad55216b8f92d7e70b3a046e2fc',
        'ebc24e6d6c33eaebbd558eafbeedf1ba',
        '82.9%',
    ),
    (
        'efficientnet_b5',
        'ace28f2a6363774853a83a0b21b9421a',
        '38879255a25d3c92d5e44e04ae6cec6f',
        '83.6%',
    ),
    (
        'efficientnet_b6',
        '165f6e37dce68623721b423839de8be5',
        '9ecce42647a20130c1f39a5d4cb75743',
        '84.0%',
    ),
    (
        'efficientnet_b7',
        '8c03f828fec3ef71311cd463b6759d99',
        'cbcfe4450ddf6f3ad90b1b398090fe4a',
        '84.3%',
    ),
    (
        'efficientnetv2_b0',
        '21ecbf6da12460d5c40bb2f29ceb2188',
        '893217f2bb855e2983157299931e43ff',
        '78.7%',
    ),
    (
        'efficientnetv2_b1',
        '069f0534ff22adf035c89e2d9547a9dc',
        '0e80663031ca32d657f9caa404b6ec37',
        '79.8%',
    ),
    (
        'efficientnetv2_b2',
        '424e49f28180edbde1e94797771950a7',
        '1dfe2e7a5d45b6632553a8961ea609eb',
        '80.5%',
    ),
    (
        'efficientnetv2_b3',
        '1f1fc43bd98a6e4fd8fdfd551e02c7a0',
        'f6abf7b5849ac99a89b50dd3fd532856',
        '82.0%',
    ),
    (
        'efficientnetv2_s',
        'e1d88a8495beba45748fedd0cecbe016',
        'af0682fb74e8c54910f2d4393339c070',
        '83.9%',
    ),
    (
        'efficientnetv2_m',
        'a3bf6aa3276309f4fc6a34aa114c95cd',
        '1b8dc055df72dde80d614482840fe342',
        '85.3%',
    ),
    (
        'efficientnetv2_l',
        '27e6d408b53c7ebc868fefa357689935',
        'b0b66b5c863aef5b46e8608fe1711615',
        '85.7%',
    ),
)
SOURCES += tuple(_keras_efficientnet(*row) for row in _EFFICIENTNET)
SOURCES += _torchvision_sources('efficientnet_v2')

DEFAULTS = {
    'resnet50': 'keras:imagenet',
    'resnet101': 'keras:imagenet',
    'resnet152': 'keras:imagenet',
    'vgg16': 'keras:imagenet',
    'xception': 'keras:imagenet',
    **{f'convnext_{v}': 'keras:imagenet' for v in ('tiny', 'small', 'base', 'large', 'xlarge')},
    **{backbone: 'keras:imagenet' for backbone, *_ in _EFFICIENTNET},
    **torchvision_sources.DEFAULTS,
}


def named_source(name: str, backbone: str) -> Source | None:
  """The source `name` ('imagenet' = the default) for `backbone`, or None if unknown."""
  name = DEFAULTS.get(backbone, '') if name == 'imagenet' else name
  for source in SOURCES:
    if source.name == name and source.backbone == backbone:
      return source
  return None


def names_for(backbone: str) -> list[str]:
  """Every weights name that `backbone` accepts."""
  names = [s.name for s in SOURCES if s.backbone == backbone]
  return (['imagenet'] if names else []) + names


def markdown_table() -> str:
  """The named weights as a Markdown table (docs/models_and_weights.md embeds it; a test
  compares)."""
  rows = [
      '| weights | backbone | file(s) | checksum | checksum source | '
      'ImageNet top-1 (publisher) | licence |',
      '|---|---|---|---|---|---|---|',
  ]
  for src in SOURCES:
    default = ' (default)' if DEFAULTS.get(src.backbone) == src.name else ''
    files = [src.full] + ([src.notop] if src.notop else [])
    rows.append(
        f'| `{src.name}`{default} | `{src.backbone}` | '
        + ' and '.join(f'[`{f.filename}`]({f.url})' for f in files)
        + ' | '
        + '; '.join(f.checksums() for f in files)
        + f' | {src.checksum_source} | {src.top1} | {src.licence} |'
    )
  return '\n'.join(rows)
