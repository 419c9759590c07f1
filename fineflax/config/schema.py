"""Every config key: its default, accepted types, meaning and value check (`SCHEMA`, and
`PHASE_SCHEMA` for each of `config.phases`), and the configs built from them.

A config file starts from `default_config()`, sets what it needs, builds its phases with
`phase()`, and ends with `finish(config, arg)` (fineflax.config.smoke) so that every
config accepts the `:smoke` argument.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from fineflax.config.registry import choices, value_check
from fineflax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Field:
  """One config key: default, accepted types, meaning, and an optional value check."""

  default: Any
  types: tuple[type, ...]
  help: str
  optional: bool = False  # None allowed
  check: Callable[[Any], str | None] | None = None  # returns an error text or None


def _at_least(low: float):
  return lambda v: None if v >= low else f'must be >= {low}'


def _positive(v):
  return None if v > 0 else 'must be > 0'


def _fraction(v):
  return None if 0 <= v < 1 else 'must be in [0, 1)'


def _class_weight(v):
  if isinstance(v, str):
    return None if v == 'balanced' else "expected 'balanced' or one weight per class"
  if not v or not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0
                      for w in v):
    return 'must be a non-empty tuple of weights >= 0, one per class'
  return None


def _crop(v):
  if isinstance(v, str):
    return None if v == 'random_resized' else "expected a side in pixels or 'random_resized'"
  return _positive(v)


def _hidden(v):
  if not all(isinstance(u, int) and not isinstance(u, bool) and u > 0 for u in v):
    return 'must be a tuple of positive ints (the widths of hidden Dense layers)'
  return None


_INT, _FLOAT, _STR, _BOOL, _SEQ = (int,), (float, int), (str,), (bool,), (tuple, list)
METRICS = ('loss', 'accuracy', 'val_loss', 'val_accuracy')


SCHEMA: dict[str, Any] = {
    'seed': Field(0, _INT, 'Seed of parameter init, data order and dropout.'),
    'batch_size': Field(64, _INT, 'Global training batch size (all devices, all hosts).',
                        check=_positive),
    'eval_batch_size': Field(None, _INT, 'Evaluation batch size; None: batch_size.',
                             optional=True, check=_positive),
    'dtype': Field('auto', _STR, "Compute dtype; 'auto': bfloat16 on GPU/TPU, float32 on "
                   'CPU. Parameters are float32 always.',
                   check=value_check('dtype')),
    'model': {
        'backbone': Field('resnet50', _STR, 'Backbone name (fineflax.models.BACKBONES).',
                          check=value_check('model.backbone')),
        'weights': Field(None, _STR, "Pretrained weights: None (random init), 'imagenet' (the "
                         "backbone's default), a source name ('keras:imagenet', "
                         "'torchvision:IMAGENET1K_V2') or a .h5/.pth/.pt/.safetensors path.",
                         optional=True),
        'include_top': Field(False, _BOOL, "Keep Keras' ImageNet classifier (avg_pool + "
                             'predictions; VGG16: flatten, fc1, fc2, predictions) as the head '
                             'instead of config.model.head.'),
        'num_classes': Field(None, _INT, "Output units (1: binary, sigmoid); None: the "
                             "dataset's number of classes.", optional=True, check=_positive),
        'image_size': Field(None, _INT, 'Side the images are resized to on the device; '
                            'None: the size the data comes in.', optional=True,
                            check=_positive),
        'preprocessing': Field('auto', _STR, "Input normalisation: 'caffe', 'tf' ([-1, 1]),"
                               " 'torch' (mean/std); 'auto': the backbone's.",
                               check=value_check('model.preprocessing')),
        'head': {
            'pooling': Field('avg', _STR, "'avg', 'max' (global pooling) or 'flatten'.",
                             check=value_check('model.head.pooling')),
            'hidden': Field((), _SEQ, 'Widths of hidden Dense layers.', check=_hidden),
            'activation': Field('relu', _STR, "Activation of the hidden Dense layers: 'relu' "
                                "or 'linear' (Deep Learning with Python's Dense(256) has none).",
                                check=value_check('model.head.activation')),
            'dropout': Field(0.0, _FLOAT, 'Dropout rate before the classifier; 0: none.',
                             check=_fraction),
            'batchnorm': Field(False, _BOOL, 'BatchNormalization before the classifier.'),
        },
    },
    'data': {
        'source': Field('digits', _STR, "'digits' (the demo's), 'tfds:NAME' "
                        "(tensorflow-datasets), 'folder:PATH' (a folder per class) or "
                        "'synthetic:N:SIDE' (random images, for benchmarks).",
                        check=value_check('data.source')),
        'train_split': Field('train', _STR, 'Split to train on.'),
        'val_split': Field('validation', _STR, 'Split evaluated after every epoch; None: '
                           'none.', optional=True),
        'test_split': Field('test', _STR, 'Split evaluated at the end; None: none.',
                            optional=True),
        'max_examples': Field(None, _INT, 'Keep the first N examples of each split (smoke '
                              'runs); None: all.', optional=True, check=_positive),
        'load_size': Field(None, _INT, 'Side images are resized to as they are read (photos '
                           'of varying size); None: as stored.', optional=True,
                           check=_positive),
        'validation_split': Field(0.0, _FLOAT, 'folder: the fraction of the images carved '
                                  'out as the validation split.', check=_fraction),
        'split_seed': Field(1337, _INT, 'folder: seed of the shuffle before the carve.'),
        'data_dir': Field(None, _STR, "tfds: where datasets are prepared; None: tfds' "
                          'default (~/tensorflow_datasets).', optional=True),
        'manual_dir': Field(None, _STR, 'tfds: where the files a dataset is built from are '
                            'put by hand (offline).', optional=True),
        'pipeline': Field('auto', _STR, "How splits are read: 'memory' (decoded into host "
                          "memory before training), 'stream' (decoded batch by batch as training "
                          "runs, in data.workers processes; folder: sources); 'auto': memory when "
                          'the decoded splits fit under data.memory_max_mb, else stream.',
                          check=value_check('data.pipeline')),
        'memory_max_mb': Field(16384, _INT, "'auto': the decoded size (all splits, this "
                               'process) up to which splits are held in memory.',
                               check=_at_least(0)),
        'workers': Field(None, _INT, 'Streaming: decoding processes; None: one per core (up '
                         'to 16); 0: threads of the training process.', optional=True,
                         check=_at_least(0)),
        'jpeg_draft': Field(True, _BOOL, "Streaming, augment.crop='random_resized': decode "
                            'a JPEG at 1/2, 1/4 or 1/8 scale when its training crop stays at '
                            'least load_size on each side, and reduce large shrinks of '
                            "training crops first (Pillow's reducing_gap=2) (faster; pixels "
                            'within about 1 level; evaluation exact).'),
        'device_resident': Field(True, _BOOL, 'Place the splits on every device once when '
                                 'they fit, and gather batches there.'),
        'device_resident_max_mb': Field(4096, _INT, 'The size (all splits) up to which they '
                                        'are placed on the devices.', check=_at_least(0)),
        'augment': {
            'flip': Field('none', _STR, "Keras RandomFlip: 'horizontal', 'vertical', "
                          "'horizontal_and_vertical' or 'none'.",
                          check=value_check('data.augment.flip')),
            'rotation': Field(0.0, _FLOAT, 'Keras RandomRotation factor: a fraction of a full '
                              'turn (0.1: up to 36 degrees either way).', check=_fraction),
            'zoom': Field(0.0, _FLOAT, 'Keras RandomZoom factor: zoom in or out by up to this '
                          'fraction.', check=_fraction),
            'translate': Field(0.0, _FLOAT, 'Keras RandomTranslation factor: shift by up to '
                               'this fraction of the side.', check=_fraction),
            'crop': Field(None, (int, str), 'Keras RandomCrop side, taken from the stored '
                          "image before the resize (evaluation: centre crop); or "
                          "'random_resized': an Inception-style crop of the original image, "
                          'on the host as it is read (streamed splits; evaluation: the '
                          'centred square of 0.875 of the shorter side).',
                          optional=True, check=_crop),
            'fill_mode': Field('reflect', _STR, 'What fills pixels from outside the image.',
                               check=value_check('data.augment.fill_mode')),
            'fill_value': Field(0.0, _FLOAT, "The fill with fill_mode 'constant'."),
            'mixup': Field(0.0, _FLOAT, 'Mixup alpha (Beta(alpha, alpha) weights); 0: off.',
                           check=_at_least(0)),
        },
    },
    'loss': {
        'label_smoothing': Field(0.0, _FLOAT, 'Label smoothing of the softmax loss.',
                                 check=_fraction),
        'class_weight': Field(None, (str, tuple, list), "Keras class_weight: 'balanced' "
                              '(n_examples / (n_classes * n_class) from the train split) or '
                              'one weight per class; None: all 1.', optional=True,
                              check=_class_weight),
    },
    'features': {
        'cache': Field('auto', _STR, "Cached-feature mode for phases that train only the head "
                       "without augmentation: 'auto' (in memory up to features.memory_mb, "
                       "else on disk under DIR/features), 'memory', 'disk' or 'off'.",
                       check=value_check('features.cache')),
        'memory_mb': Field(2048, _INT, "'auto': the size up to which features are held in "
                           'memory.', check=_at_least(0)),
    },
    'report': {
        'progress': Field('auto', _STR, "Per-epoch progress: 'bar' (a terminal bar), 'lines' "
                          "(plain lines), 'off'; 'auto': a bar on a TTY, lines otherwise.",
                          check=value_check('report.progress')),
        'tensorboard': Field(True, _BOOL, 'Write TensorBoard event files under DIR/tb.'),
        'plot': Field(True, _BOOL, 'Redraw DIR/history.png after every epoch.'),
        'every_steps': Field(None, _INT, 'Also record the training loss, accuracy, learning '
                             'rate and images/s of every N steps (metrics.jsonl, "kind": '
                             '"step"; TensorBoard step/); None: per epoch only.',
                             optional=True, check=_positive),
    },
    'checkpoint': {
        'keep': Field(3, _INT, 'How many of the latest checkpoints to keep (latest/).',
                      check=_positive),
        'every_steps': Field(None, _INT, 'Also save every N steps (besides every epoch and '
                             'on SIGTERM); None: per epoch only.', optional=True,
                             check=_positive),
        'monitor': Field('val_loss', _STR, 'The metric best/ keeps the best of.',
                         check=choices(METRICS)),
        'mode': Field('auto', _STR, "'min' or 'max': which value of `monitor` is best; "
                      "'auto': max for accuracies, min for losses.",
                      check=choices(('auto', 'min', 'max'))),
    },
    'allow_config_change': Field(False, _BOOL, 'Resume a workdir whose config.json differs '
                                 'in more than epochs, appended phases, reporting and '
                                 'checkpoint cadence (refused otherwise).'),
    'init_from': Field(None, _STR, "Start from another run's parameters: its workdir, a "
                       'checkpoint step folder or a converted checkpoint; layers of '
                       'another shape (a new head) are initialised and reported.',
                       optional=True),
}

PHASE_SCHEMA: dict[str, Any] = {
    'name': Field('', _STR, "Phase name in logs and metrics; '': 'phase<i>'."),
    'freeze': Field('none', _STR, "What is frozen: 'none', 'backbone', 'layers[A:B]' "
                    "(Keras layer slice), 'stages[A:B]' (slice of the backbone's stages, as "
                    "layer_decay counts them: 'stages[:-1]' leaves the last stage and the "
                    "head trainable, whatever the backbone) or 'regex:PATTERN' (parameter "
                    'paths).',
                    check=value_check('phases.freeze')),
    'lr_groups': Field(None, _SEQ, 'Discriminative learning rates: (spec, multiplier) pairs, '
                       "the spec as freeze's or 'head'; a parameter trains at learning_rate x "
                       'the multiplier of the first pair that matches it (none: 1), times '
                       'its layer_decay factor; 0 freezes it as freeze does. The freeze spec '
                       'wins over both. None: every parameter at 1.', optional=True),
    'layer_decay': Field(None, _FLOAT, "Layer-wise decay d: a backbone parameter k stages "
                         'below the head trains at learning_rate x d**k (stages: ResNet '
                         'stem, conv2..conv5; VGG16 block1..block5; Xception entry, middle, '
                         'exit); times its lr_groups multiplier; None: off.', optional=True,
                         check=lambda v: None if 0 < v <= 1 else 'must be in (0, 1]'),
    'optimizer': Field('adam', _STR, "Keras' update rule: 'adam', 'adamw', 'sgd' or 'rmsprop' "
                       '(fineflax.train.update_rules).',
                       check=value_check('phases.optimizer')),
    'learning_rate': Field(1e-3, _FLOAT, 'Learning rate.', check=_positive),
    'momentum': Field(0.0, _FLOAT, 'Momentum of sgd and rmsprop; 0: none.', check=_fraction),
    'nesterov': Field(False, _BOOL, 'Nesterov momentum (sgd).'),
    'weight_decay': Field(None, _FLOAT, 'Decoupled weight decay (x learning rate, as Keras '
                          'and optax.adamw apply it) of the trainable kernels and biases; '
                          "None: 1e-4 for adamw, 0 otherwise.", optional=True,
                          check=_at_least(0)),
    'decay_batchnorm': Field(False, _BOOL, 'Also decay BatchNormalization scale/offset.'),
    'schedule': Field('constant', _STR, "Learning rate schedule over the phase: 'constant', "
                      "'cosine' (to 0), 'warmup_cosine' (linear warmup, then cosine), 'step' "
                      '(x decay_factor at each of decay_epochs).',
                      check=value_check('phases.schedule')),
    'warmup_epochs': Field(0.0, _FLOAT, "'warmup_cosine': epochs of linear warmup from 0.",
                           check=_at_least(0)),
    'decay_epochs': Field((), _SEQ, "'step': the phase epochs at which the rate drops."),
    'decay_factor': Field(0.1, _FLOAT, "'step': the factor of each drop.", check=_positive),
    'clip_norm': Field(None, _FLOAT, 'Clip gradients to this global norm; None: no clipping.',
                       optional=True, check=_positive),
    'accumulate': Field(1, _INT, 'Accumulate the gradients of N batches per update '
                        '(optax.MultiSteps): an effective batch of N x batch_size.',
                        check=_positive),
    'epochs': Field(1, _INT, 'Epochs of this phase.', check=_at_least(0)),
    'augment': Field(True, _BOOL, 'Apply config.data.augment in this phase; False: train on '
                     'the plain images (a head-only phase can then use cached features).'),
    'early_stopping': {
        'patience': Field(0, _INT, 'Keras EarlyStopping: stop the phase after this many '
                          'epochs without improvement; 0: off.', check=_at_least(0)),
        'monitor': Field('val_loss', _STR, 'The metric early stopping watches.',
                         check=choices(METRICS)),
        'mode': Field('auto', _STR, "'min', 'max' or 'auto' (max for accuracies, min for "
                      'losses).', check=choices(('auto', 'min', 'max'))),
        'min_delta': Field(0.0, _FLOAT, 'The least change that counts as an improvement.',
                           check=_at_least(0)),
        'restore_best': Field(False, _BOOL, 'At the end of the phase, go back to the '
                              'parameters of its best epoch.'),
    },
    'batchnorm': Field('frozen', _STR, "'frozen': BN uses its moving statistics and never "
                       "updates them (Keras training=False); 'train': BN layers with trainable "
                       'scale/offset use batch statistics averaged over devices (from scratch).',
                       check=value_check('phases.batchnorm')),
}


def _build(schema: dict[str, Any]) -> ml_collections.ConfigDict:
  out = ml_collections.ConfigDict()
  for key, field in schema.items():
    if isinstance(field, dict):
      out[key] = _build(field)
    elif field.default is None and (len(field.types) == 1 or field.types == _FLOAT):
      # A typed placeholder, so that `--config.key=value` can override it.
      out[key] = config_dict.placeholder(field.types[0])
    elif field.default is None:  # several types (a name or a tuple): set in a config file
      out[key] = None
    else:
      out[key] = field.default
  return out


def default_config() -> ml_collections.ConfigDict:
  """Every key with its default; `phases` holds one default phase."""
  config = _build(SCHEMA)
  config.phases = (phase(),)
  return config


def phase(**overrides: Any) -> ml_collections.ConfigDict:
  """A phase with the defaults of `PHASE_SCHEMA` and the given overrides."""
  unknown = set(overrides) - set(PHASE_SCHEMA)
  if unknown:
    key = sorted(unknown)[0]
    raise ConfigError(f'unknown phase key {key!r}{suggest(key, PHASE_SCHEMA)}')
  out = _build(PHASE_SCHEMA)
  for key, value in overrides.items():
    if isinstance(PHASE_SCHEMA[key], dict):  # a section: override its keys, keep the rest
      unknown = set(value) - set(PHASE_SCHEMA[key])
      if unknown:
        name = sorted(unknown)[0]
        raise ConfigError(f'unknown phase key {key}.{name}{suggest(name, PHASE_SCHEMA[key])}')
      out[key].update(dict(value))
    else:
      out[key] = value
  return out


def suggest(key: str, known) -> str:
  close = difflib.get_close_matches(key, list(known), n=1)
  return f' (did you mean {close[0]!r}?)' if close else f'; known keys: {sorted(known)}'
